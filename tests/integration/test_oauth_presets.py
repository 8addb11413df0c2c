"""Each preset's default path end to end, against the provider it stands for.

The real twistd gateway loads presets (microsoft365, outlook, gmail) whose
OAuth2 endpoints alone are moved, paths kept, to the test authorization
server in "providers" mode: ``/{tenant}/oauth2/v2.0/...`` behaves as Entra
ID documents, ``/google/...`` as Google documents. Dovecot's oauth2 passdb
introspects every token there; devices log in on poplib; the admin runs
`gateway oauth` as a child process. Scopes, client types, SASL mechanism and
default grants are the presets' own.
"""

from __future__ import annotations

import json
import poplib
import re
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_config import config_head, listen
from tests.harness.gateway_process import free_port
from tests.harness.oauth_server import OAuthServerProcess
from tests.helpers.oauth_gateway import (
    authorize_on_the_command_line,
    deliver_one,
    gateway_command,
    idp_fixture,
    introspecting_dovecot,
    running_gateway,
    secret_file,
)
from tests.helpers.pop3 import HASHER
from tests.integration.test_oauth_gateway import cli_status, gateway_cli

pytestmark = pytest.mark.integration

CLIENT_SECRET = "presets-client-secret"
USERS = {"alice": "alice-pw", "bob": "bob-pw"}
SERVICE_ACCOUNT = "gateway@project.iam.gserviceaccount.com"
# account -> (provider, username, grant line)
ACCOUNTS = {
    "m365": ("m365", "alice", ""),
    "outlook": ("outlook", "alice", ""),
    "gmail": ("gmail", "alice", ""),
    "m365-app": ("m365", "bob", 'grant = "client_credentials"'),
    "gmail-sa": ("gmail", "alice", 'grant = "service_account"'),
}


idp = idp_fixture(
    CLIENT_SECRET,
    mode="providers",
    device_interval=1,
    client_credentials_user="bob",
    consent_user="alice",
)
presets_dovecot = introspecting_dovecot("dovecot-presets", USERS)


def config_text(
    base: Path, port: int, dovecot: Dovecot, upstream: TLSMaterial, own: TLSMaterial, idp: Any
) -> str:
    secret = secret_file(base, CLIENT_SECRET)
    key = base / "service-account.json"
    key.write_text(
        json.dumps(idp.control("service_account", email=SERVICE_ACCOUNT, mailboxes=["alice"]))
    )
    key.chmod(0o600)
    pop3 = f'pop3 = {{ host = "localhost", port = {dovecot.pop3s_port}, tls = "implicit" }}'
    common = [pop3, f'ca_file = "{upstream.ca_file}"', "timeout = 5", 'client_id = "gateway"']
    entra = f"{idp.url}/{{tenant}}/oauth2/v2.0"
    providers = {
        "m365": [
            'preset = "microsoft365"',
            'tenant = "contoso.onmicrosoft.com"',
            f'client_secret_file = "{secret}"',
            'oauth = { token_url = "%s/token", device_authorization_url = "%s/devicecode" }'
            % ((entra.format(tenant="contoso.onmicrosoft.com"),) * 2),
        ],
        "outlook": [
            'preset = "outlook"',
            'oauth = { token_url = "%s/token", device_authorization_url = "%s/devicecode" }'
            % ((entra.format(tenant="consumers"),) * 2),
        ],
        "gmail": [
            'preset = "gmail"',
            f'client_secret_file = "{secret}"',
            f'service_account_file = "{key}"',
            f'oauth = {{ token_url = "{idp.url}/google/token", '
            f'authorization_url = "{idp.url}/google/o/oauth2/v2/auth", '
            f'revocation_url = "{idp.url}/google/revoke" }}',
        ],
    }
    lines = [
        *config_head(base / "state", own),
        *listen("pop3", port, "implicit"),
    ]
    for name, keys in providers.items():
        lines += [f"[providers.{name}]", *common, *keys]
    for name, (provider, username, grant) in ACCOUNTS.items():
        lines += [
            f"[accounts.{name}]",
            f'provider = "{provider}"\nusername = "{username}"\nauth = "oauth2"\n{grant}',
            f'[devices.{name}-dev]\npassword_hash = "{HASHER.hash(name + "-pw")}"\n'
            f'account = "{name}"\nallow_from = ["127.0.0.0/8"]\nprotocols = ["pop3"]',
        ]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
    presets_dovecot: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    idp: OAuthServerProcess,
) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("gateway-presets")
    port = free_port()
    text = config_text(base, port, presets_dovecot, tls_upstream, tls_gateway, idp)
    with running_gateway(base, text, port) as setup:
        yield setup


@pytest.fixture
def env(setup: dict[str, Any], presets_dovecot: Dovecot) -> dict[str, Any]:
    for user in USERS:
        presets_dovecot.clear(user)
    return setup


def fetch_all(env: dict[str, Any], ctx: ssl.SSLContext, device: str) -> list[bytes]:
    client = poplib.POP3_SSL("localhost", env["port"], context=ctx, timeout=30)
    client.user(device)
    client.pass_(f"{device.removesuffix('-dev')}-pw")
    count, _ = client.stat()
    messages = [b"\r\n".join(client.retr(i)[1]) + b"\r\n" for i in range(1, count + 1)]
    client.quit()
    return messages


def authorize_by_device_code(env: dict[str, Any], idp: OAuthServerProcess, account: str) -> None:
    """`gateway oauth authorize ACCOUNT` with alice approving the device code."""
    seen, _out, _err = authorize_on_the_command_line(env["base"] / "gateway.toml", idp, account)
    assert "device code grant" in seen


