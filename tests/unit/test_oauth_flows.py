"""Each grant end to end, driven as the admin drives `gateway oauth authorize`:
the CLI's flow runs in-process against the test authorization server over
real loopback HTTP, with the polling and expiry clock injected."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool

from gateway.model import Config
from gateway.oauth.admin import authorize_account, format_status, revoke_account, status_report
from gateway.oauth.code_flow import PKCE, LoopbackListener, code_from_redirect
from gateway.oauth.errors import AuthorizationFailed
from gateway.oauth.http import TreqPoster
from gateway.oauth.keys import KEY_ENV, encode_key, load_key, new_key
from gateway.oauth.store import TokenStore
from tests.harness.oauth_server import DEVICE_GRANT, AuthServer
from tests.helpers.oauth import CLIENT_SECRET, oauth_config, preset_config, preset_provider

START = 1_700_000_000.0
ENV = {KEY_ENV: encode_key(new_key())}


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(START)
    return c


@pytest.fixture
def server(clock: Clock) -> Iterator[AuthServer]:
    auth = AuthServer(
        client_secret=CLIENT_SECRET,
        clock=clock,
        client_credentials_user="alice",
        consent_user="alice",
    )
    port = auth.listen(reactor)
    yield auth
    pytest_twisted.blockon(port.stopListening())


def config_for(tmp_path: Path, server: AuthServer, grant: Any) -> Config:
    return oauth_config(tmp_path / "state", server.base_url, grant=grant)


class Admin:
    """One `gateway oauth authorize` run: its output, and the flow's result."""

    def __init__(self, config: Config, clock: Clock, **options: Any) -> None:
        self.out = io.StringIO()
        self.config = config
        self.done: Deferred[dict[str, Any]] = ensureDeferred(
            authorize_account(
                config,
                "scanner",
                reactor=reactor,
                clock=clock,
                poster=TreqPoster(reactor, timeout=5),
                out=self.out,
                environ=ENV,
                **options,
            )
        )
        self.result: Any = None
        self.done.addBoth(self._finished)

    def _finished(self, result: Any) -> None:
        self.result = result

    @property
    def text(self) -> str:
        return self.out.getvalue()

    def outcome(self) -> dict[str, Any]:
        assert self.done.called
        if hasattr(self.result, "raiseException"):
            self.result.raiseException()
        assert isinstance(self.result, dict)
        return self.result


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await deferLater(reactor, 0.005, lambda: None)


def polls(server: AuthServer) -> int:
    return server.counts[f"token:{DEVICE_GRANT}"]


def stored(config: Config) -> Any:
    store = TokenStore.open(config.state_dir, load_key(config.oauth, config.state_dir, environ=ENV))
    return store.load("scanner")


def assert_no_secrets(text: str, server: AuthServer) -> None:
    for secret in [*server.access, *server.refresh, *server.devices, CLIENT_SECRET]:
        assert secret not in text


# -- device code -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_device_grant_polls_per_the_spec_and_stores_tokens(
    tmp_path: Path, clock: Clock, server: AuthServer
) -> None:
    config = config_for(tmp_path, server, "device_code")
    admin = Admin(config, clock)
    await until(lambda: bool(clock.getDelayedCalls()))
    assert f"open  {server.base_url}/verify" in admin.text
    user_code = re.search(r"enter the code  (\S+)", admin.text).group(1)  # type: ignore[union-attr]
    assert "expires in 10 min" in admin.text

    clock.advance(5)  # first poll: nobody signed in yet
    await until(lambda: polls(server) == 1 and bool(clock.getDelayedCalls()))
    server.slow_down = 1
    clock.advance(5)  # second poll: slow_down -> every 10 s from now on
    await until(lambda: polls(server) == 2 and bool(clock.getDelayedCalls()))
    assert "now every 10 s" in admin.text
    clock.advance(5)
    await deferLater(reactor, 0.05, lambda: None)
    assert polls(server) == 2  # not yet: the interval grew
    server.approve(user_code, "alice")  # the admin signs in in a browser
    clock.advance(5)
    await until(lambda: admin.done.called)
    result = admin.outcome()
    assert polls(server) == 3
    assert result["grant"] == "device_code" and result["refresh_token"] is True
    record = stored(config)
    assert record.state == "ok" and record.grant == "device_code"
    assert record.tokens.access_token.reveal() in server.access
    assert_no_secrets(admin.text + repr(result), server)
    # The device authorization request carried the scopes and client id.
    assert server.devices[next(iter(server.devices))].scope == "mail offline_access"


