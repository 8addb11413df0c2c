"""A twistd gateway whose state backend is PostgreSQL keeps its OAuth2 tokens
in the shared table: `gateway oauth authorize` stores them there, devices log
in with them, and a crowd of logins with an expired token makes one refresh
whose rotated refresh token is committed to the table."""

from __future__ import annotations

import poplib
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.config.loader import load_config
from gateway.oauth.admin import fired
from gateway.oauth.keys import load_key
from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_config import config_head, listen
from tests.harness.gateway_process import REPO_ROOT, GatewayProcess, free_port
from tests.harness.oauth_server import OAuthServerProcess
from tests.harness.postgres import PostgresCluster
from tests.helpers.device_grant import device_grant_tokens
from tests.helpers.pop3 import HASHER, crlf, message
from tests.helpers.state import migrated_database, state_toml
from tests.helpers.token_stores import command_store, seed_answer

pytestmark = pytest.mark.integration

CLIENT_SECRET = "pg-client-secret"
CROWD = 20
REFRESH = "token:refresh_token"


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OAuthServerProcess]:
    with OAuthServerProcess(
        tmp_path_factory.mktemp("idp"), client_secret=CLIENT_SECRET, device_interval=1
    ) as server:
        yield server


@pytest.fixture(scope="module")
def oauth_dovecot(
    tmp_path_factory: pytest.TempPathFactory, tls_upstream: TLSMaterial, idp: OAuthServerProcess
) -> Iterator[Dovecot]:
    with Dovecot(
        tmp_path_factory.mktemp("dovecot-oauth-pg"),
        {"alice": "alice-pw"},
        tls=tls_upstream,
        oauth2_introspection_url=f"{idp.url}/introspect",
    ) as server:
        yield server


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
    secret = base / "client-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    secret.chmod(0o600)
    lines = [
        *config_head(base / "state", tls_gateway),
        *listen("pop3", port, "implicit"),
        "[limits]",
        f"max_connections_per_address = {CROWD + 10}",
        "[providers.idp]",
        f'pop3 = {{ host = "localhost", port = {oauth_dovecot.pop3s_port}, tls = "implicit" }}',
        f'ca_file = "{tls_upstream.ca_file}"',
        'sasl = "xoauth2"',
        f'oauth = {{ token_url = "{idp.url}/token", '
        f'device_authorization_url = "{idp.url}/device", client_id = "gateway", '
        f'client_secret_file = "{secret}", scopes = ["mail", "offline_access"] }}',
    ]
    # "crowd" is seeded by its test, unused before: nothing of it in memory.
    for account in ("scanner", "crowd"):
        lines += [
            f"[accounts.{account}]",
            'provider = "idp"\nusername = "alice"\nauth = "oauth2"\ngrant = "device_code"',
        ]
    devices = [("printer", "scanner")] + [(f"dev{n:02d}", "crowd") for n in range(CROWD)]
    for device, account in devices:
        lines.append(
            f'[devices.{device}]\npassword_hash = "{HASHER.hash(f"{device}-pw")}"\n'
            f'account = "{account}"\nallow_from = ["127.0.0.0/8"]'
        )
    text = "\n".join(lines) + "\n" + state_toml(dsn)
    gateway = GatewayProcess(base, text, [port])
    gateway.start()
    try:
        yield {"gateway": gateway, "port": port, "base": base, "dsn": dsn}
    finally:
        gateway.stop()


def _cli(node: dict[str, Any], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "--config",
            str(node["base"] / "gateway.toml"),
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=REPO_ROOT,
    )


def _login(port: int, ctx: ssl.SSLContext, device: str) -> poplib.POP3_SSL:
    client = poplib.POP3_SSL("localhost", port, context=ctx, timeout=30)
    client.user(device)
    client.pass_(f"{device}-pw")
    return client


def test_authorize_stores_in_the_table_and_a_device_fetches_mail(
    node: dict[str, Any],
    idp: OAuthServerProcess,
    oauth_dovecot: Dovecot,
    postgres: PostgresCluster,
    ctx: ssl.SSLContext,
) -> None:
    process = _cli(node, "oauth", "authorize", "scanner")
    assert process.stdout is not None
    seen = ""
    while "enter the code" not in seen:
        line = process.stdout.readline()
        assert line, process.communicate()[1]
        seen += line
    user_code = seen.split("enter the code")[1].split()[0]
    idp.control("approve", user_code=user_code, username="alice")
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "Authorised: tokens for account scanner stored" in out
    [(state,)] = postgres.query(
        node["dsn"], "SELECT state FROM gateway_oauth_tokens WHERE account = 'scanner'"
    )
    assert state == "ok"
    assert not list((node["base"] / "state" / "oauth").glob("*.token"))
    oauth_dovecot.clear("alice")
    oauth_dovecot.deliver("alice", message(1))
    expected = crlf(oauth_dovecot.messages("alice")[0])
    client = _login(node["port"], ctx, "printer")
    count, _ = client.stat()
    assert count == 1 and b"\r\n".join(client.retr(1)[1]) + b"\r\n" == expected
    client.quit()


def test_a_crowd_with_an_expired_token_makes_one_refresh_committed_to_the_table(
    node: dict[str, Any], idp: OAuthServerProcess, ctx: ssl.SSLContext
) -> None:
    config = load_config(node["base"] / "gateway.toml")
    store = command_store(config, load_key(config.oauth, config.state_dir, environ={}))
    answer = device_grant_tokens(idp, CLIENT_SECRET)
    seed_answer(store, "crowd", answer, issued=time.time() - 7200)
    idp.control("reset_counts")
    barrier = threading.Barrier(CROWD)
    answers: list[str] = []

    def login(n: int) -> None:
        barrier.wait()
        try:
            client = _login(node["port"], ctx, f"dev{n:02d}")
            client.stat()
            client.quit()
            answers.append("ok")
        except poplib.error_proto as e:
            answers.append(e.args[0].decode())

    threads = [threading.Thread(target=login, args=(n,)) for n in range(CROWD)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
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
