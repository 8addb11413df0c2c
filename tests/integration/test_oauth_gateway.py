"""OAuth2 accounts end to end: the real twistd gateway, a real Dovecot whose
oauth2 passdb introspects bearer tokens at the test authorization server (a
child process), devices on poplib with their local passwords, and the admin's
`gateway oauth` command as a child process."""

from __future__ import annotations

import json
import poplib
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from gateway.oauth.keys import GatewayKey, encode_key, new_key
from gateway.oauth.store import TokenRecord, TokenStore
from gateway.oauth.tokens import parse_token_response
from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_config import config_head, listen
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.harness.oauth_server import OAuthServerProcess
from tests.helpers import device_grant
from tests.helpers.device_grant import store_for
from tests.helpers.oauth import oauth_config
from tests.helpers.oauth_gateway import (
    Crowd,
    authorize_on_the_command_line,
    deliver_one,
    gateway_command,
    idp_fixture,
    introspecting_dovecot,
    oauth_account,
    oauth_provider,
    pop3_login,
    retrieve_all,
    running_gateway,
    secret_file,
)
from tests.helpers.pop3 import device
from tests.helpers.token_stores import seed_answer

pytestmark = pytest.mark.integration

CLIENT_SECRET = "integration-client-secret"
USERS = {"alice": "alice-pw", "bob": "bob-pw"}
CROWD = 50
REFRESH = "token:refresh_token"


# -- fixtures: one auth server, one Dovecot, one gateway for the module --------------------


idp = idp_fixture(CLIENT_SECRET, device_interval=1, client_credentials_user="bob")
oauth_dovecot = introspecting_dovecot("dovecot-oauth", USERS)


def config_text(
    base: Path,
    port: int,
    dovecot: Dovecot,
    upstream: TLSMaterial,
    own: TLSMaterial,
    idp: OAuthServerProcess,
) -> str:
    secret = secret_file(base, CLIENT_SECRET)
    lines = [
        *config_head(base / "state", own),
        *listen("pop3", port, "implicit"),
        "[oauth]",
        "refresh_margin = 60",
        "idle_refresh_interval = 86400",
        # The crowd of devices all connect from 127.0.0.1 at once.
        "[limits]",
        f"max_connections_per_address = {CROWD + 10}",
    ]
    # Dovecot offers both: "idp" forces XOAUTH2, "idp-bearer" picks OAUTHBEARER itself.
    for name, extra in (("idp", 'sasl = "xoauth2"'), ("idp-bearer", "")):
        lines += oauth_provider(name, idp, dovecot, upstream, secret, "timeout = 5", extra)
    lines += [
        *oauth_account("scanner", "idp", "alice", "device_code"),
        *oauth_account("bearer", "idp-bearer", "alice"),
        *oauth_account("app", "idp", "bob", "client_credentials"),
        "[accounts.plain]",
        'provider = "idp"\nusername = "bob"\npassword = "bob-pw"',
    ]
    devices = [
        ("printer", "scanner"),
        ("bearer-dev", "bearer"),
        ("app-dev", "app"),
        ("plain-dev", "plain"),
    ]
    devices += [(f"crowd{n:02d}", "scanner") for n in range(CROWD)]
    lines += [device(name, account) for name, account in devices]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
    oauth_dovecot: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    idp: OAuthServerProcess,
) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("gateway-oauth")
    port = free_port()
    text = config_text(base, port, oauth_dovecot, tls_upstream, tls_gateway, idp)
    with running_gateway(base, text, port) as setup:
        yield setup


@pytest.fixture
def env(setup: dict[str, Any], oauth_dovecot: Dovecot, idp: OAuthServerProcess) -> dict[str, Any]:
    for user in USERS:
        oauth_dovecot.clear(user)
    idp.control("set", access_ttl=3600, token_length=40)
    return setup


# -- helpers --------------------------------------------------------------------------------


def device_login(port: int, ctx: ssl.SSLContext, device: str = "printer") -> poplib.POP3_SSL:
    return pop3_login(port, ctx, device)


