"""UIDLs of an IMAP-backed account through three real gateway nodes sharing
PostgreSQL behind a real HAProxy: every node hands a device the same UIDLs,
also after a UIDVALIDITY change that one of them noticed and remapped."""

from __future__ import annotations

import glob
import os
import poplib
import ssl
from collections.abc import Iterator

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

SESSION = "pop3 session device=printer "
REMAPPED = "messages keep their UIDL"


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    dovecot: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    postgres: PostgresCluster,
) -> Iterator[GatewayCluster]:
    body = [
        *provider("imap", "imap", dovecot.imaps_port, "implicit", tls_upstream.ca_file, timeout=5),
        "[accounts.alice-imap]",
        'provider = "imap"\nusername = "alice"\npassword = "alice-pw"\nmailbox = "imap"',
        device("printer", "alice-imap"),
    ]
    with GatewayCluster(
        tmp_path_factory.mktemp("cluster-uidl"),
        dsn=migrated_database(postgres),
        own=tls_gateway,
        listeners={"pop3s": Listening("pop3", "implicit")},
        body=body,
        nodes=3,
    ) as running:
        yield running


class Logs:
    """Every node's log from a mark on."""

    def __init__(self, cluster: GatewayCluster) -> None:
        self.cluster = cluster
        self.marks = {name: len(text) for name, text in cluster.logs().items()}

    def since(self) -> dict[str, str]:
        return {name: text[self.marks[name] :] for name, text in self.cluster.logs().items()}

    def count(self, needle: str) -> dict[str, int]:
        return {name: text.count(needle) for name, text in self.since().items()}


def uidls(cluster: GatewayCluster, ctx: ssl.SSLContext) -> list[str]:
    """One device session through HAProxy: its UIDL listing, then QUIT.

    It starts once the previous session's mailbox lock is gone from the
    database: that node releases it just after its answer to QUIT, and a
    login in between would be [IN-USE] (and move HAProxy's round robin on)."""
    wait_until(
        lambda: cluster.query("SELECT count(*) FROM gateway_mailbox_locks")[0][0] == 0,
        10,
        "the previous session's mailbox lock was not released",
    )
    client = poplib.POP3_SSL("localhost", cluster.port("pop3s"), context=ctx, timeout=20)
    client.user("printer")
    client.pass_("printer-pw")
    _, lines, _ = client.uidl()
    client.quit()
    return [line.split()[1].decode() for line in lines]


def one_session_per_node(cluster: GatewayCluster, ctx: ssl.SSLContext) -> list[list[str]]:
    """As many sessions as nodes; HAProxy's round robin gives each node one."""
    logs = Logs(cluster)
    listings = [uidls(cluster, ctx) for _ in cluster.nodes]
    wait_until(
        lambda: logs.count(SESSION),
        10,
        lambda counts: f"sessions per node: {counts}",
        done=lambda counts: set(counts.values()) == {1},
    )
    return listings


def rebuild_folder(dovecot: Dovecot) -> None:
    """Message 1 goes, a new one comes, and Dovecot loses its UID list and
    indexes: a new UIDVALIDITY, old UIDs 2 and 3 renumbered 1 and 2. The
    nodes' kept connections are kicked first, as a rebuild of the mailbox
    does (an imap process left running would write its old UID list back)."""
    dovecot.kick("alice")
    wait_until(
        lambda: "alice" not in dovecot.doveadm("who", "alice", ok_codes=(0, 68)),
        10,
        lambda _: dovecot.doveadm("who", "alice", ok_codes=(0, 68)),
    )
    validity = dovecot.doveadm("mailbox", "status", "-u", "alice", "uidvalidity", "INBOX")
    dovecot.message_files("alice")[0].unlink()
    dovecot.deliver("alice", b"Message-ID: <new@x>\n\nnew\n")
    maildir = dovecot.maildir("alice")
    for name in glob.glob(str(maildir / "dovecot-uidlist")) + glob.glob(
        str(maildir / "dovecot.index*")
    ):
        os.unlink(name)
    assert dovecot.doveadm("mailbox", "status", "-u", "alice", "uidvalidity", "INBOX") != validity


def test_every_node_gives_the_same_uidls_also_after_a_uidvalidity_change(
    cluster: GatewayCluster, clean_mailboxes: Dovecot, ctx: ssl.SSLContext
) -> None:
    dovecot = clean_mailboxes
    for n in range(1, 4):
        dovecot.deliver("alice", b"Message-ID: <%d@x>\nSubject: %d\n\nbody %d\n" % (n, n, n))
    first = one_session_per_node(cluster, ctx)
    assert len(set(first[0])) == 3
    assert first == [first[0]] * len(cluster.nodes)

    rebuild_folder(dovecot)
    logs = Logs(cluster)
    after = one_session_per_node(cluster, ctx)
    assert after == [after[0]] * len(cluster.nodes)
    # The two messages that stayed keep their UIDLs; the new one has a new one.
    assert after[0][:2] == first[0][1:]
    assert after[0][2] not in first[0]
    # One node remapped the account; the others read what it stored.
    remaps = logs.count(REMAPPED)
    assert sorted(remaps.values()) == [0] * (len(cluster.nodes) - 1) + [1], remaps
    assert uidls(cluster, ctx) == after[0]
