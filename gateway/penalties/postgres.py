"""The penalty store in PostgreSQL (schema: migrations/0003_penalties.sql).

Each method is one short transaction on the state database's thread pool
(`Database.run`); the book never waits for one before answering a login.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from twisted.internet.defer import Deferred

from gateway.penalties.sql import Cursor, PenaltySQL, SQLPenaltyStore
from gateway.state.database import Database

Connection = psycopg.Connection[Any]
T = TypeVar("T")


class PostgresPenaltyStore(SQLPenaltyStore):
    """`PenaltyStore` on `Database`: one book's events, this process's name."""

    sql = PenaltySQL.spelled(
        "gateway_penalty_events", "gateway_penalty_known", param="%s", greatest="greatest"
    )

    def __init__(self, database: Database, book: str, process: str) -> None:
        super().__init__(book, process)
        self._database = database

    def _run(self, work: Callable[[Cursor], T]) -> Deferred[T]:
        def on_connection(connection: Connection) -> T:
            with connection.cursor() as cursor:
                return work(cursor)

        return self._database.run(on_connection)