def refused(port: int, ctx: ssl.SSLContext, device: str = "printer") -> str:
    with pytest.raises(poplib.error_proto) as info:
        device_login(port, ctx, device).quit()
    return info.value.args[0].decode()


def device_grant_tokens(idp: OAuthServerProcess, username: str = "alice") -> dict[str, Any]:
    """What a completed device grant returns (as if an admin had signed in)."""
    return device_grant.device_grant_tokens(idp, CLIENT_SECRET, username)


def authorize_directly(
    state: Path, idp: OAuthServerProcess, account: str = "scanner", *, expired: bool = False
) -> TokenRecord:
    """Store tokens for `account` the way `gateway oauth authorize` does; `expired`
    dates the access token in the past (it expired while the gateway was down)."""
    issued = time.time() - 7200 if expired else None
    return seed_answer(store_for(state), account, device_grant_tokens(idp), issued=issued)


def gateway_cli(setup: dict[str, Any], *args: str) -> subprocess.Popen[str]:
    return gateway_command(setup["base"] / "gateway.toml", *args)


def cli_status(setup: dict[str, Any]) -> dict[str, dict[str, Any]]:
    process = gateway_cli(setup, "oauth", "status", "--json")
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    return {entry["account"]: entry for entry in json.loads(out)["accounts"]}


# -- the admin's flow, then devices ----------------------------------------------------------


def test_admin_authorizes_with_the_cli_then_a_device_fetches_mail(
    env: dict[str, Any], idp: OAuthServerProcess, oauth_dovecot: Dovecot, ctx: ssl.SSLContext
) -> None:
    seen, out, err = authorize_on_the_command_line(env["base"] / "gateway.toml", idp, "scanner")
    assert f"{idp.url}/verify" in seen
    assert "Authorised: tokens for account scanner stored" in out
    assert CLIENT_SECRET not in seen + out + err

    expected = deliver_one(oauth_dovecot)
    client = device_login(env["port"], ctx)
    assert retrieve_all(client) == [expected]
    client.quit()
    assert "method=XOAUTH2" in oauth_dovecot.log_text()
    status = cli_status(env)["scanner"]
    assert status["state"] == "ok" and status["access_token_valid"]


def test_oauthbearer_and_a_two_step_auth_with_a_real_sized_token(
    env: dict[str, Any], idp: OAuthServerProcess, oauth_dovecot: Dovecot, ctx: ssl.SSLContext
) -> None:
    idp.control("set", token_length=1500)
    authorize_directly(env["state"], idp, "bearer")
    deliver_one(oauth_dovecot)
    client = device_login(env["port"], ctx, "bearer-dev")
    assert client.stat()[0] == 1
    client.quit()
    assert "method=OAUTHBEARER" in oauth_dovecot.log_text()


def test_client_credentials_account(
    env: dict[str, Any], idp: OAuthServerProcess, oauth_dovecot: Dovecot, ctx: ssl.SSLContext
) -> None:
    process = gateway_cli(env, "oauth", "authorize", "app", "--json")
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    result = json.loads(out)
    assert result["grant"] == "client_credentials" and result["refresh_token"] is False
    expected = deliver_one(oauth_dovecot, "bob")
    client = device_login(env["port"], ctx, "app-dev")
    assert retrieve_all(client) == [expected]
    client.quit()


# -- refresh --------------------------------------------------------------------------------------


def test_token_expired_at_the_provider_is_refreshed_transparently(
    env: dict[str, Any], idp: OAuthServerProcess, oauth_dovecot: Dovecot, ctx: ssl.SSLContext
) -> None:
    authorize_directly(env["state"], idp)
    idp.control("reset_counts")
    # The provider ends the access token early; the gateway still thinks it is
    # good, meets a 401 at Dovecot, refreshes once and logs in again.
    idp.control("expire_access", username="alice")
    expected = deliver_one(oauth_dovecot)
    client = device_login(env["port"], ctx)
    assert retrieve_all(client) == [expected]
    client.quit()
    assert idp.count(REFRESH) == 1
    env["gateway"].wait_for_log("refreshing it once and retrying")
    assert "status=401" in env["gateway"].log_text()


