"""Worker processes sharing the embedded state: real twistd parents with
two or three workers on the same ports, against the session Dovecot and an
SMTP sink."""

from __future__ import annotations

import os
import poplib
import signal
import smtplib
import ssl
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.harness.postgres import PostgresCluster
from tests.harness.smtp_sink import read_messages
from tests.helpers.pop3 import device, message
from tests.helpers.smtp_gateway import SMTPPorts, smtp_gateway_config, smtps_sink
from tests.helpers.state import state_toml
from tests.helpers.waiting import wait_until
from tests.integration.test_workers import (
    config_text,
    pids_that_logged,
    wait_for_workers,
)

pytestmark = pytest.mark.integration


# -- locks -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["embedded", "postgresql"])
def test_in_use_holds_across_workers(
    tmp_path: Path,
    clean_mailboxes: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    """One device holds alice's mailbox in one worker; logins of another device
    of alice's account get [IN-USE] in every worker (seen from >= 2 pids).
    A node is any number of workers on either backend: with PostgreSQL each
    worker is a process of its own in the database's locks."""
    port = free_port()
    extra = [device("copier", "alice")]
    dsn = None
    if backend == "postgresql":
        dsn = request.getfixturevalue("state_dsn")
        extra.append(state_toml(dsn))
    text = config_text(
        tmp_path / "state",
        port,
        clean_mailboxes,
        tls_upstream,
        tls_gateway,
        workers=3,
        extra=tuple(extra),
    )
    ctx = ssl.create_default_context(cafile=str(tls_gateway.ca_file))
    with GatewayProcess(tmp_path / "gw", text, [port]) as gateway:
        workers = wait_for_workers(gateway, 3)
        if dsn is not None:
            cluster: PostgresCluster = request.getfixturevalue("postgres")
            wait_until(
                lambda: cluster.query(dsn, "SELECT pid FROM gateway_processes"),
                20,
                lambda rows: f"worker processes in the database: {rows}",
                done=lambda rows: {pid for (pid,) in rows} == set(workers.values()),
            )
        holder = poplib.POP3_SSL("localhost", port, context=ctx, timeout=20)
        holder.user("printer")
        holder.pass_("printer-pw")
        try:

            def refused_once() -> set[int]:
                client = poplib.POP3_SSL("localhost", port, context=ctx, timeout=20)
                try:
                    client.user("copier")
                    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
                        client.pass_("copier-pw")
                finally:
                    client.quit()
                return pids_that_logged(gateway.log_text(), "account alice is in use")

            refusing = wait_until(
                refused_once,
                60,
                lambda pids: f"[IN-USE] only from {pids} of {workers}",
                done=lambda pids: len(pids) >= 2,
            )
            assert refusing <= set(workers.values())
        finally:
            holder.quit()
        # Released at QUIT: the other device gets in, whichever worker it meets.
        for _ in range(6):
            client = poplib.POP3_SSL("localhost", port, context=ctx, timeout=20)
            client.user("copier")
            client.pass_("copier-pw")
            client.quit()


def serving_pid(candidates: list[int], client_port: int, server_port: int) -> int:
    """Which of `candidates` holds the server side of the loopback connection
    from `client_port` to `server_port` (from /proc: the socket's inode)."""
    wanted = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    inode = None
    with open("/proc/net/tcp") as table:
        for row in table.read().splitlines()[1:]:
            fields = row.split()
            if (fields[1], fields[2]) == wanted:
                inode = fields[9]
    assert inode is not None, f"no connection {wanted} in /proc/net/tcp"
    for pid in candidates:
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except FileNotFoundError:
                continue
    raise AssertionError(f"no worker of {candidates} holds socket {inode}")


def test_a_worker_killed_in_a_session_frees_the_mailbox_and_deletes_nothing(
    tmp_path: Path,
    clean_mailboxes: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
) -> None:
    dovecot = clean_mailboxes
    dovecot.deliver("alice", message(1))
    dovecot.deliver("alice", message(2))
    port = free_port()
    text = config_text(
        tmp_path / "state",
        port,
        dovecot,
        tls_upstream,
        tls_gateway,
        workers=2,
        extra=(device("copier", "alice"),),
    )
    ctx = ssl.create_default_context(cafile=str(tls_gateway.ca_file))
    with GatewayProcess(tmp_path / "gw", text, [port]) as gateway:
        workers = wait_for_workers(gateway, 2)
        holder = poplib.POP3_SSL("localhost", port, context=ctx, timeout=20)
        holder.user("printer")
        holder.pass_("printer-pw")
        holder.dele(1)
        victim = serving_pid(list(workers.values()), holder.sock.getsockname()[1], port)
        os.kill(victim, signal.SIGKILL)

        def copier_login() -> int | None:
            client = poplib.POP3_SSL("localhost", port, context=ctx, timeout=20)
            try:
                client.user("copier")
                client.pass_("copier-pw")
                count, _size = client.stat()
            except poplib.error_proto:
                return None
            finally:
                client.quit()
            return count

        # The kernel released the dead worker's lock: a login gets in (in the
        # other worker, or the restarted one) and sees both messages: the
        # DELE of a session that never reached QUIT was not applied.
        assert wait_until(copier_login, 15, "the mailbox stayed locked") == 2
        holder.sock.close()
    assert len(dovecot.messages("alice")) == 2


# -- spool -------------------------------------------------------------------------------


def test_100_messages_across_workers_kill_9_one_worker_all_delivered_once(
    tmp_path: Path,
    submission: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
) -> None:
    """The `flaky` account's upstream is down: 100 messages, one connection
    each, are accepted by several workers; one of them is killed with -9
    (the supervisor restarts it); the upstream comes up: every message
    arrives exactly once."""
    assert submission.submission_port is not None
    ports = SMTPPorts()
    text = "workers = 3\n" + smtp_gateway_config(
        tmp_path / "gw" / "state",
        ports,
        submission_port=submission.submission_port,
        smtps_port=free_port(),
        upstream=tls_upstream,
        own=tls_gateway,
    )
    ctx = ssl.create_default_context(cafile=str(tls_gateway.ca_file))
    marks = [b"workers-%03d-" % i + uuid.uuid4().hex.encode() for i in range(100)]

    def send(mark: bytes) -> None:
        with smtplib.SMTP("localhost", ports.submission, timeout=30) as c:
            c.starttls(context=ctx)
            c.login("flaky-dev", "flaky-dev-pw")
            c.sendmail(
                "relay@example.com",
                ["r@example.org"],
                b"From: relay@example.com\r\nTo: r@example.org\r\nSubject: "
                + mark
                + b"\r\nMessage-ID: <"
                + mark
                + b"@example.com>\r\n\r\nhello\r\n",
            )

    with GatewayProcess(tmp_path / "gw", text, ports.listening()) as gateway:
        workers = wait_for_workers(gateway, 3)
        # At most 4 at once: max_sessions_per_device (4) holds per worker.
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(send, marks))
        accepted_by = pids_that_logged(gateway.log_text(), "queued=")
        assert len(accepted_by) >= 2, (accepted_by, workers)
        victim = next(pid for index, pid in workers.items() if pid in accepted_by and index)
        os.kill(victim, signal.SIGKILL)
        with smtps_sink(tmp_path / "late", tls_upstream, port=ports.flaky) as late:
            late.wait_for(100, timeout=90)
            # Nothing more turns up: with the queue empty, no worker has
            # anything left to send (a message leaves it after the sink's 250).
            # Adapt the path if the spool branch changes the layout.
            queue = tmp_path / "gw" / "state" / "spool" / "queue"
            wait_until(
                lambda: list(queue.glob("*.msg")),
                30,
                lambda left: f"{len(left)} message(s) still queued",
                done=lambda left: not left,
            )
            arrived = read_messages(late.directory)
        subjects = sorted(m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in arrived)
        assert subjects == sorted(marks)
