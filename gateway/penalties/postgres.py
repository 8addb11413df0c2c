"""The penalty store in PostgreSQL (schema: migrations/0003_penalties.sql).

Each method is one short transaction on the state database's thread pool
(`Database.run`); the book never waits for one before answering a login.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from twisted.internet.defer import Deferred

from gateway.penalties.shared import PenaltyEvent
from gateway.state.database import Database

Connection = psycopg.Connection[Any]


class PostgresPenaltyStore:
    """`PenaltyStore` on `Database`: one book's events, this process's name."""

    def __init__(self, database: Database, book: str, process: str) -> None:
        self._database = database
        self._book = book
        self._process = process

    def record(self, events: Sequence[PenaltyEvent]) -> Deferred[None]:
        rows = [
            (self._book, self._process, e.kind, e.at, e.network, e.name, e.until) for e in events
        ]
        known = [
            (self._book, e.name, e.network, e.until)
            for e in events
            if e.kind == "success" and e.until is not None
        ]

        def work(connection: Connection) -> None:
            with connection.cursor() as cursor:
                cursor.executemany(
                    "INSERT INTO gateway_penalty_events"
                    " (book, process, kind, at, network, name, until)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    rows,
                )
                if known:
                    cursor.executemany(
                        "INSERT INTO gateway_penalty_known (book, name, network, until)"
                        " VALUES (%s, %s, %s, %s) ON CONFLICT (book, name, network)"
                        " DO UPDATE SET until = greatest(gateway_penalty_known.until,"
                        " excluded.until)",
                        known,
                    )

        return self._database.run(work)

    def changes(
        self, after: int, since: float, now: float
    ) -> Deferred[list[tuple[int, PenaltyEvent]]]:
        def work(connection: Connection) -> list[tuple[int, PenaltyEvent]]:
            rows = connection.execute(
                "SELECT id, kind, at, network, name, until FROM gateway_penalty_events"
                " WHERE book = %s AND id > %s AND process <> %s"
                " AND (at > %s OR until > %s) ORDER BY id",
                (self._book, after, self._process, since, now),
            ).fetchall()
            return [
                (int(i), PenaltyEvent(kind, float(at), network, name, until))
                for i, kind, at, network, name, until in rows
            ]

        return self._database.run(work)

    def known(self, now: float, limit: int) -> Deferred[list[PenaltyEvent]]:
        def work(connection: Connection) -> list[PenaltyEvent]:
            rows = connection.execute(
                "SELECT name, network, until FROM gateway_penalty_known"
                " WHERE book = %s AND until > %s ORDER BY until DESC LIMIT %s",
                (self._book, now, limit),
            ).fetchall()
            return [
                PenaltyEvent("success", now, network, name, float(until))
                for name, network, until in reversed(rows)
            ]

        return self._database.run(work)

    def prune(self, since: float, now: float) -> Deferred[None]:
        def work(connection: Connection) -> None:
            connection.execute(
                "DELETE FROM gateway_penalty_events WHERE book = %s AND at <= %s"
                " AND (until IS NULL OR until <= %s OR kind = 'success')",
                (self._book, since, now),
            )
            connection.execute(
                "DELETE FROM gateway_penalty_known WHERE book = %s AND until <= %s",
                (self._book, now),
            )

        return self._database.run(work)
