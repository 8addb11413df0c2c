"""A real twistd gateway with its spool in PostgreSQL: accepted with the
upstream down, stored in the database, delivered once it is up; PostgreSQL
stopped during DATA gives 451 and nothing is stored; once it is back the
same gateway accepts again, without a restart."""

from __future__ import annotations

import json
import smtplib
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.harness.postgres import PostgresCluster
from tests.harness.smtp_sink import read_messages
from tests.helpers.smtp_gateway import SMTPPorts, smtp_gateway_config, smtps_sink
from tests.helpers.state import migrated_database, state_toml
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster() -> Iterator[PostgresCluster]:
    """Its own cluster: this test stops and starts it."""
    with PostgresCluster() as own:
        yield own


def message(mark: bytes) -> bytes:
    return (
        b"From: relay@example.com\r\nTo: r@example.org\r\nSubject: " + mark + b"\r\n\r\n"
        b"hello from a printer\r\n"
    )


def session(port: int, ctx: ssl.SSLContext) -> smtplib.SMTP:
    client = smtplib.SMTP("localhost", port, timeout=20)
    client.starttls(context=ctx)
    client.login("flaky-dev", "flaky-dev-pw")
    return client


def cli(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(gw.config), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def queue_list(gw: GatewayProcess) -> list[dict[str, object]]:
    result = cli(gw, "queue", "list", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["spool"] == "PostgreSQL table gateway_spool"
    return document["messages"]  # type: ignore[no-any-return]


def stored(cluster: PostgresCluster, dsn: str, mark: bytes) -> int:
    rows = cluster.query(
        dsn, "SELECT count(*) FROM gateway_spool WHERE position(%s in message) > 0", mark
    )
    return int(rows[0][0])  # type: ignore[call-overload]


def stored_id(cluster: PostgresCluster, dsn: str, mark: bytes) -> str:
    rows = cluster.query(
        dsn, "SELECT id FROM gateway_spool WHERE position(%s in message) > 0", mark
    )
    return str(rows[0][0])


def test_the_spool_in_postgresql_end_to_end(
    tmp_path: Path,
    cluster: PostgresCluster,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    ctx: ssl.SSLContext,
) -> None:
    dsn = migrated_database(cluster)
    ports = SMTPPorts()  # the "flaky" upstream: nobody listens there yet
    text = smtp_gateway_config(
        tmp_path / "gw" / "state",
        ports,
        submission_port=free_port(),
        smtps_port=free_port(),
        upstream=tls_upstream,
        own=tls_gateway,
    )
    gw = GatewayProcess(
        tmp_path / "gw", text + "\n" + state_toml(dsn, lease_time=5, timeout=2), ports.listening()
    )
    with gw:
        # Upstream down: accepted, and the acceptance is a row in PostgreSQL.
        marks = [b"pg-%d-" % i + uuid.uuid4().hex.encode() for i in range(6)]
        with session(ports.submission, ctx) as client:
            for mark in marks:
                client.sendmail("relay@example.com", ["r@example.org"], message(mark))
        assert all(stored(cluster, dsn, mark) == 1 for mark in marks)
        assert not list((tmp_path / "gw" / "state").glob("spool/queue/*.msg"))
        listed = wait_until(
            lambda: queue_list(gw),
            timeout=15,
            message="not every message was tried",
            done=lambda found: len(found) == 6 and all(m["attempts"] for m in found),
        )
        assert all("cannot connect" in str(m["last_error"]) for m in listed)
        status = cli(gw, "state", "status", "--json")
        assert status.returncode == 0, status.stderr
        depth = json.loads(status.stdout)["spool depth"]
        assert sum(depth.values()) == 6 and all(k.startswith("queued on ") for k in depth)

        # An admin deletes one (at once, or by the process delivering it now).
        doomed = marks.pop()
        deleted = cli(gw, "queue", "delete", stored_id(cluster, dsn, doomed))
        assert deleted.returncode == 0, deleted.stderr
        wait_until(lambda: stored(cluster, dsn, doomed) == 0, timeout=15, message="not deleted")

        # Upstream up: each delivered, once; the table empties.
        with smtps_sink(tmp_path / "late", tls_upstream, port=ports.flaky) as late:
            late.wait_for(5, timeout=30)
            wait_until(
                lambda: cluster.query(dsn, "SELECT count(*) FROM gateway_spool")[0][0] == 0,
                timeout=20,
                message="the spool table did not empty",
            )
            arrived = read_messages(late.directory)
        subjects = sorted(m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in arrived)
        assert subjects == sorted(marks)  # each once; the deleted one never

        # PostgreSQL stops while a device is in DATA: 451, nothing accepted.
        lost = b"pg-down-" + uuid.uuid4().hex.encode()
        with session(ports.submission, ctx) as client:
            client.mail("relay@example.com")
            client.rcpt("r@example.org")
            code, _ = client.docmd("DATA")
            assert code == 354
            cluster.stop("fast")
            client.send(message(lost) + b".\r\n")
            code, reply = client.getreply()
            assert code == 451 and reply.startswith(b"4.3.0"), reply
        gw.wait_for_log("smtp spool could not store a message: state database")

        # Back: the same gateway accepts again (the pool reconnects).
        cluster.start()
        again = b"pg-back-" + uuid.uuid4().hex.encode()

        def accepted() -> bool:
            try:
                with session(ports.submission, ctx) as client:
                    client.sendmail("relay@example.com", ["r@example.org"], message(again))
            except smtplib.SMTPDataError as e:
                assert e.smtp_code == 451
                return False
            return True

        wait_until(accepted, timeout=30, message="no 250 after PostgreSQL came back")
        assert gw.process is not None and gw.process.poll() is None  # not restarted
        assert stored(cluster, dsn, again) == 1
        assert stored(cluster, dsn, lost) == 0
        assert "Traceback" not in gw.log_text()


def node(
    base: Path, dsn: str, ports: SMTPPorts, upstream: TLSMaterial, own: TLSMaterial
) -> GatewayProcess:
    text = smtp_gateway_config(
        base / "state",
        ports,
        submission_port=free_port(),
        smtps_port=free_port(),
        upstream=upstream,
        own=own,
    )
    extra = state_toml(dsn, lease_time=5, timeout=2, node=base.name)
    return GatewayProcess(base, text + "\n" + extra, ports.listening())


def test_a_killed_node_messages_are_delivered_by_the_other_once(
    tmp_path: Path,
    postgres: PostgresCluster,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    ctx: ssl.SSLContext,
) -> None:
    dsn = migrated_database(postgres)
    first_ports = SMTPPorts()
    second_ports = SMTPPorts(flaky=first_ports.flaky)  # one upstream for both
    first = node(tmp_path / "first", dsn, first_ports, tls_upstream, tls_gateway)
    second = node(tmp_path / "second", dsn, second_ports, tls_upstream, tls_gateway)
    with first, second:
        marks = [b"node-%02d-" % i + uuid.uuid4().hex.encode() for i in range(20)]
        with session(first_ports.submission, ctx) as client:
            for mark in marks:
                client.sendmail("relay@example.com", ["r@example.org"], message(mark))
        first.wait_for_log("smtp deferred", timeout=15)
        first.kill()  # -9: its leases are held by a dead process now
        killed_at = time.monotonic()
        with smtps_sink(tmp_path / "late", tls_upstream, port=first_ports.flaky) as late:
            late.wait_for(20, timeout=60)
            taken_over = time.monotonic() - killed_at
            wait_until(
                lambda: postgres.query(dsn, "SELECT count(*) FROM gateway_spool")[0][0] == 0,
                timeout=20,
                message="the spool table did not empty",
            )
            arrived = read_messages(late.directory)
        # Every delivery was the second node's (the first died before the
        # upstream came back): messages it took over from the dead holder, or
        # that the first had already let go of after its failed attempt.
        relayed = wait_until(
            lambda: second.log_text().count("smtp relayed "),
            timeout=10,
            message="the second node did not log 20 deliveries",
            done=lambda n: n >= 20,
        )
        assert relayed == 20
    subjects = sorted(m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in arrived)
    assert subjects == sorted(marks)  # every one, once
    # lease_time (5 s) + a look (2 s) + the retry interval (at most 2 s), with slack.
    assert taken_over < 20
