"""Who holds a lock or a lease: one name per gateway process, and its heartbeat.

Locks and leases in the state database name their holder by process, not by
node, because a node's workers die one at a time (kill -9 takes one worker).
A process is alive while its row in `gateway_processes` has a `lease_until`
in the future; it renews it every third of `[state] lease_time`. A process
that is killed renews nothing, so within `lease_time` every lock it held is
free and every message it was delivering can be taken over, without anyone
having to notice the death.

A process that cannot renew (the database is unreachable) must assume, once
its own lease has passed, that others have taken its locks: `lapsed`
callbacks let the holders of sessions close them before that can matter.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gateway.state.database import Database, StateUnavailable

log = Logger(namespace="gateway.state")


@dataclass(frozen=True)
class ProcessIdentity:
    """This process, as locks, leases and `gateway state status` name it."""

    node: str
    pid: int
    # Random per start, so a restarted process that got the same pid does
    # not inherit a dead one's locks.
    nonce: str

    @property
    def name(self) -> str:
        return f"{self.node}:{self.pid}:{self.nonce}"

    @classmethod
    def here(cls, node: str = "") -> ProcessIdentity:
        return cls(node or socket.gethostname(), os.getpid(), secrets.token_hex(3))


class ProcessLease:
    """Keeps this process's row in `gateway_processes` alive."""

    def __init__(
        self, database: Database, identity: ProcessIdentity, lease_time: float, clock: Any
    ) -> None:
        self._database = database
        self.identity = identity
        self.lease_time = lease_time
        self._clock = clock
        self._loop = LoopingCall(self._renew)
        self._loop.clock = clock
        # Seconds on `clock` until which our lease is known to hold.
        self.valid_until = 0.0
        self._lapsed: list[Callable[[], None]] = []
        self._lapse_call: Any = None

    def on_lapse(self, callback: Callable[[], None]) -> None:
        """Call `callback` when our lease passes without a renewal."""
        self._lapsed.append(callback)

    @property
    def alive(self) -> bool:
        return bool(self._clock.seconds() < self.valid_until)

    def start(self) -> Deferred[None]:
        """Take the lease; the Deferred fires once the first renewal is stored."""
        first = self._renew()
        self._loop.start(self.lease_time / 3, now=False)
        return first

    def stop(self) -> Deferred[None]:
        """Stop renewing and give the row up, so `state status` shows at once
        that this process left (its locks were released by their sessions)."""
        if self._loop.running:
            self._loop.stop()
        if self._lapse_call is not None and self._lapse_call.active():
            self._lapse_call.cancel()
        name = self.identity.name

        def forget(connection: psycopg.Connection[Any]) -> None:
            connection.execute("DELETE FROM gateway_processes WHERE process = %s", (name,))

        done = self._database.run(forget)
        done.addErrback(lambda failure: failure.trap(StateUnavailable))
        return done.addCallback(lambda _: None)

    def _renew(self) -> Deferred[None]:
        started = self._clock.seconds()
        identity, lease = self.identity, self.lease_time

        def renew(connection: psycopg.Connection[Any]) -> None:
            connection.execute(
                "INSERT INTO gateway_processes (process, node, pid, lease_until)"
                " VALUES (%s, %s, %s, now() + make_interval(secs => %s))"
                " ON CONFLICT (process) DO UPDATE"
                " SET seen_at = now(), lease_until = EXCLUDED.lease_until",
                (identity.name, identity.node, identity.pid, lease),
            )

        def renewed(_: object) -> None:
            # Counted from when we asked, not when the answer came: the
            # database's clock started the lease no earlier than that.
            self.valid_until = started + lease
            if self._lapse_call is not None and self._lapse_call.active():
                self._lapse_call.cancel()
            self._lapse_call = self._clock.callLater(lease, self._lapse)

        def failed(failure: Any) -> None:
            failure.trap(StateUnavailable)
            log.warn(
                "state process lease of {process} not renewed: {error}",
                process=identity.name,
                error=failure.getErrorMessage(),
            )

        return self._database.run(renew).addCallbacks(renewed, failed)

    def _lapse(self) -> None:
        self._lapse_call = None
        log.error(
            "state process lease of {process} lapsed: the database was unreachable"
            " for {seconds:.0f} s; sessions holding mailbox locks are closed",
            process=self.identity.name,
            seconds=self.lease_time,
        )
        for callback in list(self._lapsed):
            callback()
