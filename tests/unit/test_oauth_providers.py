"""Each preset against the test server's mode for its provider (Entra ID,
Google), in memory: who sends the client secret, the JWT bearer grant, the
app-only accounts that fetch their own tokens, the refusals recorded with
the provider's code and advice, and revocation at the provider."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from gateway.maildrop import UpstreamRejected
from gateway.model import Config, Provider, Secret
from gateway.oauth.admin import format_status, revoke_at_provider, status_report
from gateway.oauth.endpoint import TokenEndpoint, sends_secret
from gateway.oauth.errors import OAuthEndpointError
from gateway.oauth.jwt_bearer import (
    JWT_BEARER_GRANT,
    ServiceAccountKeyError,
    load_service_account,
    signed_assertion,
)
from gateway.oauth.keys import KEY_ENV, encode_key, load_key
from gateway.oauth.manager import TokenManager
from gateway.oauth.refusal import RefusalKind
from gateway.oauth.store import TokenRecord, TokenStore
from gateway.oauth.tokens import parse_token_response
from tests.harness import oauth_modes
from tests.harness.oauth_server import AuthServer, InMemoryPoster
from tests.helpers import token_manager
from tests.helpers.oauth import CLIENT_SECRET, fresh_key, preset_config, preset_provider
from tests.helpers.token_manager import START
from tests.helpers.token_manager import fired as done

clock = token_manager.clock  # the shared fixture, bound for this module

BASE = "http://127.0.0.1:9"


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("gateway"):
            lines.append(f"{event['log_level'].name} {formatEvent(event)}")

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def entra(clock: Clock, **settings: Any) -> AuthServer:
    return AuthServer(
        mode="entra",
        client_secret=CLIENT_SECRET,
        clock=clock,
        base_url=BASE,
        client_credentials_user="alice",
        **settings,
    )


def google(clock: Clock) -> AuthServer:
    return AuthServer(mode="google", client_secret=CLIENT_SECRET, clock=clock, base_url=BASE)


def run(coroutine: Any) -> Any:
    return done(ensureDeferred(coroutine))


def secret_requests(poster: InMemoryPoster) -> list[str]:
    return [
        form.get("grant_type", path) for path, form in poster.requests if "client_secret" in form
    ]


# -- who sends the client secret -------------------------------------------------------------------


def test_microsoft_public_flows_never_send_the_configured_secret(clock: Clock) -> None:
    """One app registration with a secret (for app-only accounts): the device
    flow, its polling and its refreshes send only the client id, and the
    Entra-mode server (which answers AADSTS700025 to a secret from a public
    client) never saw one; client credentials do send it."""
    server = entra(clock)
    poster = InMemoryPoster(server)
    provider = preset_provider("microsoft365", BASE, secret=CLIENT_SECRET)
    endpoint = TokenEndpoint(provider, poster, clock)
    authorization = run(endpoint.start_device_authorization())
    assert authorization.verification_uri_complete is None  # Microsoft sends none
    server.approve(authorization.user_code, "alice")
    tokens = run(endpoint.poll_device(authorization.device_code))
    assert tokens.refresh_token is not None
    refreshed = run(endpoint.refresh(tokens.refresh_token, "device_code"))
    assert refreshed.refresh_token != tokens.refresh_token  # Entra rotates
    app = run(endpoint.client_credentials())
    assert app.refresh_token is None
    assert secret_requests(poster) == ["client_credentials"]
    assert server.counts["secret_from_public_client"] == 0
    first_path, _ = poster.requests[0]
    assert first_path == "/contoso.onmicrosoft.com/oauth2/v2.0/devicecode"


def test_entra_refuses_a_secret_from_a_public_client_and_it_is_a_configuration_problem(
    clock: Clock,
) -> None:
    """What the old behaviour (always send the secret) earned, as Entra words it."""
    server = entra(clock)
    poster = InMemoryPoster(server)
    provider = preset_provider(
        "microsoft365", BASE, secret=CLIENT_SECRET, client_type="confidential"
    )
    endpoint = TokenEndpoint(provider, poster, clock)
    with pytest.raises(OAuthEndpointError) as info:
        run(endpoint.start_device_authorization())
    refusal = info.value.refusal
    assert refusal is not None and refusal.code == "AADSTS700025"
    assert refusal.kind is RefusalKind.MISCONFIGURED
    assert server.counts["secret_from_public_client"] == 1


def test_the_secret_rule(clock: Clock) -> None:
    ms = preset_provider("microsoft365", BASE, secret="s").oauth
    web = preset_provider("microsoft365", BASE, secret="s", client_type="confidential").oauth
    gmail = preset_provider("gmail", BASE, secret="s").oauth
    assert ms is not None and web is not None and gmail is not None
    assert [sends_secret(ms, g) for g in ("device_code", "authorization_code", None)] == [
        False,
        False,
        False,
    ]
    assert sends_secret(ms, "client_credentials") and not sends_secret(ms, "service_account")
    assert sends_secret(web, "authorization_code")
    # Google's desktop clients send theirs with the code exchange and refreshes.
    assert sends_secret(gmail, "authorization_code") and sends_secret(gmail, None)


def test_client_credentials_on_the_common_tenant_is_refused_as_entra_does(clock: Clock) -> None:
    server = entra(clock)
    provider = preset_provider("microsoft365", BASE, secret=CLIENT_SECRET, tenant="common")
    endpoint = TokenEndpoint(provider, InMemoryPoster(server), clock)
    with pytest.raises(OAuthEndpointError) as info:
        run(endpoint.client_credentials())
    assert info.value.refusal is not None and info.value.refusal.code == "AADSTS9001023"


def test_google_device_flow_refuses_the_mail_scope(clock: Clock) -> None:
    """Why the Gmail preset has no device flow: asked anyway, Google says invalid_scope."""
    server = google(clock)
    provider = preset_provider("gmail", BASE, secret=CLIENT_SECRET)
    assert provider.oauth is not None and provider.oauth.device_authorization_url is None
    with_device = replace(
        provider, oauth=replace(provider.oauth, device_authorization_url=f"{BASE}/device/code")
    )
    endpoint = TokenEndpoint(with_device, InMemoryPoster(server), clock)
    with pytest.raises(OAuthEndpointError) as info:
        run(endpoint.start_device_authorization())
    assert info.value.code == "invalid_scope"
    assert info.value.refusal is not None and "authorization_code" in info.value.refusal.advice


# -- the JWT bearer grant --------------------------------------------------------------------------


def service_account(server: AuthServer, mailboxes: list[str]) -> tuple[Any, dict[str, str]]:
    key_file = oauth_modes.new_service_account(server, "gw@proj.iam.gserviceaccount.com", mailboxes)
    return load_service_account(json.dumps(key_file)), key_file


def b64json(part: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return result


def test_the_assertion_is_signed_rs256_with_the_claims_google_asks_for(clock: Clock) -> None:
    server = google(clock)
    account, key_file = service_account(server, ["alice@example.com"])
    jwt = signed_assertion(
        account,
        subject="alice@example.com",
        scopes=("https://mail.google.com/",),
        audience="https://oauth2.googleapis.com/token",
        now=START,
    )
    header, claims, signature = jwt.split(".")
    assert b64json(header) == {"alg": "RS256", "typ": "JWT", "kid": key_file["private_key_id"]}
    assert b64json(claims) == {
        "iss": "gw@proj.iam.gserviceaccount.com",
        "scope": "https://mail.google.com/",
        "aud": "https://oauth2.googleapis.com/token",
        "sub": "alice@example.com",
        "iat": int(START),
        "exp": int(START) + 3600,
    }
    public = serialization.load_pem_public_key(
        server.service_accounts["gw@proj.iam.gserviceaccount.com"]["public_key"].encode()
    )
    assert isinstance(public, rsa.RSAPublicKey)
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    public.verify(raw, f"{header}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())


def test_the_service_account_grant_against_googles_rules(clock: Clock) -> None:
    server = google(clock)
    account, _ = service_account(server, ["alice"])
    provider = preset_provider("gmail", BASE, secret=CLIENT_SECRET, service_account=account)
    poster = InMemoryPoster(server)
    endpoint = TokenEndpoint(provider, poster, clock)
    tokens = run(endpoint.service_account("alice"))
    assert server.access[tokens.access_token.reveal()].username == "alice"
    ((path, form),) = poster.requests
    assert path == "/token" and set(form) == {"grant_type", "assertion"}
    assert form["grant_type"] == JWT_BEARER_GRANT
    # A mailbox the service account was not delegated: Google's unauthorized_client.
    with pytest.raises(OAuthEndpointError) as info:
        run(endpoint.service_account("bob"))
    assert info.value.code == "unauthorized_client"
    assert info.value.refusal is not None
    assert info.value.refusal.kind is RefusalKind.MISCONFIGURED


def test_a_forged_signature_is_refused(clock: Clock) -> None:
    server = google(clock)
    account, _ = service_account(server, ["alice"])
    other = AuthServer(mode="google", base_url=BASE)
    impostor, _ = service_account(other, ["alice"])  # same e-mail, another key
    provider = preset_provider("gmail", BASE, service_account=impostor)
    endpoint = TokenEndpoint(provider, InMemoryPoster(server), clock)
    with pytest.raises(OAuthEndpointError) as info:
        run(endpoint.service_account("alice"))
    assert info.value.description == "Invalid JWT Signature."
    assert account.client_email == impostor.client_email


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("not json", "not a JSON key file"),
        ({"type": "authorized_user"}, "not 'service_account'"),
        ({"type": "service_account", "client_email": "a@b"}, "has no private_key"),
        (
            {"type": "service_account", "client_email": "a", "private_key": "x", "token_uri": "u"},
            "not a PEM private key",
        ),
    ],
)
def test_unusable_key_files(document: Any, message: str) -> None:
    text = document if isinstance(document, str) else json.dumps(document)
    with pytest.raises(ServiceAccountKeyError, match=message):
        load_service_account(text)


# -- app-only accounts fetch their own tokens ---------------------------------------------


def manager(
    config: Config, clock: Clock, poster: InMemoryPoster
) -> tuple[TokenManager, TokenStore]:
    store = TokenStore.open(config.state_dir, fresh_key())
    service = TokenManager(config, clock=clock, poster=poster, store=store)
    service.startService()
    return service, store


def token(service: TokenManager, config: Config) -> str:
    return str(run(service.access_token(config.accounts["scanner"])))


@pytest.mark.parametrize("preset", ["microsoft365", "gmail"])
def test_app_only_accounts_need_no_authorize(
    tmp_path: Path, clock: Clock, preset: str, logged: list[str]
) -> None:
    """First login fetches the token; the timer fetches the next one before
    expiry, on the injected clock; nobody ran `gateway oauth authorize`."""
    if preset == "gmail":
        server = google(clock)
        account, _ = service_account(server, ["alice"])
        provider = preset_provider("gmail", BASE, service_account=account)
        grant: Any = "service_account"
    else:
        server = entra(clock)
        provider = preset_provider("microsoft365", BASE, secret=CLIENT_SECRET)
        grant = "client_credentials"
    config = preset_config(tmp_path / "state", provider, grant=grant, margin=300)
    poster = InMemoryPoster(server)
    service, store = manager(
        config,
        clock,
        poster,
    )
    assert any("fetched at first use" in line for line in logged)
    first = token(service, config)
    assert server.access[first].username == "alice"
    assert token(service, config) == first and len(poster.requests) == 1
    record = store.load("scanner")
    assert record is not None and record.state == "ok" and record.grant == grant
    clock.advance(3600 - 300)  # the refresh margin before expiry
    assert len(poster.requests) == 2
    second = token(service, config)
    assert second != first and len(poster.requests) == 2
    assert any("fetched (app-only)" in line for line in logged)
    service.stopService()


def test_app_only_refusal_reaches_the_store_status_and_log(
    tmp_path: Path, clock: Clock, logged: list[str]
) -> None:
    server = entra(clock)
    provider = preset_provider("microsoft365", BASE, secret="a wrong secret")
    config = preset_config(tmp_path / "state", provider, grant="client_credentials")
    service, store = manager(config, clock, InMemoryPoster(server))
    with pytest.raises(UpstreamRejected) as info:
        token(service, config)
    assert "AADSTS7000215" in info.value.detail
    assert str(info.value) == "mailbox access misconfigured, ask the administrator"
    record = store.load("scanner")
    assert record is not None and record.state == "failed"
    assert (record.error_kind, record.error_code) == ("misconfigured", "AADSTS7000215")
    assert record.error_advice is not None and "client_secret_file" in record.error_advice
    line = next(line for line in logged if "AADSTS7000215" in line)
    assert line.startswith("error ") and "client_secret_file" in line
    environ = {KEY_ENV: encode_key(store.key.key)}
    (entry,) = status_report(config, now=clock.seconds(), environ=environ)
    assert entry["error_code"] == "AADSTS7000215" and entry["error_kind"] == "misconfigured"
    text = "\n".join(format_status([entry]))
    assert "provider code AADSTS7000215 (gateway or app misconfigured)" in text
    assert "what to do: the client secret is wrong" in text
    service.stopService()


def test_an_expired_delegated_grant_names_the_account_to_authorize(
    tmp_path: Path, clock: Clock
) -> None:
    server = entra(clock)
    provider = preset_provider("microsoft365", BASE, secret=CLIENT_SECRET)
    config = preset_config(tmp_path / "state", provider)
    store = TokenStore.open(config.state_dir, fresh_key())
    answer = server._issue("alice", "gateway", "mail", refresh=True, public=True)
    tokens = parse_token_response(answer, clock.seconds())
    store.update(
        "scanner", lambda _: TokenRecord.authorized("scanner", "device_code", tokens, START)
    )
    server.revoke("alice")
    poster = InMemoryPoster(server)
    service = TokenManager(config, clock=clock, poster=poster, store=store)
    service.startService()
    clock.advance(3600)
    with pytest.raises(UpstreamRejected) as info:
        token(service, config)
    assert "AADSTS50173" in info.value.detail
    assert "gateway oauth authorize scanner" in info.value.detail
    assert secret_requests(poster) == []  # the refresh of a public client's token
    record = store.load("scanner")
    assert record is not None and (record.state, record.error_kind) == (
        "needs_reauth",
        "reauthorize",
    )
    service.stopService()


# -- revocation ------------------------------------------------------------------------------------


def seeded(tmp_path: Path, server: AuthServer, provider: Provider) -> tuple[Config, dict[str, str]]:
    config = preset_config(tmp_path / "state", provider)
    key = load_key(config.oauth, config.state_dir, environ={}, create=True)
    store = TokenStore.open(config.state_dir, key)
    answer = server._issue("alice", "gateway", "mail", refresh=True)
    tokens = parse_token_response(answer, START)
    store.update(
        "scanner", lambda _: TokenRecord.authorized("scanner", "authorization_code", tokens, START)
    )
    return config, answer


def test_revoke_at_google_ends_the_grant(tmp_path: Path, clock: Clock) -> None:
    server = google(clock)
    provider = preset_provider("gmail", BASE, secret=CLIENT_SECRET)
    config, answer = seeded(tmp_path, server, provider)
    poster = InMemoryPoster(server)
    outcome = run(revoke_at_provider(config, "scanner", poster=poster, clock=clock, environ={}))
    assert outcome == "revoked"
    ((path, form),) = poster.requests
    assert path == "/revoke" and form["token"] == answer["refresh_token"]
    assert not server.refresh[answer["refresh_token"]].active
    # Asked again (the grant is gone), the failure is reported, not raised.
    again = run(revoke_at_provider(config, "scanner", poster=poster, clock=clock, environ={}))
    assert again.startswith("failed: invalid_token")


def test_microsoft_has_no_revocation_endpoint(tmp_path: Path, clock: Clock) -> None:
    server = entra(clock)
    provider = preset_provider("microsoft365", BASE)
    config, _ = seeded(tmp_path, server, provider)
    poster = InMemoryPoster(server)
    outcome = run(revoke_at_provider(config, "scanner", poster=poster, clock=clock, environ={}))
    assert outcome == "no_endpoint" and poster.requests == []


def test_assertion_secret_never_in_a_repr(clock: Clock) -> None:
    server = google(clock)
    account, key_file = service_account(server, ["alice"])
    assert key_file["private_key"] not in repr(account)
    assert isinstance(account.private_key, Secret)


def test_without_public_client_flows_the_device_flow_is_a_configuration_problem(
    clock: Clock,
) -> None:
    """ "Allow public client flows" left off: Entra wants a secret (AADSTS7000218)."""
    server = entra(clock, public_client=False)
    endpoint = TokenEndpoint(preset_provider("microsoft365", BASE), InMemoryPoster(server), clock)
    authorization = run(endpoint.start_device_authorization())
    server.approve(authorization.user_code, "alice")
    with pytest.raises(OAuthEndpointError) as info:
        run(endpoint.poll_device(authorization.device_code))
    refusal = info.value.refusal
    assert refusal is not None and refusal.code == "AADSTS7000218"
    assert refusal.kind is RefusalKind.MISCONFIGURED and "Allow public client" in refusal.advice


def test_entra_loop_detection_is_temporary_even_in_a_400() -> None:
    from gateway.oauth.errors import OAuthUnavailable
    from gateway.oauth.http import interpret_response

    status, body = oauth_modes.entra_error(400, "invalid_request", 50196)
    with pytest.raises(OAuthUnavailable) as info:
        interpret_response("https://login.example/token", status, json.dumps(body).encode())
    assert info.value.refusal is not None
    assert (info.value.refusal.kind, info.value.refusal.code) == (
        RefusalKind.TEMPORARY,
        "AADSTS50196",
    )
