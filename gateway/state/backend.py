"""Which state backend this process uses, and the service that runs it.

`StateBackend` is what the rest of the gateway is handed: the backend's name,
this process's identity and, for PostgreSQL, the database and this process's
lease. Each kind of state (mailbox locks, tokens, UIDL maps, spool,
penalties, console sessions) has its own interface beside its users and picks
its implementation from the backend here, so adding one touches nothing else.

`StateService` starts the database before the services that use it and stops
it after them. A database that is unreachable at start is waited for (the
gateway is not ready until then, `/readyz` says so); one with the wrong
schema stops the gateway, since it would write rows that schema does not
expect.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

from gateway.model import StateSettings
from gateway.state.database import Database, StateUnavailable
from gateway.state.files import StateError
from gateway.state.processes import ProcessIdentity, ProcessLease
from gateway.state.schema import check

log = Logger(namespace="gateway.state")

# Seconds between attempts to reach a database that was down at start.
START_RETRY = 2.0
# sysexits.h: a configuration error; not worth restarting.
EX_CONFIG = 78


@dataclass
class StateBackend:
    settings: StateSettings
    identity: ProcessIdentity
    # Both None with the embedded backend.
    database: Database | None = None
    lease: ProcessLease | None = None

    @property
    def name(self) -> str:
        return self.settings.backend

    @property
    def shared(self) -> bool:
        """Whether other nodes see this state (PostgreSQL) or only this host."""
        return self.database is not None


def open_state_backend(settings: StateSettings, reactor: Any) -> StateBackend:
    identity = ProcessIdentity.here(settings.node)
    if settings.backend != "postgresql":
        return StateBackend(settings, identity)
    database = Database(settings, reactor)
    return StateBackend(
        settings, identity, database, ProcessLease(database, identity, settings.lease_time, reactor)
    )


class StateService(Service):
    """Opens the state database for the services started after it."""

    name = "state"

    def __init__(self, backend: StateBackend, reactor: Any) -> None:
        self.backend = backend
        self._reactor = reactor
        # True once the schema has been checked and this process's lease is held.
        self.ready = backend.database is None
        self._stopping = False
        self._waiting: list[Deferred[None]] = []

    def when_ready(self) -> Deferred[None]:
        """Fires once the schema is checked and this process's lease is held."""
        if self.ready:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiting.append(waiter)
        return waiter

    def startService(self) -> None:
        super().startService()
        database = self.backend.database
        if database is None:
            return
        database.start()
        self._stopping = False
        self._check_schema(database)

    def _check_schema(self, database: Database) -> None:
        def checked(version: int) -> Deferred[None] | None:
            log.info(
                "state backend postgresql: schema version {version}, process {process}",
                version=version,
                process=self.backend.identity.name,
            )
            if self.backend.lease is None:
                self._now_ready()
                return None
            return self.backend.lease.start().addCallback(lambda _: self._now_ready())

        def failed(failure: Any) -> Deferred[None] | None:
            if self._stopping:
                return None
            if failure.check(StateUnavailable):
                log.warn(
                    "state database unreachable, retrying in {seconds:.0f} s: {error}",
                    seconds=START_RETRY,
                    error=failure.getErrorMessage(),
                )
                return deferLater(self._reactor, START_RETRY, self._check_schema, database)
            if failure.check(StateError):
                log.critical("state database unusable: {error}", error=failure.getErrorMessage())
            else:
                log.failure("state database check failed", failure)
            # Exit status 78 (EX_CONFIG): systemd's RestartPreventExitStatus=78
            # keeps it from restarting a node that would fail the same way.
            self._reactor.addSystemEventTrigger("after", "shutdown", os._exit, EX_CONFIG)
            self._reactor.stop()
            return None

        database.run(check).addCallbacks(checked, failed)

    def _now_ready(self) -> None:
        self.ready = True
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self._stopping = True
        database = self.backend.database
        if database is None:
            return None
        lease = self.backend.lease
        done = lease.stop() if lease is not None and self.ready else succeed(None)
        return done.addBoth(lambda _: database.stop())
