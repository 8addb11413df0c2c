"""The penalty store of the embedded backend's worker processes: one SQLite
file in `state_dir` (WAL, so readers never wait for the writer; a busy
timeout for the writers), shared by the workers of one host the way
PostgreSQL shares it between nodes (`gateway.penalties.shared`).

SQLite blocks, and a writer may wait for another worker's transaction, so
every call runs on a thread of the reactor's pool, never on the reactor
thread; each thread keeps its own connection.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from gateway.penalties.shared import PenaltyEvent
from gateway.state.files import ensure_dir

FILENAME = "penalties.sqlite"
# Milliseconds a writer waits for another worker's transaction.
BUSY_TIMEOUT = 5000

T = TypeVar("T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS penalty_events ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, book TEXT NOT NULL, process TEXT NOT NULL,"
    " kind TEXT NOT NULL, at REAL NOT NULL, network TEXT NOT NULL,"
    " name TEXT NOT NULL DEFAULT '', until REAL)",
    "CREATE INDEX IF NOT EXISTS penalty_events_at ON penalty_events (at)",
    "CREATE TABLE IF NOT EXISTS penalty_known ("
    " book TEXT NOT NULL, name TEXT NOT NULL, network TEXT NOT NULL, until REAL NOT NULL,"
    " PRIMARY KEY (book, name, network))",
)


class SQLitePenaltyStore:
    """`PenaltyStore` in `state_dir/penalties.sqlite`: one book, this process's name."""

    def __init__(
        self,
        path: Path,
        book: str,
        process: str,
        run_in_thread: Callable[..., Deferred[Any]] = deferToThread,
    ) -> None:
        self.path = path
        self._book = book
        self._process = process
        self._run_in_thread = run_in_thread
        self._local = threading.local()

    @classmethod
    def in_state_dir(cls, state_dir: Path, book: str, process: str) -> SQLitePenaltyStore:
        return cls(state_dir / FILENAME, book, process)

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            ensure_dir(self.path.parent)
            # Created private before SQLite opens it; its WAL files get the same mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT / 1000)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            with connection:
                for statement in _SCHEMA:
                    connection.execute(statement)
            self._local.connection = connection
        return connection

    def _run(self, work: Callable[[sqlite3.Connection], T]) -> Deferred[T]:
        def in_thread() -> T:
            connection = self._connection()
            with connection:  # one transaction: committed, or rolled back on error
                return work(connection)

        return self._run_in_thread(in_thread)

    def record(self, events: Sequence[PenaltyEvent]) -> Deferred[None]:
        rows = [
            (self._book, self._process, e.kind, e.at, e.network, e.name, e.until) for e in events
        ]
        known = [
            (self._book, e.name, e.network, e.until)
            for e in events
            if e.kind == "success" and e.until is not None
        ]

        def work(connection: sqlite3.Connection) -> None:
            connection.executemany(
                "INSERT INTO penalty_events (book, process, kind, at, network, name, until)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            connection.executemany(
                "INSERT INTO penalty_known (book, name, network, until) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (book, name, network)"
                " DO UPDATE SET until = max(until, excluded.until)",
                known,
            )

        return self._run(work)

    def changes(
        self, after: int, since: float, now: float
    ) -> Deferred[list[tuple[int, PenaltyEvent]]]:
        def work(connection: sqlite3.Connection) -> list[tuple[int, PenaltyEvent]]:
            rows = connection.execute(
                "SELECT id, kind, at, network, name, until FROM penalty_events"
                " WHERE book = ? AND id > ? AND process <> ? AND (at > ? OR until > ?)"
                " ORDER BY id",
                (self._book, after, self._process, since, now),
            ).fetchall()
            return [
                (int(i), PenaltyEvent(kind, float(at), network, name, until))
                for i, kind, at, network, name, until in rows
            ]

        return self._run(work)

    def known(self, now: float, limit: int) -> Deferred[list[PenaltyEvent]]:
        def work(connection: sqlite3.Connection) -> list[PenaltyEvent]:
            rows = connection.execute(
                "SELECT name, network, until FROM penalty_known"
                " WHERE book = ? AND until > ? ORDER BY until DESC LIMIT ?",
                (self._book, now, limit),
            ).fetchall()
            return [
                PenaltyEvent("success", now, network, name, float(until))
                for name, network, until in reversed(rows)
            ]

        return self._run(work)

    def prune(self, since: float, now: float) -> Deferred[None]:
        def work(connection: sqlite3.Connection) -> None:
            connection.execute(
                "DELETE FROM penalty_events WHERE book = ? AND at <= ?"
                " AND (until IS NULL OR until <= ? OR kind = 'success')",
                (self._book, since, now),
            )
            connection.execute(
                "DELETE FROM penalty_known WHERE book = ? AND until <= ?", (self._book, now)
            )

        return self._run(work)