def authorize_gmail_by_code_grant(env: dict[str, Any]) -> None:
    """`gateway oauth authorize gmail`, with the browser's part played here."""
    # Standard input stays open: its end would tell the command that nothing
    # will be pasted, and it would stop listening.
    process = gateway_command(
        env["base"] / "gateway.toml", "oauth", "authorize", "gmail", stdin=subprocess.PIPE
    )
    assert process.stdout is not None
    seen = ""
    while "/google/o/oauth2/v2/auth?" not in seen:
        line = process.stdout.readline()
        assert line, process.communicate()[1]
        seen += line
    assert "authorization code grant" in seen
    url = re.search(r"(http://\S+/auth\?\S+)", seen).group(1)  # type: ignore[union-attr]
    assert "access_type=offline" in url
    # The browser: Google redirects to http://127.0.0.1:PORT, where the command listens.
    with pytest.raises(urllib.error.HTTPError) as redirect:
        urllib.request.build_opener(_NoRedirects).open(url, timeout=10)
    location = redirect.value.headers["Location"]
    assert re.match(r"http://127\.0\.0\.1:\d+\?code=", location), location
    # What a browser requests for a URL without a path: "/".
    with urllib.request.urlopen(location.replace("?", "/?", 1), timeout=10) as page:
        assert b"Signed in" in page.read()
    _out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err


# -- the delegated default paths -------------------------------------------------------------


@pytest.mark.parametrize("account", ["m365", "outlook"])
def test_microsoft_device_code_default_as_a_public_client(
    env: dict[str, Any],
    idp: OAuthServerProcess,
    presets_dovecot: Dovecot,
    ctx: ssl.SSLContext,
    account: str,
) -> None:
    before = idp.stats()["counts"]
    authorize_by_device_code(env, idp, account)
    expected = deliver_one(presets_dovecot, "alice")
    assert fetch_all(env, ctx, f"{account}-dev") == [expected]
    assert "method=XOAUTH2" in presets_dovecot.log_text()
    counts = idp.stats()["counts"]
    # Entra refuses a secret from a public client (AADSTS700025): none was sent,
    # although the m365 provider holds one for its app-only account.
    assert counts.get("secret_from_public_client", 0) == 0
    for grant in ("urn:ietf:params:oauth:grant-type:device_code", "refresh_token"):
        key = f"secret:{grant}"
        assert counts.get(key, 0) == before.get(key, 0)


def test_gmail_code_grant_with_the_loopback_ip_redirect(
    env: dict[str, Any], idp: OAuthServerProcess, presets_dovecot: Dovecot, ctx: ssl.SSLContext
) -> None:
    authorize_gmail_by_code_grant(env)
    expected = deliver_one(presets_dovecot, "alice")
    assert fetch_all(env, ctx, "gmail-dev") == [expected]
    # Google keeps the refresh token and wants the desktop client's secret.
    assert idp.count("secret:authorization_code") >= 1


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Hand the redirect back (as an HTTPError) instead of following it."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# -- app-only: no authorize at all ------------------------------------------------------------


@pytest.mark.parametrize(("account", "user"), [("m365-app", "bob"), ("gmail-sa", "alice")])
def test_app_only_accounts_work_without_authorize(
    env: dict[str, Any],
    idp: OAuthServerProcess,
    presets_dovecot: Dovecot,
    ctx: ssl.SSLContext,
    account: str,
    user: str,
) -> None:
    status = cli_status(env)[account]
    assert status["state"] in ("app_only", "ok")
    expected = deliver_one(presets_dovecot, user)
    assert fetch_all(env, ctx, f"{account}-dev") == [expected]
    assert cli_status(env)[account]["state"] == "ok"
    if account == "gmail-sa":
        assert idp.count("jwt_bearer:alice") >= 1
    env["gateway"].wait_for_log(f"oauth account {account}: access token fetched (app-only)")


# -- refusals, as the admin sees them ----------------------------------------------------------


def test_revoke_calls_googles_revocation_endpoint(
    env: dict[str, Any], idp: OAuthServerProcess
) -> None:
    if cli_status(env)["gmail"]["state"] != "ok":  # run on its own
        authorize_gmail_by_code_grant(env)
    revocations = idp.count("revoke")
    process = gateway_cli(env, "oauth", "revoke", "gmail")
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "The provider revoked the grant too." in out
    assert idp.count("revoke") == revocations + 1
    assert cli_status(env)["gmail"]["state"] == "revoked"
    process = gateway_cli(env, "oauth", "revoke", "m365")
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "no revocation endpoint (Microsoft has none for refresh tokens)" in out


def test_a_revoked_microsoft_grant_shows_its_aadsts_code_and_advice(
    env: dict[str, Any], idp: OAuthServerProcess, ctx: ssl.SSLContext
) -> None:
    if cli_status(env)["outlook"]["state"] != "ok":  # run on its own
        authorize_by_device_code(env, idp, "outlook")
    idp.control("revoke", username="alice")  # its access tokens die with it
    with pytest.raises(poplib.error_proto) as info:
        fetch_all(env, ctx, "outlook-dev")
    assert b"SYS/PERM" in info.value.args[0]
    status = cli_status(env)["outlook"]
    assert (status["state"], status["error_kind"], status["error_code"]) == (
        "needs_reauth",
        "reauthorize",
        "AADSTS50173",
    )
    assert "gateway oauth authorize outlook" in status["error_advice"]
    env["gateway"].wait_for_log("(AADSTS50173)")
