"""100 messages accepted across three real gateway nodes behind HAProxy while
the upstream is down, kill -9 of one node, the upstream back: every message
is delivered, none twice (the live nodes deliver the dead one's mail; the
spool is rows in PostgreSQL, committed before each 250)."""

from __future__ import annotations

import smtplib
import socket
import ssl
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.cluster import GatewayCluster, Listening
from tests.harness.gateway_process import free_port
from tests.harness.postgres import PostgresCluster
from tests.harness.smtp_sink import read_messages
from tests.helpers.smtp_gateway import device, smtps_sink
from tests.helpers.state import migrated_database
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.integration

MESSAGES = 100
SESSIONS = 20  # of 5 messages each, 4 at a time: spread over the nodes by HAProxy


@pytest.fixture
def upstream_port() -> int:
    return free_port()  # nobody listens there until the test says so


@pytest.fixture
def dsn(postgres: PostgresCluster) -> str:
    return migrated_database(postgres)


@pytest.fixture
def cluster(
    tmp_path: Path,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    dsn: str,
    upstream_port: int,
) -> Iterator[GatewayCluster]:
    body = [
        "[smtp]",
        "retry_first = 1",
        "retry_max_interval = 2",
        "message_lifetime = 3600",
        "[limits]",
        "max_sessions_per_device = 10",
        "[providers.flaky]",
        f'smtp = {{ host = "localhost", port = {upstream_port}, tls = "implicit" }}',
        f'ca_file = "{tls_upstream.ca_file}"',
        "timeout = 2",
        "[accounts.flaky]",
        'provider = "flaky"\nusername = "relay@example.com"\npassword = "relay-pw"',
        device("flaky-dev", "flaky"),
    ]
    with GatewayCluster(
        tmp_path / "cluster",
        dsn=dsn,
        own=tls_gateway,
        listeners={"submission": Listening("smtp", "starttls")},
        body=body,
        nodes=3,
    ) as running:
        yield running


def message(mark: bytes) -> bytes:
    return (
        b"From: relay@example.com\r\nTo: r@example.org\r\nSubject: " + mark + b"\r\n\r\n"
        b"hello from a printer\r\n"
    )


def in_flight(postgres: PostgresCluster, dsn: str, node: str) -> int:
    rows = postgres.query(
        dsn,
        "SELECT count(*) FROM gateway_spool WHERE lease_holder LIKE %s AND lease_until > now()",
        f"{node}:%",
    )
    return int(rows[0][0])  # type: ignore[call-overload]


def send(port: int, ctx: ssl.SSLContext, marks: list[bytes]) -> None:
    with smtplib.SMTP("localhost", port, timeout=30) as client:
        client.starttls(context=ctx)
        client.login("flaky-dev", "flaky-dev-pw")
        for mark in marks:
            client.sendmail("relay@example.com", ["r@example.org"], message(mark))


def test_hundred_messages_survive_kill_9_of_a_node_and_are_delivered_once(
    cluster: GatewayCluster,
    postgres: PostgresCluster,
    dsn: str,
    tls_upstream: TLSMaterial,
    upstream_port: int,
    tmp_path: Path,
    ctx: ssl.SSLContext,
) -> None:
    run = uuid.uuid4().hex[:8].encode()
    marks = [b"cluster-%s-%03d" % (run, n) for n in range(MESSAGES)]
    batches = [marks[n::SESSIONS] for n in range(SESSIONS)]
    failures: list[BaseException] = []
    port = cluster.port("submission")

    def sender(mine: list[list[bytes]]) -> None:
        try:
            for batch in mine:
                send(port, ctx, batch)
        except BaseException as e:  # reported below, with the others
            failures.append(e)

    threads = [threading.Thread(target=sender, args=(batches[n::4],)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    # Every 250 is a row; every node accepted its share.
    by_node = dict(
        postgres.query(dsn, "SELECT node, count(*) FROM gateway_spool GROUP BY node")  # type: ignore[arg-type]
    )
    assert sum(by_node.values()) == MESSAGES
    assert set(by_node) == {node.name for node in cluster.nodes}, by_node

    # Every message tried once at least (upstream down), then the upstream
    # hangs (connections are never answered): attempts last the provider's
    # timeout, and a node dies while it holds messages in flight.
    wait_until(
        lambda: postgres.query(dsn, "SELECT count(*) FROM gateway_spool WHERE attempts = 0")[0][0],
        30,
        "not every message was tried",
        done=lambda untried: untried == 0,
    )
    victim = cluster.nodes[0]
    with socket.create_server(("127.0.0.1", upstream_port), backlog=64):
        wait_until(
            lambda: in_flight(postgres, dsn, victim.name),
            30,
            f"{victim.name} never held a message in flight",
            done=lambda held: held > 0,
        )
        victim.kill()
        assert in_flight(postgres, dsn, victim.name) > 0

    # The upstream comes back: the live nodes deliver everything, once,
    # the dead node's in-flight messages once its process lease has passed.
    with smtps_sink(tmp_path / "upstream", tls_upstream, port=upstream_port) as upstream:
        upstream.wait_for(MESSAGES, timeout=60)
        wait_until(
            lambda: postgres.query(dsn, "SELECT count(*) FROM gateway_spool")[0][0],
            30,
            "the spool table did not empty",
            done=lambda left: left == 0,
        )
        arrived = read_messages(upstream.directory)
    subjects = Counter(m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in arrived)
    assert sorted(subjects) == sorted(marks)
    assert set(subjects.values()) == {1}, [s for s, n in subjects.items() if n > 1]
    # A live node took the dead one's in-flight messages over.
    took_over = f"from process {victim.name}:"
    assert any(took_over in node.log_text() for node in cluster.nodes[1:])
    for node in cluster.nodes[1:]:
        assert "Traceback" not in node.log_text()
