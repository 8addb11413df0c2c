"""`[state]`: which state backend, and how to reach PostgreSQL (gateway.state).

The database password is read from a file, like every other secret, so the
configuration file itself can stay world-readable.
"""

from __future__ import annotations

from gateway.config.reader import Table
from gateway.config.secrets import check_secret_file, read_secret_file
from gateway.model import STATE_BACKENDS, Secret, StateSettings


def state_section(table: Table) -> StateSettings:
    d = StateSettings()
    backend = table.choice("backend", STATE_BACKENDS, d.backend) or d.backend
    dsn = table.string("dsn", None)
    password_file = table.file("password_file", None)
    node = table.string("node", d.node)
    lease_time = table.seconds("lease_time", d.lease_time)
    pool_size = table.integer("pool_size", d.pool_size, low=1, high=64)
    timeout = table.seconds("timeout", d.timeout)
    password: Secret | None = None
    if password_file is not None:
        check_secret_file(table, "password_file", password_file)
        password = read_secret_file(table, "password_file", password_file)
    if backend == "postgresql" and not dsn:
        table.problem("dsn", 'is required with backend = "postgresql"')
    if dsn and "password=" in dsn.replace(" ", "").lower():
        table.problem("dsn", "must not hold the password: put it in password_file")
    if lease_time is not None and lease_time < 5:
        table.problem("lease_time", "must be at least 5 seconds")
    table.finish()
    return StateSettings(
        backend=backend,
        dsn=dsn or "",
        password=password,
        node=node or "",
        lease_time=d.lease_time if lease_time is None else lease_time,
        pool_size=d.pool_size if pool_size is None else pool_size,
        timeout=d.timeout if timeout is None else timeout,
    )
