"""A twistd gateway whose state backend is PostgreSQL keeps its OAuth2 tokens
in the shared table: `gateway oauth authorize` stores them there, devices log
in with them, and a crowd of logins with an expired token makes one refresh
whose rotated refresh token is committed to the table."""

from __future__ import annotations

import poplib
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.config.loader import load_config
from gateway.oauth.admin import fired
from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_config import config_head, listen
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.harness.oauth_server import OAuthServerProcess
from tests.harness.postgres import PostgresCluster
from tests.helpers.oauth_gateway import (
    Crowd,
    authorize_on_the_command_line,
    deliver_one,
    idp_fixture,
    introspecting_dovecot,
    oauth_account,
    oauth_provider,
    pop3_login,
    retrieve_all,
    secret_file,
)
from tests.helpers.pop3 import device
from tests.helpers.state import migrated_database, state_toml
from tests.helpers.token_stores import command_store, seed_expired_grant

pytestmark = pytest.mark.integration

CLIENT_SECRET = "pg-client-secret"
CROWD = 20
REFRESH = "token:refresh_token"


idp = idp_fixture(CLIENT_SECRET, device_interval=1)
oauth_dovecot = introspecting_dovecot("dovecot-oauth-pg", {"alice": "alice-pw"})


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory,
    postgres: PostgresCluster,
    oauth_dovecot: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    idp: OAuthServerProcess,
) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("gateway-oauth-pg")
    dsn = migrated_database(postgres)
    port = free_port()
    secret = secret_file(base, CLIENT_SECRET)
    lines = [
        *config_head(base / "state", tls_gateway),
        *listen("pop3", port, "implicit"),
        "[limits]",
        f"max_connections_per_address = {CROWD + 10}",
        *oauth_provider(
            "idp",
            idp,
            oauth_dovecot,
            tls_upstream,
            secret,
            'sasl = "xoauth2"',
            authorization_url=False,
        ),
    ]
    # "crowd" is seeded by its test, unused before: nothing of it in memory.
    for account in ("scanner", "crowd"):
        lines += oauth_account(account, "idp", "alice", "device_code")
    lines.append(device("printer", "scanner"))
    lines += [device(f"dev{n:02d}", "crowd") for n in range(CROWD)]
    text = "\n".join(lines) + "\n" + state_toml(dsn)
    gateway = GatewayProcess(base, text, [port])
    gateway.start()
    try:
        yield {"gateway": gateway, "port": port, "base": base, "dsn": dsn}
    finally:
        gateway.stop()


def test_authorize_stores_in_the_table_and_a_device_fetches_mail(
    node: dict[str, Any],
    idp: OAuthServerProcess,
    oauth_dovecot: Dovecot,
    postgres: PostgresCluster,
    ctx: ssl.SSLContext,
) -> None:
    _, out, _ = authorize_on_the_command_line(node["base"] / "gateway.toml", idp, "scanner")
    assert "Authorised: tokens for account scanner stored" in out
    [(state,)] = postgres.query(
        node["dsn"], "SELECT state FROM gateway_oauth_tokens WHERE account = 'scanner'"
    )
    assert state == "ok"
    assert not list((node["base"] / "state" / "oauth").glob("*.token"))
    oauth_dovecot.clear("alice")
    expected = deliver_one(oauth_dovecot)
    client = pop3_login(node["port"], ctx, "printer")
    assert retrieve_all(client) == [expected]
    client.quit()


def test_a_crowd_with_an_expired_token_makes_one_refresh_committed_to_the_table(
    node: dict[str, Any], idp: OAuthServerProcess, ctx: ssl.SSLContext
) -> None:
    config = load_config(node["base"] / "gateway.toml")
    store = command_store(config)
    answer = seed_expired_grant(store, "crowd", idp, CLIENT_SECRET)
    idp.control("reset_counts")
    devices = [f"dev{n:02d}" for n in range(CROWD)]
    answers = Crowd(node["port"], ctx, devices, session=poplib.POP3_SSL.stat).start().join()
    # One POP3 session per mailbox: the others are told [IN-USE], as by any
    # POP3 server (the cross-process race itself is
    # test_oauth_token_backends' two token managers).
    assert len(answers) == CROWD and "ok" in answers
    assert all(a == "ok" or a.startswith("-ERR [IN-USE]") for a in answers), answers
    assert idp.count(REFRESH) == 1
    stored = fired(store.fetch("crowd"))
    assert stored is not None and stored.tokens is not None
    assert stored.tokens.refresh_token is not None
    assert stored.tokens.refresh_token.reveal() != answer["refresh_token"]
    assert stored.tokens.valid_at(time.time())
