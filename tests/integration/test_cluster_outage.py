"""PostgreSQL stopped and started under load, behind HAProxy with two real
gateway nodes: devices are refused with codes that make them retry, and the
nodes recover on their own when the database is back, without a restart."""

from __future__ import annotations

import poplib
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.cluster import GatewayCluster, Listening
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_config import provider
from tests.harness.postgres import PostgresCluster
from tests.helpers.pop3 import device
from tests.helpers.state import migrated_database
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.integration

# What a device may be told while the database is away: try again later.
# [IN-USE] too: a session that ended during the outage could not release its
# mailbox lock until the database was back (RFC 2449: the device retries).
TEMPORARY = ("-ERR [SYS/TEMP] ", "-ERR [IN-USE] ")


@pytest.fixture
def database() -> Iterator[PostgresCluster]:
    """A cluster of this test's own: it is stopped and started."""
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    dovecot: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    database: PostgresCluster,
) -> Iterator[GatewayCluster]:
    body = [
        *provider("imap", "imap", dovecot.imaps_port, "implicit", tls_upstream.ca_file, timeout=5),
        "[accounts.alice-imap]",
        'provider = "imap"\nusername = "alice"\npassword = "alice-pw"\nmailbox = "imap"',
        device("printer", "alice-imap"),
    ]
    with GatewayCluster(
        tmp_path_factory.mktemp("cluster-outage"),
        dsn=migrated_database(database),
        own=tls_gateway,
        listeners={"pop3s": Listening("pop3", "implicit")},
        body=body,
        nodes=2,
        # Longer than the outage: the nodes stay ready (/readyz) and answer
        # the devices themselves, which is what this test looks at.
        lease_time=20,
        state_extra={"timeout": 2},
    ) as running:
        yield running


@dataclass
class Load:
    """Device sessions (login, UIDL, QUIT) one after another until stopped;
    every outcome is kept: the UIDL listing, or the error line."""

    cluster: GatewayCluster
    ctx: ssl.SSLContext
    listings: list[list[str]] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.listings.append(self.session())
            except poplib.error_proto as e:
                self.refusals.append(str(e.args[0], "utf-8", "replace"))
            except OSError as e:  # a connection cut instead of an answer
                self.refusals.append(f"connection failed: {e!r}")

    def session(self) -> list[str]:
        port = self.cluster.port("pop3s")
        client = poplib.POP3_SSL("localhost", port, context=self.ctx, timeout=20)
        try:
            client.user("printer")
            client.pass_("printer-pw")
            _, lines, _ = client.uidl()
            client.quit()
        finally:
            client.close()
        return [line.split()[1].decode() for line in lines]


def test_a_database_outage_refuses_with_sys_temp_and_recovers_without_restart(
    cluster: GatewayCluster,
    database: PostgresCluster,
    clean_mailboxes: Dovecot,
    ctx: ssl.SSLContext,
) -> None:
    for n in range(1, 3):
        clean_mailboxes.deliver("alice", b"Message-ID: <%d@x>\n\nbody %d\n" % (n, n))
    pids = {node.name: node.process.process.pid for node in cluster.nodes}  # type: ignore[union-attr]
    load = Load(cluster, ctx)
    worker = threading.Thread(target=load.run, daemon=True)
    worker.start()
    try:
        wait_until(lambda: len(load.listings) >= 4, 20, "no session succeeded before the outage")
        database.stop("fast")
        wait_until(lambda: len(load.refusals) >= 2, 20, "no refusal while the database was down")
        served = len(load.listings)
        database.start()
        wait_until(
            lambda: len(load.listings) >= served + 4,
            30,
            lambda _: f"no recovery; refusals since: {load.refusals[-3:]}",
        )
    finally:
        load.stop.set()
        worker.join(30)
    # Every refusal said "try again later"; every listing is the same UIDLs.
    assert all(refusal.startswith(TEMPORARY) for refusal in load.refusals), set(load.refusals)
    assert len({tuple(listing) for listing in load.listings}) == 1
    assert len(load.listings[0]) == 2
    # Neither node was restarted, and neither logged a traceback.
    for node in cluster.nodes:
        assert node.running and node.process.process.pid == pids[node.name]  # type: ignore[union-attr]
        assert "Traceback" not in node.log_text(), node.log_text()[-3000:]
    logs = "".join(cluster.logs().values())
    # The nodes said what failed (the mailbox lock or the UIDL map: whichever
    # needed the database first).
    assert "UIDL map: " in logs or "mailbox lock of account" in logs
