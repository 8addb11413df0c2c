"""The PostgreSQL schema: numbered SQL files applied in order, once each.

`gateway state migrate` applies what is missing; a gateway process only
checks, at start, that the database has exactly the schema it was built for,
so a node never writes rows an older or newer schema does not expect. The
files are `gateway/state/migrations/NNNN_name.sql`, each run in its own
transaction together with its row in `gateway_schema`; an advisory lock keeps
two admins migrating at once from applying one file twice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from gateway.state.files import StateError

MIGRATIONS = "gateway.state.migrations"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# pg_advisory_xact_lock key: "gwschema" as a number; any constant would do.
_LOCK_KEY = 0x6777736368656D61


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    found = []
    for entry in resources.files(MIGRATIONS).iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise StateError(f"two migration files share a number: {versions}")
    return found


def latest_version() -> int:
    return max((m.version for m in migrations()), default=0)


def applied_versions(connection: psycopg.Connection[Any]) -> set[int]:
    row = connection.execute("SELECT to_regclass('gateway_schema') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return set()
    return {int(v) for (v,) in connection.execute("SELECT version FROM gateway_schema")}


def _ensure_table(connection: psycopg.Connection[Any]) -> None:
    connection.execute(
        "CREATE TABLE IF NOT EXISTS gateway_schema ("
        " version integer PRIMARY KEY,"
        " name text NOT NULL,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )


def current_version(connection: psycopg.Connection[Any]) -> int:
    """0 for a database never migrated."""
    row = connection.execute("SELECT to_regclass('gateway_schema') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    row = connection.execute("SELECT coalesce(max(version), 0) FROM gateway_schema").fetchone()
    return int(row[0]) if row else 0


def migrate(connection: psycopg.Connection[Any]) -> list[Migration]:
    """Apply every missing migration, in order, each in its own transaction;
    return those applied. "Missing" is by number, not "above the highest":
    files are numbered as the pieces of state were written, not always in
    the order they land. `connection` must be in autocommit mode."""
    applied = []
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        _ensure_table(connection)
    for migration in migrations():
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            if migration.version in applied_versions(connection):
                continue
            connection.execute(migration.sql.encode())
            connection.execute(
                "INSERT INTO gateway_schema (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            applied.append(migration)
    return applied


def check(connection: psycopg.Connection[Any]) -> int:
    """The schema version, if it is the one this gateway needs; else why not."""
    have, want = current_version(connection), latest_version()
    missing = {m.version for m in migrations()} - applied_versions(connection)
    if missing:
        raise StateError(
            f"the state database has schema version {have}, this gateway needs {want}:"
            " run `gateway state migrate`"
        )
    if have > want:
        raise StateError(
            f"the state database has schema version {have}, newer than this gateway's"
            f" {want}: upgrade this node"
        )
    return have
