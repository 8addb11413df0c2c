"""State backends for tests: a migrated PostgreSQL database, or the embedded one.

"One suite, two backends": a test that takes the `state_backend` fixture runs
once with each (its id says which); pieces of state (locks, tokens, spool,
...) build their implementation from the `StateBackend` it yields.
"""

from __future__ import annotations

from typing import Any

from gateway.model import StateSettings
from gateway.state.backend import StateBackend, open_state_backend
from gateway.state.database import connect
from gateway.state.schema import migrate
from tests.harness.postgres import PostgresCluster


def migrated_database(cluster: PostgresCluster) -> str:
    """A fresh database with the gateway's whole schema; its DSN."""
    dsn = cluster.create_database()
    with connect(StateSettings(backend="postgresql", dsn=dsn), autocommit=True) as connection:
        migrate(connection)
    return dsn


def postgres_settings(dsn: str, **overrides: Any) -> StateSettings:
    return StateSettings(backend="postgresql", dsn=dsn, **overrides)


def state_toml(dsn: str, **extra: object) -> str:
    """The `[state]` section a gateway process's config gets for `dsn`."""
    lines = ["[state]", 'backend = "postgresql"', f'dsn = "{dsn}"']
    lines += [
        f"{key} = {value!r}" if isinstance(value, str) else f"{key} = {value}"
        for key, value in extra.items()
    ]
    return "\n".join(line.replace("'", '"') for line in lines) + "\n"


def backend_for(settings: StateSettings, reactor: Any) -> StateBackend:
    backend = open_state_backend(settings, reactor)
    if backend.database is not None:
        backend.database.start()
    return backend
