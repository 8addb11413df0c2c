"""Exact POP3 sizes of Graph messages, measured once and kept in the state directory.

RFC 1939 wants LIST and STAT to give the exact octet count RETR sends. Graph
has no property holding it: the message resource's properties describe the
Outlook item, not the MIME content `$value` returns (graph/outlook-get-mime-message:
"Outlook does not save messages in MIME format"), so the only exact count is
the content itself. The Graph maildrop therefore streams each new message's
`$value` once, counts it in wire form (CRLF line ends, ending with CRLF, before
dot-stuffing), and keeps the count here keyed by the message's immutable id,
which does not change while the message stays in the mailbox, also across
folder moves (graph/outlook-immutable-id). Later logins read the sizes from
here: an unchanged folder costs one list request per 1000 messages and no
content download.

Entries not seen for `FORGET_AFTER` seconds are dropped, so a message moved
away and back within that time is not measured again. One transaction per
login; losing it costs one more measurement, nothing else. Nodes may measure
one message at once: both store the same count, the last write wins.

Two stores implement `SizeMap`: `GraphSizeStore` (embedded: SQLite in WAL
mode, shared by a host's worker processes, synchronous and short) and
`PostgresSizeStore` (every node, `gateway_graph_sizes`, on the state thread pool).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import psycopg
from twisted.internet.defer import Deferred, fail, succeed

from gateway.state import StateError, ensure_dir
from gateway.state.database import Database

FILENAME = "graph-sizes.sqlite3"
FORGET_AFTER = 30 * 24 * 3600.0
# Seconds a worker waits for another one's write before giving up (StateError).
BUSY_TIMEOUT = 5.0

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS size ("
    " account TEXT NOT NULL, message TEXT NOT NULL, octets INTEGER NOT NULL,"
    " seen REAL NOT NULL, PRIMARY KEY (account, message))"
)


class SizeMap(Protocol):
    """Where exact sizes are kept. Failures: StateError or StateUnavailable."""

    def known_sizes(self, account: str, messages: Iterable[str]) -> Deferred[dict[str, int]]: ...

    def record_sizes(
        self, account: str, sizes: Mapping[str, int], seen: Iterable[str]
    ) -> Deferred[None]: ...


class GraphSizeStore:
    """Immutable id -> exact wire size, per account. Methods raise StateError."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            ensure_dir(path.parent)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT)
            self._db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise StateError(f"Graph size store {path}: {e}") from None

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> GraphSizeStore:
        return cls(state_dir / FILENAME)

    def close(self) -> None:
        self._db.close()

    def known_sizes(self, account: str, messages: Iterable[str]) -> Deferred[dict[str, int]]:
        try:
            return succeed(self.known(account, messages))
        except StateError:
            return fail()

    def record_sizes(
        self, account: str, sizes: Mapping[str, int], seen: Iterable[str]
    ) -> Deferred[None]:
        try:
            self.record(account, sizes, seen)
        except StateError:
            return fail()
        return succeed(None)

    def known(self, account: str, messages: Iterable[str]) -> dict[str, int]:
        wanted = set(messages)
        try:
            rows = self._db.execute(
                "SELECT message, octets FROM size WHERE account = ?", (account,)
            ).fetchall()
        except sqlite3.Error as e:
            raise StateError(f"Graph size store: {e}") from None
        return {message: octets for message, octets in rows if message in wanted}

    def record(
        self,
        account: str,
        sizes: Mapping[str, int],
        seen: Iterable[str],
        *,
        now: float | None = None,
    ) -> None:
        """Store new `sizes`, mark `seen` messages as present now, forget old ones."""
        now = time.time() if now is None else now
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO size (account, message, octets, seen) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (account, message) DO UPDATE SET octets = excluded.octets, "
                    "seen = excluded.seen",
                    [(account, m, n, now) for m, n in sizes.items()],
                )
                self._db.executemany(
                    "UPDATE size SET seen = ? WHERE account = ? AND message = ?",
                    [(now, account, m) for m in seen if m not in sizes],
                )
                self._db.execute(
                    "DELETE FROM size WHERE account = ? AND seen < ?",
                    (account, now - FORGET_AFTER),
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            raise StateError(f"Graph size store: {e}") from None


class PostgresSizeStore:
    """`SizeMap` on the state database (table `gateway_graph_sizes`)."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def known_sizes(self, account: str, messages: Iterable[str]) -> Deferred[dict[str, int]]:
        wanted = set(messages)

        def work(connection: psycopg.Connection[Any]) -> dict[str, int]:
            rows = connection.execute(
                "SELECT message, octets FROM gateway_graph_sizes WHERE account = %s", (account,)
            )
            return {message: int(octets) for message, octets in rows if message in wanted}

        return self._database.run(work)

    def record_sizes(
        self, account: str, sizes: Mapping[str, int], seen: Iterable[str]
    ) -> Deferred[None]:
        sizes = dict(sizes)
        others = [m for m in seen if m not in sizes]

        def work(connection: psycopg.Connection[Any]) -> None:
            with connection.cursor() as cursor:
                if sizes:
                    cursor.executemany(
                        "INSERT INTO gateway_graph_sizes (account, message, octets, seen)"
                        " VALUES (%s, %s, %s, now()) ON CONFLICT (account, message)"
                        " DO UPDATE SET octets = excluded.octets, seen = excluded.seen",
                        [(account, m, n) for m, n in sizes.items()],
                    )
                if others:
                    cursor.execute(
                        "UPDATE gateway_graph_sizes SET seen = now()"
                        " WHERE account = %s AND message = ANY(%s)",
                        (account, others),
                    )
                cursor.execute(
                    "DELETE FROM gateway_graph_sizes WHERE account = %s"
                    " AND seen < now() - make_interval(secs => %s)",
                    (account, FORGET_AFTER),
                )

        return self._database.run(work)
