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
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from gateway.penalties.sql import Cursor, PenaltySQL, SQLPenaltyStore
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


class SQLitePenaltyStore(SQLPenaltyStore):
    """`PenaltyStore` in `state_dir/penalties.sqlite`: one book, this process's name."""

    sql = PenaltySQL.spelled("penalty_events", "penalty_known", param="?", greatest="max")

    def __init__(
        self,
        path: Path,
        book: str,
        process: str,
        run_in_thread: Callable[..., Deferred[Any]] = deferToThread,
    ) -> None:
        super().__init__(book, process)
        self.path = path
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

    def _run(self, work: Callable[[Cursor], T]) -> Deferred[T]:
        def in_thread() -> T:
            connection = self._connection()
            with connection:  # one transaction: committed, or rolled back on error
                return work(connection.cursor())

        return self._run_in_thread(in_thread)