def test_token_the_gateway_knows_expired_is_refreshed_before_login(
    env: dict[str, Any], idp: OAuthServerProcess, oauth_dovecot: Dovecot, ctx: ssl.SSLContext
) -> None:
    authorize_directly(env["state"], idp, expired=True)
    idp.control("reset_counts")
    introspections = idp.count("introspect")
    client = device_login(env["port"], ctx)
    client.quit()
    assert idp.count(REFRESH) == 1
    # Dovecot saw exactly one token: the fresh one (no failed attempt first).
    assert idp.count("introspect") == introspections + 1
    saved = store_for(env["state"]).load("scanner")
    assert saved is not None and saved.tokens is not None
    assert saved.tokens.valid_at(time.time())


def test_fifty_concurrent_logins_with_an_expired_token_one_refresh(
    env: dict[str, Any], idp: OAuthServerProcess, oauth_dovecot: Dovecot, ctx: ssl.SSLContext
) -> None:
    """Fifty devices of one account log in at once while its token is expired.

    The gateway lets one POP3 session per account run at a time (the others
    get [IN-USE], as from any POP3 server), so here the single refresh is
    also the work of that lock; the single flight itself, with fifty callers
    waiting on one refresh in flight over real HTTP, is
    `test_single_flight_over_real_http` below.
    """
    authorize_directly(env["state"], idp, expired=True)
    idp.control("reset_counts")
    deliver_one(oauth_dovecot)
    answers = Crowd(env["port"], ctx, [f"crowd{n:02d}" for n in range(CROWD)]).start().join()
    assert len(answers) == CROWD
    assert "ok" in answers
    assert all(a == "ok" or a.startswith("-ERR [IN-USE]") for a in answers), answers
    assert idp.count(REFRESH) == 1
    # Every later login uses the refreshed token.
    device_login(env["port"], ctx).quit()
    assert idp.count(REFRESH) == 1


def test_revoked_grant_tells_the_device_and_the_admin(
    env: dict[str, Any], idp: OAuthServerProcess, ctx: ssl.SSLContext
) -> None:
    authorize_directly(env["state"], idp)
    idp.control("revoke", username="alice")
    answer = refused(env["port"], ctx)
    assert answer == "-ERR [SYS/PERM] mailbox authorisation expired, ask the administrator"
    log = env["gateway"].wait_for_log("refused the token refresh (invalid_grant)")
    assert "gateway oauth authorize scanner" in log
    status = cli_status(env)["scanner"]
    assert status["state"] == "needs_reauth" and status["last_error"].startswith("invalid_grant")
    # Re-authorising fixes it at once, without a restart.
    authorize_directly(env["state"], idp)
    device_login(env["port"], ctx).quit()
    assert cli_status(env)["scanner"]["state"] == "ok"


def test_revoke_command(env: dict[str, Any], idp: OAuthServerProcess, ctx: ssl.SSLContext) -> None:
    authorize_directly(env["state"], idp)
    device_login(env["port"], ctx).quit()
    process = gateway_cli(env, "oauth", "revoke", "scanner")
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "tokens deleted" in out
    answer = refused(env["port"], ctx)
    assert answer == "-ERR [SYS/PERM] mailbox not authorised yet, ask the administrator"
    assert cli_status(env)["scanner"]["state"] == "revoked"


# -- the store across restarts, keys and damage ----------------------------------------------


def test_restart_keeps_the_tokens(
    env: dict[str, Any], idp: OAuthServerProcess, ctx: ssl.SSLContext
) -> None:
    authorize_directly(env["state"], idp)
    gateway: GatewayProcess = env["gateway"]
    gateway.stop()
    gateway.start()
    idp.control("reset_counts")
    device_login(env["port"], ctx).quit()
    assert idp.count(REFRESH) == 0  # decrypted from disk, not fetched again
    assert idp.count("introspect") == 1