@pytest_twisted.ensureDeferred
async def test_device_grant_declined(tmp_path: Path, clock: Clock, server: AuthServer) -> None:
    admin = Admin(config_for(tmp_path, server, "device_code"), clock)
    await until(lambda: bool(clock.getDelayedCalls()))
    server.deny(server.pending_user_codes()[0])
    clock.advance(5)
    await until(lambda: admin.done.called)
    with pytest.raises(AuthorizationFailed, match="declined"):
        admin.outcome()
    assert stored(admin.config) is None


@pytest_twisted.ensureDeferred
async def test_device_code_expires(tmp_path: Path, clock: Clock, server: AuthServer) -> None:
    server.device_ttl = 12
    admin = Admin(config_for(tmp_path, server, "device_code"), clock)
    for _ in range(4):
        await until(lambda: admin.done.called or bool(clock.getDelayedCalls()))
        clock.advance(5)
    await until(lambda: admin.done.called)
    with pytest.raises(AuthorizationFailed, match="expired"):
        admin.outcome()


@pytest_twisted.ensureDeferred
async def test_device_code_expired_at_the_server(
    tmp_path: Path, clock: Clock, server: AuthServer
) -> None:
    admin = Admin(config_for(tmp_path, server, "device_code"), clock)
    await until(lambda: bool(clock.getDelayedCalls()))
    server.offset = 3600  # the server's clock says the code is long gone
    clock.advance(5)
    await until(lambda: admin.done.called)
    with pytest.raises(AuthorizationFailed, match="expired"):
        admin.outcome()
    assert polls(server) == 1


@pytest_twisted.ensureDeferred
async def test_network_trouble_while_polling_backs_off(
    tmp_path: Path, clock: Clock, server: AuthServer
) -> None:
    admin = Admin(config_for(tmp_path, server, "device_code"), clock)
    await until(lambda: bool(clock.getDelayedCalls()))
    server.fail_next(503)
    clock.advance(5)
    await until(lambda: polls(server) == 1 and bool(clock.getDelayedCalls()))
    assert "retrying in 10 s" in admin.text
    server.approve(server.pending_user_codes()[0], "alice")
    clock.advance(10)
    await until(lambda: admin.done.called)
    admin.outcome()


# -- authorization code with PKCE ----------------------------------------------------------


def browser_get(url: str) -> Deferred[Any]:
    """A GET that leaves no connection behind (the global reactor is checked for leftovers)."""
    return treq.get(url, allow_redirects=False, pool=HTTPConnectionPool(reactor, persistent=False))


async def browser_follow(url: str) -> tuple[int, str]:
    """What a browser does with the authorization URL: one redirect, then the page."""
    response = await browser_get(url)
    assert response.code == 302
    await response.content()
    location = response.headers.getRawHeaders(b"location")[0].decode()
    return response.code, location


@pytest_twisted.ensureDeferred
async def test_code_grant_with_the_loopback_listener(
    tmp_path: Path, clock: Clock, server: AuthServer
) -> None:
    config = config_for(tmp_path, server, "authorization_code")
    admin = Admin(config, clock, listen=True, paste=None)
    await until(lambda: "/authorize?" in admin.text)
    url = re.search(r"(http://\S+/authorize\?\S+)", admin.text).group(1)  # type: ignore[union-attr]
    assert "code_challenge_method=S256" in url and "login_hint=alice" in url
    _, location = await browser_follow(url)
    assert location.startswith("http://localhost:")
    # A stray request without the right state does not end the grant.
    stray = await browser_get(
        location.split("?")[0].replace("localhost", "127.0.0.1") + "?code=x&state=forged"
    )
    assert stray.code == 400
    await stray.content()
    page = await browser_get(location.replace("localhost", "127.0.0.1"))
    assert page.code == 200 and b"Signed in" in await page.content()
    await until(lambda: admin.done.called)
    result = admin.outcome()
    assert result["grant"] == "authorization_code" and result["refresh_token"]
    assert stored(config).tokens.access_token.reveal() in server.access
    assert_no_secrets(admin.text, server)


