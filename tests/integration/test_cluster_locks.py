"""[IN-USE] across three real gateway nodes behind HAProxy on one PostgreSQL,
and kill -9 of the node holding a session: the mailbox is free again within
`[state] lease_time` (the stated bound: lease_time after the dead node's
last renewal; 30 s by default, 6 s here) and nothing was deleted upstream."""

from __future__ import annotations

import poplib
import ssl
import time
from collections.abc import Iterator

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.cluster import LEASE_TIME, GatewayCluster, Listening
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_config import provider
from tests.harness.postgres import PostgresCluster
from tests.helpers.pop3 import device, message
from tests.helpers.pop3_programs import drop
from tests.helpers.state import migrated_database

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dsn(postgres: PostgresCluster) -> str:
    return migrated_database(postgres)


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    dovecot: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    dsn: str,
) -> Iterator[GatewayCluster]:
    body = [
        *provider("dovecot", "pop3", dovecot.pop3s_port, "implicit", tls_upstream.ca_file),
        "[accounts.alice]",
        'provider = "dovecot"\nusername = "alice"\npassword = "alice-pw"',
        device("printer", "alice"),
        device("copier", "alice"),
    ]
    with GatewayCluster(
        tmp_path_factory.mktemp("cluster-locks"),
        dsn=dsn,
        own=tls_gateway,
        listeners={"pop3s": Listening("pop3", "implicit")},
        body=body,
        nodes=3,
        state_extra={"timeout": 2},
    ) as running:
        yield running


def login(cluster: GatewayCluster, ctx: ssl.SSLContext, device: str) -> poplib.POP3_SSL:
    client = poplib.POP3_SSL("localhost", cluster.port("pop3s"), context=ctx, timeout=20)
    try:
        client.user(device)
        client.pass_(f"{device}-pw")
    except BaseException:
        drop(client)
        raise
    return client


def holder_node(postgres: PostgresCluster, dsn: str) -> str:
    """The node whose process holds alice's mailbox lock, from the database."""
    rows = postgres.query(dsn, "SELECT process FROM gateway_mailbox_locks")
    assert len(rows) == 1, rows
    return str(rows[0][0]).split(":")[0]


def test_in_use_on_every_node_and_free_within_the_lease_after_kill_9(
    cluster: GatewayCluster,
    postgres: PostgresCluster,
    dsn: str,
    clean_mailboxes: Dovecot,
    ctx: ssl.SSLContext,
) -> None:
    clean_mailboxes.deliver("alice", message(1))
    holder = login(cluster, ctx, "printer")
    holder.dele(1)
    held_by = holder_node(postgres, dsn)
    # Round robin: the next logins reach every node, each of which refuses.
    for _ in cluster.nodes:
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            login(cluster, ctx, "copier")
    for node in cluster.nodes:
        if node.name != held_by:
            assert f"in process {held_by}:" in node.log_text(), node.name

    victim = cluster.node(held_by)
    victim.kill()
    killed = time.monotonic()
    drop(holder)
    cluster.wait_servers("pop3s", down={held_by})
    # Refusals ([IN-USE]) until the dead process's lease has passed.
    while True:
        try:
            copier = login(cluster, ctx, "copier")
            break
        except poplib.error_proto as e:
            assert e.args[0].startswith(b"-ERR [IN-USE]"), e
            assert time.monotonic() - killed < LEASE_TIME + 3, "still in use"
            time.sleep(0.2)
    # A live node took the dead one's lock over.
    assert holder_node(postgres, dsn) != held_by
    # The killed session's DELE was never applied: RFC 1939's UPDATE state
    # comes only with QUIT.
    assert copier.stat()[0] == 1
    copier.quit()
    assert len(clean_mailboxes.messages("alice")) == 1

    # The node comes back and serves again.
    cluster.start_node(victim)
    cluster.wait_servers("pop3s", up={n.name for n in cluster.nodes})