def test_wrong_key_is_a_clear_error(
    env: dict[str, Any], idp: OAuthServerProcess, ctx: ssl.SSLContext
) -> None:
    authorize_directly(env["state"], idp)
    gateway: GatewayProcess = env["gateway"]
    key_file = env["state"] / "gateway.key"
    good = key_file.read_text()
    gateway.stop()
    key_file.write_text(encode_key(new_key()) + "\n")
    try:
        gateway.start()
        answer = refused(env["port"], ctx)
        assert answer == (
            "-ERR [SYS/PERM] gateway cannot use its stored authorisation, ask the administrator"
        )
        log = gateway.wait_for_log("encrypted with a different gateway key")
        assert "Traceback" not in log
        # Password accounts are not affected.
        device_login(env["port"], ctx, "plain-dev").quit()
        status = cli_status(env)["scanner"]
        assert status["state"] == "unreadable" and "wrong key" in status["last_error"]
    finally:
        gateway.stop()
        key_file.write_text(good)
        gateway.start()
    device_login(env["port"], ctx).quit()


def test_torn_store_file_is_a_clear_error(
    env: dict[str, Any], idp: OAuthServerProcess, ctx: ssl.SSLContext
) -> None:
    authorize_directly(env["state"], idp)
    path = store_for(env["state"]).path_for("scanner")
    path.write_bytes(path.read_bytes()[:30])  # a write torn by a crash (not ours: atomic)
    answer = refused(env["port"], ctx)
    assert answer.startswith("-ERR [SYS/PERM] gateway cannot use its stored authorisation")
    env["gateway"].wait_for_log("truncated")
    assert env["gateway"].process.poll() is None  # still running
    assert cli_status(env)["scanner"]["state"] == "unreadable"
    authorize_directly(env["state"], idp)  # the admin authorises again
    device_login(env["port"], ctx).quit()


def test_no_secret_in_any_log(
    env: dict[str, Any], idp: OAuthServerProcess, oauth_dovecot: Dovecot
) -> None:
    log = env["gateway"].log_text()
    assert "oauth account" in log and "refreshed" in log
    secrets = idp.control("secrets")["secrets"]
    assert len(secrets) > 10
    for secret in [*secrets, CLIENT_SECRET]:
        assert secret not in log
    assert "Bearer " not in log


# -- the single flight, over real HTTP ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_single_flight_over_real_http(tmp_path: Path) -> None:
    """Fifty concurrent token requests for one account with an expired token,
    against the authorization server over loopback HTTP: one refresh request."""
    from twisted.internet import reactor
    from twisted.internet.defer import DeferredList, ensureDeferred
    from twisted.internet.task import deferLater

    from gateway.oauth.http import TreqPoster
    from gateway.oauth.manager import TokenManager
    from tests.harness.oauth_server import AuthServer

    server = AuthServer(client_secret=CLIENT_SECRET)
    port = server.listen(reactor)
    try:
        config = oauth_config(tmp_path / "state", server.base_url, secret=CLIENT_SECRET)
        key = GatewayKey(new_key(), "test")
        store = TokenStore.open(config.state_dir, key)
        answer = server._issue("alice", "gateway", "mail", refresh=True)
        tokens = parse_token_response(answer, time.time() - 7200)  # long expired
        store.update(
            "scanner",
            lambda _: TokenRecord.authorized("scanner", "device_code", tokens, time.time()),
        )
        manager = TokenManager(config, clock=reactor, poster=TreqPoster(reactor), store=store)
        server.hold = True
        account = config.accounts["scanner"]
        calls = [ensureDeferred(manager.access_token(account)) for _ in range(CROWD)]
        while not server.held:
            await deferLater(reactor, 0.01, lambda: None)
        await deferLater(reactor, 0.1, lambda: None)
        assert len(server.held) == 1 and not any(d.called for d in calls)
        server.release()
        results = await DeferredList(calls, fireOnOneErrback=True, consumeErrors=True)
        assert len({token for _, token in results}) == 1
        assert server.counts[REFRESH] == 1
    finally:
        await port.stopListening()
