"""Login penalties on both state backends: the book's promises on each, then
what PostgreSQL adds: two books (two processes) on one database count one
attacker once, and a database that is down never stops a login."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from gateway.model import PenaltySettings, StateSettings
from gateway.penalties import PenaltyBook, SharedPenaltyBook, penalty_book
from gateway.penalties.postgres import PostgresPenaltyStore
from gateway.penalties.shared import PRUNE_EVERY
from gateway.penalties.sqlite import SQLitePenaltyStore
from gateway.state.backend import StateBackend
from gateway.state.database import Database
from gateway.state.processes import ProcessIdentity
from tests.harness.postgres import PostgresCluster
from tests.helpers.log_lines import captured_log
from tests.helpers.state import backend_for, migrated_database, postgres_settings, state_toml

pytestmark = pytest.mark.integration

SETTINGS = PenaltySettings(lockout_after=4, lockout_window=600, lockout_time=900)
ATTACKER = "203.0.113.9"


class Books:
    """Books of one backend on one memory clock; with PostgreSQL, or with
    SQLite in the state directory (`shared_dir`: worker processes), each is
    another process (its own identity) on the same store."""

    def __init__(self, backend: StateBackend, clock: Clock, shared_dir: Path | None = None) -> None:
        self.backend = backend
        self.clock = clock
        self.shared_dir = shared_dir
        self._databases: list[Database] = []

    def book(self, settings: PenaltySettings = SETTINGS, book: str = "devices") -> PenaltyBook:
        if self.shared_dir is not None:
            process = ProcessIdentity.here("n").name
            store = SQLitePenaltyStore.in_state_dir(self.shared_dir, book, process)
            return SharedPenaltyBook(settings, self.clock, store)
        if self.backend.database is None:
            return penalty_book(settings, self.clock, self.backend)
        # Each a process of its own: its own identity (and pool, as a process has).
        database = Database(self.backend.settings, reactor)
        self._databases.append(database)
        store = PostgresPenaltyStore(database, book, ProcessIdentity.here("n").name)
        return SharedPenaltyBook(settings, self.clock, store)

    async def close(self) -> None:
        for database in self._databases:
            await database.stop()
        if self.backend.database is not None:
            await self.backend.database.stop()


async def settle(*books: PenaltyBook) -> None:
    """What each shared book saw is written, then each has looked at the others'."""
    shared = [b for b in books if isinstance(b, SharedPenaltyBook)]
    for each in shared:
        await each.written()
    for each in shared:
        await each.refresh()


def _books(request: pytest.FixtureRequest, tmp_path: Path) -> Books:
    if request.param == "postgresql":
        backend = backend_for(postgres_settings(request.getfixturevalue("state_dsn")), reactor)
        return Books(backend, Clock())
    backend = backend_for(StateSettings(), reactor)
    return Books(backend, Clock(), tmp_path / "state" if request.param == "workers" else None)


@async_yield_fixture(params=["embedded", "workers", "postgresql"])
async def books(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Books]:
    made = _books(request, tmp_path)
    made.clock.advance(1_700_000_000)
    try:
        yield made
    finally:
        await made.close()


# -- the book's promises, on each backend ----------------------------------------------


@ensureDeferred
async def test_failures_double_the_pause_then_lock_the_address_out(books: Books) -> None:
    book = books.book()
    delays = []
    for n in range(3):
        delays.append(book.delay_for(ATTACKER, "printer"))
        assert book.failed(ATTACKER, "printer", b"guess%d" % n) == ()
    assert delays == [0, 2, 4]
    [lockout] = book.failed(ATTACKER, "printer", b"guess3")
    assert lockout.kind == "lockout" and lockout.failures == 4
    assert book.locked(ATTACKER) and not book.locked("203.0.113.10")
    await settle(book)
    assert book.locked(ATTACKER)  # its own events are not counted twice
    books.clock.advance(SETTINGS.lockout_time + 1)
    assert not book.locked(ATTACKER)


@ensureDeferred
async def test_a_repeated_attempt_counts_once_and_a_success_clears(books: Books) -> None:
    book = books.book()
    for _ in range(5):
        book.failed(ATTACKER, "printer", b"same stale password")
    assert book.delay_for(ATTACKER, "printer") == 2 and not book.locked(ATTACKER)
    book.succeeded(ATTACKER, "printer")
    await settle(book)
    assert book.delay_for(ATTACKER, "printer") == 0


@ensureDeferred
async def test_the_console_book_is_apart_from_the_devices_book(books: Books) -> None:
    devices, console = books.book(), books.book(book="console")
    for n in range(4):
        devices.failed(ATTACKER, "printer", b"%d" % n)
    await settle(devices, console)
    assert devices.locked(ATTACKER) and not console.locked(ATTACKER)
    assert console.delay_for(ATTACKER, "root") == 0


# -- shared (PostgreSQL, or SQLite for workers): one attacker counted once ---------------


@async_yield_fixture(params=["workers", "postgresql"])
async def shared(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Books]:
    made = _books(request, tmp_path)
    made.clock.advance(1_700_000_000)
    try:
        yield made
    finally:
        await made.close()


