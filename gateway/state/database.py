"""PostgreSQL for the gateway: psycopg 3 connections used from a thread pool.

psycopg's connections block. The reactor thread never touches one: every
piece of work is a plain function of a connection, run in one transaction on
a thread of this module's own pool (sized with `[state] pool_size`, the same
as the connection pool, so a thread never waits for a connection that a
waiting thread holds). The caller gets a Deferred.

Why threads rather than psycopg's asyncio API: the gateway runs on Twisted's
default epoll reactor under twistd; an asyncio reactor would change the event
loop under every other subsystem for one of them.

A database that cannot be reached, or that drops the connection, raises
`StateUnavailable` within `[state] timeout`: callers turn it into the
protocol's "try again later" (`-ERR [SYS/TEMP]`, SMTP 421/451), never into an
acceptance. The pool checks a connection before lending it, so the first
transaction after a database restart gets a fresh connection instead of a
dead one, and the gateway recovers without being restarted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from gateway.model import StateSettings

T = TypeVar("T")

# What a piece of database work is: one transaction on one connection.
Work = Callable[[psycopg.Connection[Any]], T]

APPLICATION_NAME = "mail-gateway"

# psycopg_pool reports every failed connection attempt through the standard
# library's logging, which (with no handler configured) Python prints on
# stderr and twistd logs as errors, several per second during an outage. The
# gateway's own lines say once what failed and what the device was told.
_pool_log = logging.getLogger("psycopg.pool")
_pool_log.addHandler(logging.NullHandler())
_pool_log.propagate = False
RECONNECT_GIVE_UP = 8.0


class StateUnavailable(Exception):
    """The state database cannot be used right now; the text says why (it
    never holds the password: psycopg's messages name host and port only)."""


def connection_options(settings: StateSettings) -> dict[str, Any]:
    """What every connection gets besides the DSN. TCP keepalives make a cut
    network show as an error within seconds rather than the kernel's two
    hours, both here and (through the server's own settings) for locks."""
    options: dict[str, Any] = {
        "application_name": APPLICATION_NAME,
        "connect_timeout": max(1, round(settings.timeout)),
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
    }
    if settings.password is not None:
        options["password"] = settings.password.reveal()
    return options


def connect(settings: StateSettings, **extra: Any) -> psycopg.Connection[Any]:
    """One blocking connection, for the `gateway` command (no reactor there)."""
    try:
        return psycopg.connect(settings.dsn, **connection_options(settings), **extra)
    except psycopg.OperationalError as e:
        raise StateUnavailable(describe(e)) from None


def describe(error: BaseException) -> str:
    """One line for logs and device-facing errors' log lines."""
    if isinstance(error, PoolTimeout):
        return "no database connection within the timeout"
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class Database:
    """The connection pool and the threads that use it, for one process."""

    def __init__(self, settings: StateSettings, reactor: Any) -> None:
        self.settings = settings
        self._reactor = reactor
        self._threads = ThreadPool(
            minthreads=0, maxthreads=settings.pool_size, name="gateway-state"
        )
        self._pool = ConnectionPool(
            settings.dsn,
            kwargs=connection_options(settings),
            min_size=1,
            max_size=settings.pool_size,
            timeout=settings.timeout,
            check=ConnectionPool.check_connection,
            # The pool retries a lost server with a doubling pause; giving up
            # after this long lets the next request start again at once, so
            # a restarted server is used within seconds, not minutes.
            reconnect_timeout=RECONNECT_GIVE_UP,
            open=False,
            name="gateway-state",
        )
        self._started = False

    def start(self) -> None:
        """Start the threads and let the pool connect in the background: a
        database that is down at start-up is not fatal, it is retried."""
        if self._started:
            return
        self._started = True
        self._threads.start()
        # Non-daemon threads would keep a stopped process alive: a reactor
        # that stops without stopping this service still lets them go.
        self._reactor.addSystemEventTrigger("after", "shutdown", self._stop_threads)
        self._pool.open(wait=False)

    def stop(self) -> Deferred[None]:
        """Close the pool on a pool thread (closing waits for connections),
        then stop the threads."""
        if not self._started:
            return succeed(None)
        self._started = False
        closing: Deferred[None] = deferToThreadPool(
            self._reactor, self._threads, self._pool.close, 5.0
        )

        closing.addBoth(lambda _: self._stop_threads())
        return closing

    def _stop_threads(self) -> None:
        if self._threads.started and not self._threads.joined:
            self._threads.stop()

    def run(self, work: Work[T]) -> Deferred[T]:
        """Run `work(connection)` in one transaction on a pool thread: committed
        if it returns, rolled back if it raises. Unreachable database or lost
        connection: the Deferred fails with `StateUnavailable`."""
        if not self._started:
            self.start()
        return deferToThreadPool(self._reactor, self._threads, self.run_blocking, work)

    def run_blocking(self, work: Work[T]) -> T:
        """`run` without the thread hop: only for pool threads and the CLI."""
        try:
            with self._pool.connection() as connection:
                return work(connection)
        except psycopg.OperationalError as e:
            raise StateUnavailable(describe(e)) from None

    def stats(self) -> dict[str, int]:
        """The pool's counters, for metrics (no connection details)."""
        return {key: int(value) for key, value in self._pool.get_stats().items()}