@pytest_twisted.ensureDeferred
async def test_code_grant_with_the_redirect_pasted(
    tmp_path: Path, clock: Clock, server: AuthServer
) -> None:
    config = config_for(tmp_path, server, "authorization_code")
    pasted: Deferred[str] = Deferred()
    admin = Admin(
        config, clock, listen=False, paste=lambda: pasted, redirect_uri="http://localhost:1/"
    )
    await until(lambda: "/authorize?" in admin.text)
    assert "paste it here" in admin.text
    url = re.search(r"(http://\S+/authorize\?\S+)", admin.text).group(1)  # type: ignore[union-attr]
    _, location = await browser_follow(url)
    assert location.startswith("http://localhost:1/?code=")
    pasted.callback(location)  # the page did not load; the admin pastes its address
    await until(lambda: admin.done.called)
    assert admin.outcome()["refresh_token"]
    assert server.counts["token:authorization_code"] == 1


@pytest_twisted.ensureDeferred
async def test_code_grant_refuses_a_pasted_redirect_with_another_state(
    tmp_path: Path, clock: Clock, server: AuthServer
) -> None:
    pasted: Deferred[str] = Deferred()
    admin = Admin(
        config_for(tmp_path, server, "authorization_code"),
        clock,
        listen=False,
        paste=lambda: pasted,
        redirect_uri="http://localhost:1/",
    )
    await until(lambda: "/authorize?" in admin.text)
    pasted.callback("http://localhost:1/?code=stolen&state=someone-elses")
    await until(lambda: admin.done.called)
    with pytest.raises(AuthorizationFailed, match="state does not match"):
        admin.outcome()
    assert server.counts["token:authorization_code"] == 0


@pytest_twisted.ensureDeferred
async def test_code_grant_declined_in_the_browser(
    tmp_path: Path, clock: Clock, server: AuthServer
) -> None:
    server.consent_user = None
    admin = Admin(config_for(tmp_path, server, "authorization_code"), clock, paste=None)
    await until(lambda: "/authorize?" in admin.text)
    url = re.search(r"(http://\S+/authorize\?\S+)", admin.text).group(1)  # type: ignore[union-attr]
    _, location = await browser_follow(url)
    page = await browser_get(location.replace("localhost", "127.0.0.1"))
    await page.content()
    await until(lambda: admin.done.called)
    with pytest.raises(AuthorizationFailed, match="access_denied"):
        admin.outcome()


@pytest_twisted.ensureDeferred
async def test_code_grant_times_out_on_the_clock(
    tmp_path: Path, clock: Clock, server: AuthServer
) -> None:
    admin = Admin(config_for(tmp_path, server, "authorization_code"), clock, paste=None)
    await until(lambda: "/authorize?" in admin.text)
    clock.advance(600)
    await until(lambda: admin.done.called)
    with pytest.raises(AuthorizationFailed, match="nobody signed in"):
        admin.outcome()


def test_pkce_pair() -> None:
    import base64
    import hashlib

    pkce = PKCE.new()
    assert 43 <= len(pkce.verifier) <= 128
    digest = hashlib.sha256(pkce.verifier.encode()).digest()
    assert pkce.challenge == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert PKCE.new().verifier != pkce.verifier


@pytest.mark.parametrize(
    "text",
    [
        "http://localhost:5/?code=abc&state=s1",
        "?code=abc&state=s1",
        "code=abc&state=s1",
        "/?state=s1&code=abc",
    ],
)
def test_code_from_redirect_forms(text: str) -> None:
    assert code_from_redirect(text, "s1") == "abc"


# -- client credentials, status, revoke -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_credentials_then_status_then_revoke(
    tmp_path: Path, clock: Clock, server: AuthServer
) -> None:
    config = config_for(tmp_path, server, "client_credentials")
    admin = Admin(config, clock)
    await until(lambda: admin.done.called)
    result = admin.outcome()
    assert result["grant"] == "client_credentials" and result["refresh_token"] is False
    assert "client credentials grant (app-only)" in admin.text
    record = stored(config)
    assert record.tokens.refresh_token is None

    [entry] = status_report(config, now=clock.seconds(), environ=ENV)
    assert entry["state"] == "ok" and entry["access_token_valid"] is True
    assert entry["grant"] == "client_credentials"
    text = "\n".join(format_status([entry]))
    assert text.startswith("scanner: ok (client_credentials, alice at idp)")
    assert "access token valid until" in text

    later = status_report(config, now=clock.seconds() + 7200, environ=ENV)
    assert later[0]["access_token_valid"] is False

    revoke_account(config, "scanner", now=clock.seconds(), environ=ENV)
    [entry] = status_report(config, now=clock.seconds(), environ=ENV)
    assert entry["state"] == "revoked" and entry["last_error"] == "revoked by the administrator"
    assert stored(config).tokens is None


