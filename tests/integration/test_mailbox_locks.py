"""Mailbox locks ([IN-USE]): one suite against both backends, then what only
one backend has (flock across processes; PostgreSQL leases and takeover).

A "process" here is one `MailboxLocks` instance: with the embedded backend a
second `FileMailboxLocks` on the same directory opens its own file
descriptions, which `flock` treats exactly like another process's; with
PostgreSQL each has its own identity and lease in `gateway_processes`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from pytest_twisted import ensureDeferred
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from gateway.locks import InUse, LockUnavailable, MailboxLease, MailboxLocks
from gateway.locks.files import FileMailboxLocks
from gateway.locks.postgres import PostgresMailboxLocks, row_key
from gateway.state.backend import StateBackend
from gateway.state.database import Database
from gateway.state.processes import ProcessIdentity
from tests.harness.gateway_process import REPO_ROOT
from tests.harness.postgres import PostgresCluster
from tests.helpers.state import backend_for, migrated_database, postgres_settings

pytestmark = pytest.mark.integration

KEY = "corp\0scanner@example.com\0INBOX"
OTHER = "corp\0fax@example.com\0INBOX"


class Processes:
    """Lock holders of one backend, each standing for a gateway process."""

    def __init__(self, kind: str, tmp_path: Path, dsn: str | None) -> None:
        self.kind, self.dsn = kind, dsn
        self.directory = tmp_path / "state" / "locks"
        self._backends: list[StateBackend] = []

    async def new(self, **settings: Any) -> MailboxLocks:
        if self.dsn is None:
            return FileMailboxLocks(self.directory)
        backend = backend_for(postgres_settings(self.dsn, **settings), reactor)
        self._backends.append(backend)
        assert backend.database is not None and backend.lease is not None
        await backend.lease.start()
        return PostgresMailboxLocks(backend.database, backend.identity, backend.lease, reactor)

    async def close(self) -> None:
        for backend in self._backends:
            assert backend.database is not None and backend.lease is not None
            await backend.lease.stop()
            await backend.database.stop()


@pytest.fixture(params=["embedded", "postgresql"])
def processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Processes]:
    dsn = request.getfixturevalue("state_dsn") if request.param == "postgresql" else None
    made = Processes(request.param, tmp_path, dsn)
    yield made
    pytest_twisted.blockon(Deferred.fromCoroutine(made.close()))


async def held(locks: MailboxLocks, key: str, label: str) -> MailboxLease:
    lease = await locks.acquire(key, label)
    assert isinstance(lease, MailboxLease), lease
    return lease


async def refused(locks: MailboxLocks, key: str, label: str) -> str:
    """Who holds `key`, as the log line names it."""
    answer = await locks.acquire(key, label)
    assert isinstance(answer, InUse), answer
    return f"{answer.holder} ({answer.process})" if answer.process else answer.holder


# -- one suite, two backends ---------------------------------------------------


@ensureDeferred
async def test_one_session_per_mailbox_until_it_releases(processes: Processes) -> None:
    locks = await processes.new()
    printer = await held(locks, KEY, "printer")
    assert await refused(locks, KEY, "copier") == "printer"
    fax = await held(locks, OTHER, "fax")
    await locks.release(printer)
    copier = await held(locks, KEY, "copier")
    assert await refused(locks, KEY, "printer") == "copier"
    await locks.release(copier)
    await locks.release(fax)


@ensureDeferred
async def test_two_processes_exclude_each_other_and_the_refusal_names_the_holder(
    processes: Processes,
) -> None:
    first, second = await processes.new(), await processes.new()
    printer = await held(first, KEY, "printer")
    assert "printer" in await refused(second, KEY, "copier")
    await first.release(printer)
    copier = await held(second, KEY, "copier")
    assert "copier" in await refused(first, KEY, "printer")
    await second.release(copier)
    await first.release(await held(first, KEY, "printer"))


@ensureDeferred
async def test_a_second_release_does_not_free_a_newer_holder(processes: Processes) -> None:
    first, second = await processes.new(), await processes.new()
    old = await held(first, KEY, "printer")
    await first.release(old)
    new = await held(first, KEY, "copier")
    await first.release(old)
    assert "copier" in await refused(second, KEY, "fax")
    assert "copier" in await refused(first, KEY, "fax")
    await first.release(new)


@ensureDeferred
async def test_keys_are_compared_exactly(processes: Processes) -> None:
    locks, other = await processes.new(), await processes.new()
    keys = [
        "corp\0a/b\0INBOX",
        "corp/a\0b\0INBOX",
        "corp\0a\0b/INBOX",
        "corp\0späť@example.com\0Scan “in” \u00a0",
    ]
    leases = [await held(locks, key, f"device{n}") for n, key in enumerate(keys)]
    for n, key in enumerate(keys):
        assert f"device{n}" in await refused(other, key, "x")
    for lease in leases:
        await locks.release(lease)


# -- embedded: file locks across real processes ---------------------------------

CHILD = """
import sys, time
from pathlib import Path
from gateway.locks.files import FileMailboxLocks
key = sys.argv[2].replace("|", "\\0")
answer = FileMailboxLocks(Path(sys.argv[1])).acquire(key, "child-device").result
assert type(answer).__name__ == "MailboxLease", answer
print("held", flush=True)
time.sleep(120)
"""


@ensureDeferred
async def test_a_lock_held_by_another_process_is_free_at_once_when_it_is_killed(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "locks"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), KEY.replace("\0", "|")],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "held\n"
        locks = FileMailboxLocks(directory)
        holder = await refused(locks, KEY, "printer")
        assert holder == f"child-device ({child.pid})"
        child.kill()
        child.wait()
        lease = await held(locks, KEY, "printer")
        await locks.release(lease)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()


@ensureDeferred
async def test_an_unusable_lock_directory_is_a_temporary_failure(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file where the state directory should be")
    locks = FileMailboxLocks(tmp_path / "state" / "locks")
    with pytest.raises(LockUnavailable, match="state directory"):
        await locks.acquire(KEY, "printer")


# -- PostgreSQL: leases, takeover, lapses ----------------------------------------


def logged(text: str) -> Deferred[None]:
    """Fires when a log event whose format holds `text` is emitted."""
    seen: Deferred[None] = Deferred()

    def observe(event: dict[str, Any]) -> None:
        if text in (event.get("log_format") or ""):
            globalLogPublisher.removeObserver(observe)
            seen.callback(None)

    globalLogPublisher.addObserver(observe)
    return seen


def _insert_process(cluster: PostgresCluster, dsn: str, name: str, seconds: float) -> None:
    cluster.query(
        dsn,
        "INSERT INTO gateway_processes (process, node, pid, lease_until)"
        " VALUES (%s, 'elsewhere', 1, now() + make_interval(secs => %s))",
        name,
        seconds,
    )


def _insert_lock(cluster: PostgresCluster, dsn: str, key: str, process: str) -> None:
    cluster.query(
        dsn,
        "INSERT INTO gateway_mailbox_locks (mailbox, process, label, token)"
        " VALUES (%s, %s, 'their-device', 'theirs')",
        row_key(key),
        process,
    )


@ensureDeferred
async def test_locks_of_dead_or_unknown_processes_are_taken_over(
    postgres: PostgresCluster, state_dsn: str, tmp_path: Path
) -> None:
    third = "corp\0third@example.com\0INBOX"
    _insert_process(postgres, state_dsn, "dead:1:aa", -1)
    _insert_process(postgres, state_dsn, "alive:1:bb", 60)
    _insert_lock(postgres, state_dsn, KEY, "dead:1:aa")
    _insert_lock(postgres, state_dsn, OTHER, "gone:1:cc")
    _insert_lock(postgres, state_dsn, third, "alive:1:bb")
    processes = Processes("postgresql", tmp_path, state_dsn)
    try:
        locks = await processes.new()
        taken = [await held(locks, KEY, "printer"), await held(locks, OTHER, "fax")]
        assert await refused(locks, third, "copier") == "their-device (alive:1:bb)"
        rows = postgres.query(state_dsn, "SELECT label FROM gateway_mailbox_locks ORDER BY label")
        assert rows == [("fax",), ("printer",), ("their-device",)]
        for lease in taken:
            await locks.release(lease)
        rows = postgres.query(state_dsn, "SELECT process FROM gateway_mailbox_locks")
        assert rows == [("alive:1:bb",)]
    finally:
        await processes.close()


@ensureDeferred
async def test_a_process_that_stops_renewing_holds_its_locks_for_the_lease_time_only(
    postgres: PostgresCluster, state_dsn: str, tmp_path: Path
) -> None:
    """A process killed right after renewing: its lock holds until its lease
    passes, and no longer."""
    lease_time = 4.0
    victim = ProcessIdentity("victim", 1, "dd")
    database = Database(postgres_settings(state_dsn), reactor)
    processes = Processes("postgresql", tmp_path, state_dsn)
    try:
        _insert_process(postgres, state_dsn, victim.name, lease_time)
        renewed = time.monotonic()
        # No ProcessLease: nothing renews it, as after kill -9.
        dying = PostgresMailboxLocks(database, victim, None, reactor)
        await held(dying, KEY, "printer")
        survivor = await processes.new()
        assert "printer (victim:1:dd)" == await refused(survivor, KEY, "copier")
        while True:
            answer = await survivor.acquire(KEY, "copier")
            if isinstance(answer, MailboxLease):
                break
            assert time.monotonic() - renewed < lease_time + 2.0, "lock not free in time"
            await deferLater(reactor, 0.2, lambda: None)
        assert time.monotonic() - renewed >= lease_time - 0.5
        await survivor.release(answer)
    finally:
        await processes.close()
        await database.stop()


@ensureDeferred
async def test_a_lapsed_lease_drops_its_sessions_and_refuses_until_renewed(
    tmp_path: Path,
) -> None:
    with PostgresCluster() as cluster:
        dsn = migrated_database(cluster)
        backend = backend_for(postgres_settings(dsn, lease_time=2.0, timeout=1.0), reactor)
        assert backend.database is not None and backend.lease is not None
        await backend.lease.start()
        locks = PostgresMailboxLocks(backend.database, backend.identity, backend.lease, reactor)
        try:
            lease = await held(locks, KEY, "printer")
            lost: Deferred[None] = Deferred()
            lease.on_lost(lambda: lost.callback(None))
            cluster.stop("immediate")
            await lost
            with pytest.raises(LockUnavailable, match="lease"):
                await locks.acquire(OTHER, "fax")
            # The session that held it ends: the release waits for the database.
            missed = logged("mailbox lock release not stored")
            released = locks.release(lease)
            await missed
            assert not released.called
            cluster.start()
            await released
            while not backend.lease.alive:
                await deferLater(reactor, 0.2, lambda: None)
            assert cluster.query(dsn, "SELECT count(*) FROM gateway_mailbox_locks") == [(0,)]
            await locks.release(await held(locks, KEY, "copier"))
        finally:
            await backend.lease.stop()
            await backend.database.stop()


@ensureDeferred
async def test_an_unreachable_database_is_a_temporary_failure(tmp_path: Path) -> None:
    with PostgresCluster() as cluster:
        dsn = migrated_database(cluster)
        backend = backend_for(postgres_settings(dsn, timeout=1.0), reactor)
        assert backend.database is not None and backend.lease is not None
        await backend.lease.start()
        locks = PostgresMailboxLocks(backend.database, backend.identity, backend.lease, reactor)
        try:
            cluster.stop("immediate")
            with pytest.raises(LockUnavailable, match="state database"):
                await locks.acquire(KEY, "printer")
            # Recovery once the server is back: the lapse test above, and the
            # twistd gateway in test_mailbox_locks_gateway.py.
        finally:
            await backend.lease.stop()
            await backend.database.stop()


@ensureDeferred
async def test_state_status_counts_the_locks_of_live_processes_by_node(
    postgres: PostgresCluster, state_dsn: str, tmp_path: Path
) -> None:
    _insert_process(postgres, state_dsn, "dead:1:aa", -1)
    _insert_lock(postgres, state_dsn, OTHER, "dead:1:aa")
    processes = Processes("postgresql", tmp_path, state_dsn)
    try:
        locks = await processes.new(node="node-x")
        lease = await held(locks, KEY, "printer")
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'state_dir = "{tmp_path / "state"}"\n'
            f'[state]\nbackend = "postgresql"\ndsn = "{state_dsn}"\n'
        )
        config.chmod(0o600)
        status = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "--config", str(config), "state", "status"],
            capture_output=True,
            text=True,
            check=False,
            cwd=REPO_ROOT,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert "locks held: 1\n  node-x: 1\n" in status.stdout
        await locks.release(lease)
    finally:
        await processes.close()
