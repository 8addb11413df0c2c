"""Fifty device logins of one OAuth2 account spread over three real gateway
nodes behind HAProxy, its access token expired: one refresh at the
authorization server for all of them, and the rotated refresh token is the
one the shared store keeps (the provider's previous one is dead)."""

from __future__ import annotations

import json
import poplib
import ssl
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.config.loader import load_config
from gateway.oauth.admin import fired
from gateway.oauth.backend import TokenBackend
from gateway.oauth.keys import generate_key_file
from tests.harness.certs import TLSMaterial
from tests.harness.cluster import GatewayCluster, Listening
from tests.harness.dovecot import Dovecot
from tests.harness.oauth_server import OAuthServerProcess
from tests.harness.postgres import PostgresCluster
from tests.helpers.device_grant import post_form
from tests.helpers.oauth_gateway import (
    Crowd,
    idp_fixture,
    introspecting_dovecot,
    oauth_account,
    oauth_provider,
    pop3_login,
    secret_file,
)
from tests.helpers.pop3 import device
from tests.helpers.state import migrated_database
from tests.helpers.token_stores import command_store, seed_expired_grant
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.integration

CLIENT_SECRET = "cluster-client-secret"
CROWD = 50
REFRESH = "token:refresh_token"


idp = idp_fixture(CLIENT_SECRET)
oauth_dovecot = introspecting_dovecot("dovecot-oauth", {"alice": "alice-pw"})


@pytest.fixture(scope="module")
def authorised(
    tmp_path_factory: pytest.TempPathFactory,
    oauth_dovecot: Dovecot,
    idp: OAuthServerProcess,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    postgres: PostgresCluster,
) -> Iterator[Authorised]:
    base = tmp_path_factory.mktemp("cluster-tokens")
    secret = secret_file(base, CLIENT_SECRET)
    # Every node has the gateway key: the database only sees token blobs.
    key_file = base / "gateway.key"
    generate_key_file(key_file)
    body = [
        "[oauth]",
        f'key_file = "{key_file}"',
        "refresh_margin = 60",
        "idle_refresh_interval = 86400",
        "[limits]",
        f"max_connections_per_address = {CROWD + 10}",
        *oauth_provider(
            "idp", idp, oauth_dovecot, tls_upstream, secret, "timeout = 5", 'sasl = "xoauth2"'
        ),
        *oauth_account("scanner", "idp", "alice", "device_code"),
        *[device(f"crowd{n:02d}", "scanner") for n in range(CROWD)],
    ]
    cluster = GatewayCluster(
        base,
        dsn=migrated_database(postgres),
        own=tls_gateway,
        listeners={"pop3s": Listening("pop3", "implicit")},
        body=body,
        nodes=3,
    )
    # The admin authorised the account (with `gateway oauth authorize` on
    # any node) while the gateway was down: its access token expired since.
    store = node_command_store(cluster)
    granted = seed_expired_grant(store, "scanner", idp, CLIENT_SECRET)
    # The nodes start with the token expired; their refresh waits at the
    # authorization server until the test lets it go.
    idp.control("reset_counts")
    idp.control("hold")
    try:
        with cluster:
            yield Authorised(cluster, store, granted)
    finally:
        idp.control("release")


@dataclass
class Authorised:
    cluster: GatewayCluster
    store: TokenBackend
    granted: dict[str, Any]


def node_command_store(cluster: GatewayCluster) -> TokenBackend:
    """What `gateway oauth` on a node opens: the shared table, the node's key."""
    node = cluster.nodes[0]
    node.base.mkdir(parents=True, exist_ok=True)
    path = node.base / "admin.toml"
    path.write_text(cluster.config_text(node))
    path.chmod(0o600)
    return command_store(load_config(path))


def login_within(port: int, ctx: ssl.SSLContext, name: str, seconds: float) -> poplib.POP3_SSL:
    """Log in, retrying [IN-USE] (the last session's lock on its way out)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return pop3_login(port, ctx, name)
        except poplib.error_proto as e:
            if not e.args[0].startswith(b"-ERR [IN-USE]") or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_fifty_logins_over_three_nodes_make_one_refresh_and_keep_the_rotated_token(
    authorised: Authorised,
    idp: OAuthServerProcess,
    oauth_dovecot: Dovecot,
    ctx: ssl.SSLContext,
) -> None:
    cluster, store, granted = authorised.cluster, authorised.store, authorised.granted
    oauth_dovecot.deliver("alice", b"Message-ID: <1@x>\n\nhello\n")
    port = cluster.port("pop3s")
    crowd = Crowd(port, ctx, [f"crowd{n:02d}" for n in range(CROWD)]).start()
    answers = crowd.answers
    # Everyone else is refused [IN-USE] while the session holding the mailbox
    # waits for the one refresh in flight, held at the server.
    wait_until(lambda: len(answers) >= CROWD - 1, 30, lambda _: f"answers: {set(answers)}")
    assert idp.stats()["held"] == 1
    idp.control("release")
    crowd.join()
    assert len(answers) == CROWD
    # One POP3 session per mailbox across the nodes: the rest are [IN-USE].
    assert "ok" in answers
    assert all(a == "ok" or a.startswith("-ERR [IN-USE]") for a in answers), set(answers)
    # The logins reached every node.
    for node in cluster.nodes:
        assert "crowd" in node.log_text(), f"{node.name} served none of the crowd"
    assert idp.count(REFRESH) == 1

    # Later logins on any node use the refreshed access token.
    for _ in cluster.nodes:
        login_within(port, ctx, "crowd00", 10).quit()
    assert idp.count(REFRESH) == 1
    # The store keeps the rotated refresh token, and it is the live one: the
    # provider refuses the first one and takes the stored one.
    stored = fired(store.fetch("scanner"))
    assert stored is not None and stored.tokens is not None
    rotated = stored.tokens.refresh_token
    assert rotated is not None and rotated.reveal() != granted["refresh_token"]
    assert _refresh(idp, granted["refresh_token"]).get("error") == "invalid_grant"
    assert _refresh(idp, rotated.reveal()).get("access_token")


def _refresh(idp: OAuthServerProcess, refresh_token: str) -> dict[str, Any]:
    try:
        return post_form(
            f"{idp.url}/token",
            {
                "grant_type": "refresh_token",
                "refresh_token": refresh_token,
                "client_id": "gateway",
                "client_secret": CLIENT_SECRET,
            },
        )
    except urllib.error.HTTPError as e:  # the server's JSON error body
        return dict(json.loads(e.read() or b"{}"))
