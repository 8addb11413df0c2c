"""[IN-USE] between real twistd gateways sharing PostgreSQL, against the real Dovecot.

Two nodes, each with its own state directory and listeners, one database:
a session on one node keeps the mailbox from the other; kill -9 of the node
holding it frees it within `[state] lease_time` with nothing deleted
upstream; a database that cannot be reached turns logins into `[SYS/TEMP]`
until it is back, without restarting the gateway.
"""

from __future__ import annotations

import poplib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import GatewayProcess
from tests.harness.postgres import PostgresCluster
from tests.helpers.pop3 import Ports, gateway_config, message
from tests.helpers.pop3_programs import drop
from tests.helpers.state import migrated_database, state_toml

pytestmark = pytest.mark.integration

LEASE_TIME = 5


class Node:
    def __init__(self, process: GatewayProcess, port: int) -> None:
        self.process, self.port = process, port


@pytest.fixture
def start_node(
    tmp_path: Path, dovecot: Dovecot, tls_upstream: TLSMaterial, tls_gateway: TLSMaterial
) -> Iterator[object]:
    started: list[GatewayProcess] = []

    def start(name: str, dsn: str) -> Node:
        base, ports = tmp_path / name, Ports()
        text = gateway_config(
            base / "state", ports, dovecot, tls_upstream, tls_gateway, tls_gateway.ca_file
        )
        text += "\n" + state_toml(dsn, node=name, lease_time=LEASE_TIME, timeout=2)
        process = GatewayProcess(base, text, [ports.implicit])
        process.start()
        started.append(process)
        return Node(process, ports.implicit)

    yield start
    for process in started:
        process.stop()


def login(node: Node, ctx: ssl.SSLContext, device: str) -> poplib.POP3_SSL:
    client = poplib.POP3_SSL("localhost", node.port, context=ctx, timeout=20)
    try:
        client.user(device)
        client.pass_(f"{device}-pw")
    except BaseException:
        drop(client)
        raise
    return client


def login_within(node: Node, ctx: ssl.SSLContext, device: str, seconds: float) -> poplib.POP3_SSL:
    """Log in, retrying refusals until `seconds` have passed."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return login(node, ctx, device)
        except poplib.error_proto:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_in_use_across_nodes_and_free_within_the_lease_time_after_kill_9(
    start_node, state_dsn: str, clean_mailboxes: Dovecot, ctx: ssl.SSLContext
) -> None:
    clean_mailboxes.deliver("alice", message(1))
    a, b = start_node("node-a", state_dsn), start_node("node-b", state_dsn)
    holder = login_within(a, ctx, "printer", 15)
    holder.dele(1)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        login_within(b, ctx, "copier", 0)
    b.process.wait_for_log("is in use by printer in process node-a:")
    a.process.kill()
    killed = time.monotonic()
    drop(holder)
    # Refusals until node-a's lease has passed, then the mailbox is free.
    copier = login_within(b, ctx, "copier", LEASE_TIME + 5)
    assert time.monotonic() - killed <= LEASE_TIME + 5
    assert copier.stat()[0] == 1, "the killed session's DELE was applied"
    copier.quit()
    assert len(clean_mailboxes.messages("alice")) == 1


def test_a_database_that_cannot_be_reached_makes_logins_retry_until_it_is_back(
    start_node, clean_mailboxes: Dovecot, ctx: ssl.SSLContext
) -> None:
    with PostgresCluster() as cluster:
        node = start_node("node-a", migrated_database(cluster))
        login_within(node, ctx, "printer", 15).quit()
        cluster.stop("immediate")
        with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[SYS/TEMP\] mailbox lock"):
            login(node, ctx, "printer")
        node.process.wait_for_log("mailbox lock of account alice unavailable")
        cluster.start()
        login_within(node, ctx, "printer", 3 * LEASE_TIME).quit()
        assert "Traceback" not in node.process.log_text()
