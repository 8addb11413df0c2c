"""The penalty store's reads and writes, once for both databases that hold
it (PostgreSQL for a cluster's nodes, SQLite for one host's workers).

The two differ only in what the SQL spells differently (table names, the
driver's parameter marker, `greatest` or `max`) and in how a transaction
reaches its connection, so a store says those and this base does the rest:
a change to what an event is, or to which events a process reads back,
is made here once and holds for both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred

from gateway.penalties.shared import PenaltyEvent

T = TypeVar("T")


class Cursor(Protocol):
    """What the statements need of a DB-API cursor (psycopg's or sqlite3's)."""

    def execute(self, query: str, params: Sequence[Any], /) -> object: ...

    def executemany(self, query: str, params_seq: Iterable[Sequence[Any]], /) -> object: ...

    def fetchall(self) -> list[Any]: ...


@dataclass(frozen=True)
class PenaltySQL:
    """The penalty statements in one database's spelling."""

    insert_event: str
    upsert_known: str
    select_changes: str
    select_known: str
    prune_events: str
    prune_known: str

    @classmethod
    def spelled(cls, events: str, known: str, param: str, greatest: str) -> PenaltySQL:
        """`events` and `known` name the tables, `param` is the driver's
        parameter marker and `greatest` its function for the larger of two values."""
        p = param
        return cls(
            insert_event=f"INSERT INTO {events} (book, process, kind, at, network, name, until)"
            f" VALUES ({', '.join([p] * 7)})",
            upsert_known=f"INSERT INTO {known} (book, name, network, until)"
            f" VALUES ({p}, {p}, {p}, {p}) ON CONFLICT (book, name, network)"
            f" DO UPDATE SET until = {greatest}({known}.until, excluded.until)",
            select_changes=f"SELECT id, kind, at, network, name, until FROM {events}"
            f" WHERE book = {p} AND id > {p} AND process <> {p} AND (at > {p} OR until > {p})"
            " ORDER BY id",
            select_known=f"SELECT name, network, until FROM {known}"
            f" WHERE book = {p} AND until > {p} ORDER BY until DESC LIMIT {p}",
            prune_events=f"DELETE FROM {events} WHERE book = {p} AND at <= {p}"
            f" AND (until IS NULL OR until <= {p} OR kind = 'success')",
            prune_known=f"DELETE FROM {known} WHERE book = {p} AND until <= {p}",
        )


class SQLPenaltyStore:
    """`PenaltyStore` over `sql`: one book's events, this process's name.
    A subclass runs each piece of work in one transaction (`_run`)."""

    sql: PenaltySQL

    def __init__(self, book: str, process: str) -> None:
        self._book = book
        self._process = process

    def _run(self, work: Callable[[Cursor], T]) -> Deferred[T]:
        raise NotImplementedError

    def record(self, events: Sequence[PenaltyEvent]) -> Deferred[None]:
        rows = [
            (self._book, self._process, e.kind, e.at, e.network, e.name, e.until) for e in events
        ]
        known = [
            (self._book, e.name, e.network, e.until)
            for e in events
            if e.kind == "success" and e.until is not None
        ]

        def work(cursor: Cursor) -> None:
            cursor.executemany(self.sql.insert_event, rows)
            if known:
                cursor.executemany(self.sql.upsert_known, known)

        return self._run(work)

    def changes(
        self, after: int, since: float, now: float
    ) -> Deferred[list[tuple[int, PenaltyEvent]]]:
        def work(cursor: Cursor) -> list[tuple[int, PenaltyEvent]]:
            cursor.execute(self.sql.select_changes, (self._book, after, self._process, since, now))
            rows = cursor.fetchall()
            return [
                (int(i), PenaltyEvent(kind, float(at), network, name, until))
                for i, kind, at, network, name, until in rows
            ]

        return self._run(work)

    def known(self, now: float, limit: int) -> Deferred[list[PenaltyEvent]]:
        def work(cursor: Cursor) -> list[PenaltyEvent]:
            cursor.execute(self.sql.select_known, (self._book, now, limit))
            rows = cursor.fetchall()
            return [
                PenaltyEvent("success", now, network, name, float(until))
                for name, network, until in reversed(rows)
            ]

        return self._run(work)

    def prune(self, since: float, now: float) -> Deferred[None]:
        def work(cursor: Cursor) -> None:
            cursor.execute(self.sql.prune_events, (self._book, since, now))
            cursor.execute(self.sql.prune_known, (self._book, now))

        return self._run(work)