def test_status_before_any_key_or_token(tmp_path: Path) -> None:
    config = oauth_config(tmp_path / "state")
    [entry] = status_report(config, now=0.0, environ={})
    assert entry["state"] == "not_authorized"
    assert not (tmp_path / "state" / "gateway.key").exists()  # status creates nothing
    assert "gateway oauth authorize scanner" in "\n".join(format_status([entry]))


def test_status_with_the_wrong_key(tmp_path: Path) -> None:
    config = oauth_config(tmp_path / "state")
    store = TokenStore.open(config.state_dir, load_key(config.oauth, config.state_dir, environ=ENV))
    store.update("scanner", lambda _: revoke_record())
    [entry] = status_report(config, now=0.0, environ={KEY_ENV: encode_key(new_key())})
    assert entry["state"] == "unreadable" and "different gateway key" in entry["last_error"]


def revoke_record() -> Any:
    from gateway.oauth.store import TokenRecord

    return TokenRecord("scanner", "device_code", "l1").revoked(1.0)


def test_unknown_or_password_account_refused(tmp_path: Path) -> None:
    from gateway.oauth.admin import CommandFailed

    config = oauth_config(tmp_path / "state")
    with pytest.raises(CommandFailed, match=r"no account 'nope'.*OAuth2 accounts: scanner"):
        status_report(config, ["nope"], now=0.0, environ=ENV)


# -- the code grant in each provider's loopback form (issue 9) ---------------------------------


class _RawGet(Protocol):
    """An HTTP/1.0 GET by hand: treq cannot address an IPv6 literal host."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(f"GET {self.target} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(self.data)


async def raw_get(host: str, port: int, target: str) -> bytes:
    """GET `target` from `host` (an address literal, IPv4 or IPv6) and return the answer."""
    endpoint = (
        TCP6ClientEndpoint(reactor, host, port)
        if ":" in host
        else TCP4ClientEndpoint(reactor, host, port)
    )
    protocol = _RawGet(target)
    await connectProtocol(endpoint, protocol)
    return await protocol.done


@pytest.fixture
def provider_server(clock: Clock, request: pytest.FixtureRequest) -> Iterator[AuthServer]:
    auth = AuthServer(
        mode=request.param, client_secret=CLIENT_SECRET, clock=clock, consent_user="alice"
    )
    port = auth.listen(reactor)
    yield auth
    pytest_twisted.blockon(port.stopListening())


@pytest.mark.parametrize(
    ("provider_server", "preset", "redirect", "browser_host"),
    [
        # Microsoft: http://localhost, which a browser may resolve to ::1.
        ("entra", "microsoft365", "http://localhost:", "::1"),
        # Google: the IP literal its desktop clients document.
        ("google", "gmail", "http://127.0.0.1:", "127.0.0.1"),
    ],
    indirect=["provider_server"],
)
@pytest_twisted.ensureDeferred
async def test_code_grant_in_the_providers_loopback_form(
    tmp_path: Path,
    clock: Clock,
    provider_server: AuthServer,
    preset: str,
    redirect: str,
    browser_host: str,
) -> None:
    provider = preset_provider(preset, provider_server.base_url, secret=CLIENT_SECRET)
    config = preset_config(tmp_path / "state", provider, grant="authorization_code")
    admin = Admin(config, clock, listen=True, paste=None)
    await until(lambda: "?response_type=code" in admin.text)
    url = re.search(r"(http://\S+\?response_type=code\S+)", admin.text).group(1)  # type: ignore[union-attr]
    _, location = await browser_follow(url)
    assert location.startswith(redirect) and provider_server.counts["redirect_mismatch"] == 0
    port = int(location.split(":")[2].split("?")[0].rstrip("/"))
    page = await raw_get(browser_host, port, "/?" + location.split("?", 1)[1])
    assert page.startswith(b"HTTP/1.0 200") and b"Signed in" in page
    await until(lambda: admin.done.called)
    assert admin.outcome()["refresh_token"]
    # Microsoft's public client sent no secret; Google's desktop client did.
    sent = provider_server.counts["secret:authorization_code"]
    assert sent == (1 if preset == "gmail" else 0)


@pytest_twisted.ensureDeferred
async def test_the_listener_answers_on_both_loopback_addresses() -> None:
    listener = LoopbackListener(reactor)
    port = await listener.start("st")
    try:
        for host in ("127.0.0.1", "::1"):
            answer = await raw_get(host, port, "/?state=wrong")
            # Our listener, refusing a stray request.
            assert answer.startswith(b"HTTP/1.0 400") and b"Not accepted" in answer
    finally:
        await listener.stop()
