"""The token manager's Graph tokens through the real gateway (twistd child
process) and `gateway check` (child process): the Graph emulator (a thread of
this process) accepts a token only if the suite's authorization server (a
child process, strict refresh-token rotation) says by introspection that it
carries Graph's scopes, which the mail token an admin authorised does not."""

from __future__ import annotations

import json
import poplib
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.model import OAuthSettings
from gateway.oauth.keys import load_key
from gateway.oauth.store import TokenRecord, TokenStore
from tests.harness.certs import TLSMaterial
from tests.harness.gateway_process import REPO_ROOT, GatewayProcess, free_port
from tests.harness.graph_emulator import GraphEmulator, IntrospectedTokens
from tests.harness.oauth_server import OAuthServerProcess
from tests.helpers.device_grant import store_device_grant
from tests.helpers.graph import graph_gateway_config

pytestmark = pytest.mark.integration

CLIENT_SECRET = "graph-token-secret"
# The provider's graph_url is the emulator's (http://127.0.0.1:PORT/v1.0):
# the gateway asks for Graph's scopes on that host.
GRAPH_SCOPES = ("https://127.0.0.1/Mail.ReadWrite", "https://127.0.0.1/Mail.Send")
ACCOUNTS: dict[str, dict[str, Any]] = {"scanner": {}, "checked": {}, "lost": {"folder": "Nope"}}


class AllScopes:
    """Every one of `scopes`, each checked by introspection."""

    def __init__(self, introspect_url: str, scopes: tuple[str, ...]) -> None:
        self.checks = [IntrospectedTokens(introspect_url, scope) for scope in scopes]

    def __call__(self, token: str, mailbox: str, kind: str = "") -> tuple[int, str] | None:
        for check in self.checks:
            refused = check(token, mailbox, kind)
            if refused is not None:
                return refused
        return None


def authorize(state: Path, idp: OAuthServerProcess, account: str) -> None:
    """Mail tokens for alice, stored as `gateway oauth authorize` would."""
    store_device_grant(state, idp, account, CLIENT_SECRET, "alice")


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OAuthServerProcess]:
    with OAuthServerProcess(tmp_path_factory.mktemp("idp-gt"), client_secret=CLIENT_SECRET) as s:
        yield s


@pytest.fixture(scope="module")
def graph(idp: OAuthServerProcess) -> Iterator[GraphEmulator]:
    with GraphEmulator(AllScopes(f"{idp.url}/introspect", GRAPH_SCOPES)) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {"implicit": free_port(), "starttls": free_port()}


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    graph: GraphEmulator,
    idp: OAuthServerProcess,
    tls_gateway: TLSMaterial,
    ports: dict[str, int],
) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("gateway-gt")
    secret = base / "client-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    secret.chmod(0o600)
    state = base / "state"
    text = graph_gateway_config(
        state, ports, graph.url, idp.url, secret, tls_gateway, ACCOUNTS, {"printer": "scanner"}
    )
    for name in ACCOUNTS:
        authorize(state, idp, name)
    with GatewayProcess(base, text, list(ports.values())) as gw:
        yield gw


def record(gateway: GatewayProcess, account: str) -> TokenRecord:
    state = gateway.base_dir / "state"
    store = TokenStore.open(state, load_key(OAuthSettings(), state, environ={}))
    found = store.load(account)
    assert found is not None
    return found


def graph_status(graph: GraphEmulator, token: str) -> int:
    request = urllib.request.Request(
        f"{graph.url}/users/alice/mailFolders/inbox", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_a_graph_account_gets_a_token_with_graphs_scopes(
    gateway: GatewayProcess, graph: GraphEmulator, ctx: ssl.SSLContext, ports: dict[str, int]
) -> None:
    box = graph.mailbox("alice")
    box.add(b"Subject: scan\r\n\r\npage\r\n")
    authorised = record(gateway, "scanner")
    assert authorised.tokens is not None and authorised.graph_tokens is None
    # The token the admin authorised is a mail token: Graph refuses it.
    assert graph_status(graph, authorised.tokens.access_token.reveal()) == 403

    client = poplib.POP3_SSL("localhost", ports["implicit"], context=ctx, timeout=30)
    client.user("printer")
    client.pass_("printer-pw")
    assert client.stat()[0] >= 1
    client.quit()

    after = record(gateway, "scanner")
    assert after.lineage == authorised.lineage and after.state == "ok"
    assert after.graph_tokens is not None and after.tokens is not None
    assert after.graph_tokens.scope.split() == [*GRAPH_SCOPES, "offline_access"]
    assert graph_status(graph, after.graph_tokens.access_token.reveal()) == 200
    # The refresh rotated the refresh token, and the new one was saved (the
    # old one is dead at the server: a later refresh would fail otherwise).
    assert after.tokens.refresh_token != authorised.tokens.refresh_token
    assert after.tokens.access_token == authorised.tokens.access_token


def gateway_check(gateway: GatewayProcess, *args: str) -> tuple[int, str]:
    process = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(gateway.config), "check", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    return process.returncode, process.stdout


def check_steps(gateway: GatewayProcess, account: str) -> tuple[int, dict[str, Any]]:
    status, out = gateway_check(gateway, account, "--json")
    (result,) = json.loads(out)["accounts"]
    named = {
        (s["step"] if s["protocol"] == "oauth" else f"{s['protocol']} {s['step']}"): s
        for s in result["steps"]
    }
    return status, named


def test_gateway_check_walks_a_graph_account(
    gateway: GatewayProcess, graph: GraphEmulator
) -> None:
    box = graph.mailbox("alice")
    box.add(b"Subject: one\r\n\r\n1\r\n")
    box.add(b"Subject: two\r\n\r\n2\r\n")
    graph.reset_counts()
    status, steps = check_steps(gateway, "checked")
    assert status == 0, steps
    assert {name: s["outcome"] for name, s in steps.items()} == {
        "token": "ok",
        "graph folder": "ok",
        "graph listing": "ok",
    }
    assert "Graph" in steps["token"]["detail"]
    assert steps["graph listing"]["detail"] == "one-message listing: 1 listed, more follow"
    # One page of one message: no other page, no message read, nothing changed.
    assert graph.counts["list"] == 1 and graph.counts["value"] == 0
    assert set(graph.counts) <= {"folder", "list", "total"}
    saved = record(gateway, "checked")
    assert saved.graph_tokens is not None and saved.state == "ok"

    status, out = gateway_check(gateway, "checked")
    assert status == 0 and out.splitlines()[-1] == "account checked: ok"


def test_gateway_check_names_a_missing_graph_folder(gateway: GatewayProcess) -> None:
    status, steps = check_steps(gateway, "lost")
    assert status == 1
    assert steps["token"]["outcome"] == "ok"
    folder = steps["graph folder"]
    assert folder["outcome"] == "failed" and "'Nope'" in folder["fix"]
    assert steps["graph listing"]["outcome"] == "skipped"
    status, out = gateway_check(gateway, "lost")
    assert status == 1 and out.splitlines()[-1] == "account lost: FAILED at graph folder"
