"""PostgreSQL stopped and started under load, behind HAProxy with two real
gateway nodes: devices are refused with codes that make them retry (POP3
[SYS/TEMP], SMTP 4xx), nothing is accepted that was not stored (every 250
is delivered), and the nodes recover on their own when the database is
back, without a restart."""

from __future__ import annotations

import poplib
import smtplib
import ssl
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.cluster import GatewayCluster, Listening
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_config import provider
from tests.harness.postgres import PostgresCluster
from tests.harness.smtp_sink import SMTPSink, read_messages
from tests.helpers.pop3 import device
from tests.helpers.smtp_gateway import device as smtp_device
from tests.helpers.smtp_gateway import smtps_sink
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
def upstream(tmp_path: Path, tls_upstream: TLSMaterial) -> Iterator[SMTPSink]:
    """The SMTP upstream, up all along: what was accepted gets here."""
    with smtps_sink(tmp_path / "upstream", tls_upstream) as sink:
        yield sink


@pytest.fixture
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    dovecot: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    database: PostgresCluster,
    upstream: SMTPSink,
) -> Iterator[GatewayCluster]:
    body = [
        "[smtp]",
        "retry_first = 1",
        "retry_max_interval = 2",
        *provider("imap", "imap", dovecot.imaps_port, "implicit", tls_upstream.ca_file, timeout=5),
        *provider("relay", "smtp", upstream.port, "implicit", tls_upstream.ca_file, timeout=5),
        "[accounts.alice-imap]",
        'provider = "imap"\nusername = "alice"\npassword = "alice-pw"\nmailbox = "imap"',
        "[accounts.relay]",
        'provider = "relay"\nusername = "relay@example.com"\npassword = "relay-pw"',
        device("printer", "alice-imap"),
        smtp_device("sender", "relay"),
    ]
    with GatewayCluster(
        tmp_path_factory.mktemp("cluster-outage"),
        dsn=migrated_database(database),
        own=tls_gateway,
        listeners={
            "pop3s": Listening("pop3", "implicit"),
            "submission": Listening("smtp", "starttls"),
        },
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


@dataclass
class Senders:
    """Messages sent one after another (a session each) until stopped: the
    marks that got 250, and the refusals' codes and texts."""

    cluster: GatewayCluster
    ctx: ssl.SSLContext
    accepted: list[bytes] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            mark = b"outage-" + uuid.uuid4().hex.encode()
            try:
                self.send(mark)
                self.accepted.append(mark)
            except smtplib.SMTPResponseException as e:
                self.refusals.append(f"{e.smtp_code} {e.smtp_error!r}")
            except (smtplib.SMTPException, OSError) as e:
                self.refusals.append(f"connection failed: {e!r}")

    def send(self, mark: bytes) -> None:
        port = self.cluster.port("submission")
        with smtplib.SMTP("localhost", port, timeout=20) as client:
            client.starttls(context=self.ctx)
            client.login("sender", "sender-pw")
            body = b"From: relay@example.com\r\nSubject: " + mark + b"\r\n\r\nhello\r\n"
            client.sendmail("relay@example.com", ["r@example.org"], body)


def test_a_database_outage_refuses_with_sys_temp_and_recovers_without_restart(
    cluster: GatewayCluster,
    database: PostgresCluster,
    clean_mailboxes: Dovecot,
    upstream: SMTPSink,
    ctx: ssl.SSLContext,
) -> None:
    for n in range(1, 3):
        clean_mailboxes.deliver("alice", b"Message-ID: <%d@x>\n\nbody %d\n" % (n, n))
    pids = {node.name: node.process.process.pid for node in cluster.nodes}  # type: ignore[union-attr]
    load = Load(cluster, ctx)
    senders = Senders(cluster, ctx)
    workers = [
        threading.Thread(target=load.run, daemon=True),
        threading.Thread(target=senders.run, daemon=True),
    ]
    for worker in workers:
        worker.start()
    try:
        wait_until(
            lambda: len(load.listings) >= 4 and len(senders.accepted) >= 4,
            20,
            "no session succeeded before the outage",
        )
        database.stop("fast")
        wait_until(
            lambda: len(load.refusals) >= 2 and len(senders.refusals) >= 2,
            20,
            lambda _: f"refusals while the database was down: {load.refusals} {senders.refusals}",
        )
        served, sent = len(load.listings), len(senders.accepted)
        database.start()
        wait_until(
            lambda: len(load.listings) >= served + 4 and len(senders.accepted) >= sent + 4,
            30,
            lambda _: f"no recovery; refusals since: {load.refusals[-3:]} {senders.refusals[-3:]}",
        )
    finally:
        load.stop.set()
        senders.stop.set()
        for worker in workers:
            worker.join(30)
    # Every refusal said "try again later"; every listing is the same UIDLs.
    assert all(refusal.startswith(TEMPORARY) for refusal in load.refusals), set(load.refusals)
    assert len({tuple(listing) for listing in load.listings}) == 1
    assert len(load.listings[0]) == 2
    # SMTP: refusals are 4xx (the device keeps the message and retries), and
    # every 250 was stored: it reaches the upstream.
    assert all(refusal[:1] == "4" for refusal in senders.refusals), set(senders.refusals)
    wait_until(
        lambda: {
            m.content.split(b"Subject: ")[1].split(b"\r\n")[0]
            for m in read_messages(upstream.directory)
        },
        30,
        "not every accepted message was delivered",
        done=lambda found: set(senders.accepted) <= found,
    )
    # Neither node was restarted, and neither logged a traceback.
    for node in cluster.nodes:
        assert node.running and node.process.process.pid == pids[node.name]  # type: ignore[union-attr]
        assert "Traceback" not in node.log_text(), node.log_text()[-3000:]
    logs = "".join(cluster.logs().values())
    # The nodes said what failed (the mailbox lock or the UIDL map: whichever
    # needed the database first).
    assert "UIDL map: " in logs or "mailbox lock of account" in logs