@ensureDeferred
async def test_a_lockout_reached_on_one_process_is_seen_by_another(shared: Books) -> None:
    a, b = shared.book(), shared.book()
    for n in range(4):
        a.failed(ATTACKER, "printer", b"%d" % n)
    assert a.locked(ATTACKER) and not b.locked(ATTACKER)
    await settle(a, b)
    assert b.locked(ATTACKER)
    shared.clock.advance(SETTINGS.lockout_time + 1)
    assert not a.locked(ATTACKER) and not b.locked(ATTACKER)


@ensureDeferred
async def test_guesses_spread_over_processes_are_counted_once(shared: Books) -> None:
    a, b = shared.book(), shared.book()
    a.failed(ATTACKER, "printer", b"1")
    a.failed(ATTACKER, "printer", b"2")
    await settle(a, b)
    # Two failures elsewhere: this process's next answer waits as long.
    assert b.delay_for(ATTACKER, "printer") == 4
    assert b.failed(ATTACKER, "scanner", b"3") == ()
    [lockout] = b.failed(ATTACKER, "fax", b"4")
    assert lockout.kind == "lockout" and lockout.failures == 4
    await settle(a, b)
    assert a.locked(ATTACKER)


@ensureDeferred
async def test_a_success_on_one_process_clears_the_pause_on_another(shared: Books) -> None:
    a, b = shared.book(), shared.book()
    a.failed(ATTACKER, "printer", b"1")
    await settle(a, b)
    assert b.delay_for(ATTACKER, "printer") == 2
    a.succeeded(ATTACKER, "printer")
    await settle(a, b)
    assert b.delay_for(ATTACKER, "printer") == 0


@ensureDeferred
async def test_a_process_started_later_learns_what_still_counts(shared: Books) -> None:
    settings = PenaltySettings(lockout_after=4, device_slow_after=3)
    a = shared.book(settings)
    a.succeeded("198.51.100.7", "printer")  # the printer's own address
    for n in range(4):
        a.failed(ATTACKER, "x", b"%d" % n)
    for n, address in enumerate(["192.0.2.1", "192.0.2.2", "192.0.2.3"]):
        a.failed(address, "printer", b"spray%d" % n)
    await settle(a)
    late = shared.book(settings)
    await settle(late)
    assert late.locked(ATTACKER)
    # The spray slows the name everywhere but where it logged in before.
    assert late.delay_for("192.0.2.99", "printer") > 0
    assert late.delay_for("198.51.100.7", "printer") == 0


@ensureDeferred
async def test_old_events_are_pruned_from_the_database(state_dsn: str) -> None:
    shared = Books(backend_for(postgres_settings(state_dsn), reactor), Clock())
    a = shared.book()
    a.failed("192.0.2.1", "printer", b"1")
    await settle(a)
    shared.clock.advance(SETTINGS.lockout_window + 1)
    assert isinstance(a, SharedPenaltyBook)
    for _ in range(PRUNE_EVERY):
        await a.refresh()
    database = Database(postgres_settings(state_dsn), reactor)
    try:
        rows = await database.run(
            lambda c: c.execute("SELECT count(*) FROM gateway_penalty_events").fetchone()
        )
    finally:
        await database.stop()
        await shared.close()
    assert rows == (0,)


# -- the database down ---------------------------------------------------------------


@ensureDeferred
async def test_the_database_down_leaves_penalties_local_and_catches_up() -> None:
    with PostgresCluster() as cluster:
        dsn = migrated_database(cluster)
        made = Books(backend_for(postgres_settings(dsn, timeout=2.0), reactor), Clock())
        made.clock.advance(1_700_000_000)
        try:
            a, b = made.book(), made.book()
            await settle(a, b)
            cluster.stop("immediate")
            with captured_log() as lines:
                delays: list[Any] = []
                for n in range(4):
                    delays.append(a.delay_for(ATTACKER, "printer"))
                    a.failed(ATTACKER, "printer", b"%d" % n)
                # Answered at once from memory, the store's trouble aside.
                assert delays == [0, 2, 4, 8] and a.locked(ATTACKER)
                await settle(a, b)
                await settle(a, b)
            warnings = [line for line in lines if "state database unavailable" in line]
            assert len(warnings) == 2, lines  # one line per book, not per failure
            assert not b.locked(ATTACKER)
            cluster.start()
            with captured_log() as lines:
                # a writes what it saw meanwhile, once the server takes
                # connections again (it may still be starting up at first).
                for _ in range(50):
                    await settle(a, b)
                    if b.locked(ATTACKER):
                        break
                    await deferLater(reactor, 0.2, lambda: None)
            assert b.locked(ATTACKER)
            shared_again = [line for line in lines if "penalties shared again" in line]
            assert len(shared_again) == 2, lines
        finally:
            await made.close()


@ensureDeferred
async def test_state_status_counts_the_addresses_locked_out(
    state_dsn: str, tmp_path: Path
) -> None:
    shared = Books(backend_for(postgres_settings(state_dsn), reactor), Clock())
    a = shared.book(PenaltySettings(lockout_after=2, lockout_time=3600))
    shared.clock.advance(time.time() - shared.clock.seconds())  # `status` reads now()
    for n in range(2):
        a.failed(ATTACKER, "printer", b"%d" % n)
    await settle(a)
    config = tmp_path / "gateway.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n' + state_toml(state_dsn))
    config.chmod(0o600)
    status = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(config), "state", "status", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    await shared.close()
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["login lockouts"] == {"devices": 1}
