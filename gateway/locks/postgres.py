"""Mailbox locks shared by every node: rows in `gateway_mailbox_locks`.

A row names the mailbox, the holder process (`gateway.state.processes`) and
a random token for the one session holding it. Acquiring is one statement:
insert the row, or take over a row whose holder is dead - a process whose
`gateway_processes.lease_until` has passed (or whose row is gone). So a node
killed with -9, or cut off the network, holds its mailboxes for at most
`[state] lease_time` (30 s by default) after its last lease renewal, without
anyone having to notice it died. Releasing deletes the row if it is still
this session's (mailbox, process and token match); a release the database
did not take is retried until it does, so a lock is never left behind by a
live process.

A process that cannot renew its lease must assume, once `lease_time` has
passed, that others took its mailboxes: `ProcessLease.on_lapse` then tells
every lease held here that it is lost, and the POP3 server drops those
sessions without QUIT. RFC 1939: a session that ends without QUIT never
enters the UPDATE state, so a dropped session deletes nothing upstream; the
device sees a temporary failure and polls again later. Until the lease is
renewed, new logins get `-ERR [SYS/TEMP]`.

Within this process a dict answers a second session for a mailbox without
a round trip, and orders an acquire after a release of the same mailbox
that is still on its way to the database.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import psycopg
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from gateway.locks.interface import InUse, LockUnavailable, MailboxLease
from gateway.state.database import Database, StateUnavailable
from gateway.state.processes import ProcessIdentity, ProcessLease

log = Logger(namespace="gateway.locks")

# Seconds between attempts to delete a lock the database did not let go.
RELEASE_RETRY = 2.0

_ACQUIRE = """
WITH taken AS (
    INSERT INTO gateway_mailbox_locks AS held (mailbox, process, label, token)
    SELECT %(mailbox)s, %(process)s, %(label)s, %(token)s
    WHERE EXISTS (
        SELECT 1 FROM gateway_processes
        WHERE process = %(process)s AND lease_until > now())
    ON CONFLICT (mailbox) DO UPDATE
    SET process = EXCLUDED.process, label = EXCLUDED.label,
        token = EXCLUDED.token, acquired_at = now()
    WHERE held.process = EXCLUDED.process
       OR NOT EXISTS (
        SELECT 1 FROM gateway_processes alive
        WHERE alive.process = held.process AND alive.lease_until > now())
    RETURNING token
)
SELECT
    EXISTS (SELECT 1 FROM taken),
    EXISTS (SELECT 1 FROM gateway_processes
            WHERE process = %(process)s AND lease_until > now()),
    (SELECT label FROM gateway_mailbox_locks WHERE mailbox = %(mailbox)s),
    (SELECT process FROM gateway_mailbox_locks WHERE mailbox = %(mailbox)s)
"""

_RELEASE_MANY = "DELETE FROM gateway_mailbox_locks WHERE process = %s AND token = ANY(%s)"
_RELEASE = "DELETE FROM gateway_mailbox_locks WHERE mailbox = %s AND process = %s AND token = %s"


def row_key(key: str) -> str:
    """The mailbox key as the `mailbox` column holds it: PostgreSQL text
    cannot hold the NUL bytes that separate the key's parts, and a JSON list
    stays readable and unambiguous."""
    return json.dumps(key.split("\0"), ensure_ascii=False)


class PostgresMailboxLocks:
    """`MailboxLocks` for every process sharing one PostgreSQL database.

    A row held by this process but not by any session here is a leftover (a
    release still being retried): acquiring takes it over like a dead one.
    """

    def __init__(
        self, database: Database, identity: ProcessIdentity, lease: ProcessLease | None, clock: Any
    ) -> None:
        self._database = database
        self._process = identity.name
        self._lease = lease
        self._clock = clock
        # Mailbox key -> the session's lease (None while being acquired).
        self._held: dict[str, MailboxLease | None] = {}
        self._labels: dict[str, str] = {}
        # Releases on their way to the database, by mailbox key.
        self._releasing: dict[str, Deferred[None]] = {}
        # Releases the database missed, by token, retried together.
        self._unreleased: dict[str, Deferred[None]] = {}
        self._retry: Any = None
        if lease is not None:
            lease.on_lapse(self._lapsed)

    def acquire(self, key: str, label: str) -> Deferred[MailboxLease | InUse]:
        if key in self._held:
            return succeed(InUse(self._labels[key]))
        if self._lease is not None and not self._lease.alive:
            return fail(LockUnavailable("this process's state lease is not held"))
        self._held[key] = None
        self._labels[key] = label
        releasing = self._releasing.get(key)
        if releasing is None:
            started: Deferred[object] = succeed(None)
        else:
            started = Deferred()
            releasing.addBoth(started.callback)
        acquired = started.addCallback(lambda _: self._database.run(self._work(key, label)))
        return acquired.addCallbacks(
            lambda result: self._acquired(key, label, result),
            lambda failure: self._failed(key, failure),
        )

    def _work(self, key: str, label: str) -> Any:
        params = {
            "mailbox": row_key(key),
            "process": self._process,
            "label": label,
            "token": secrets.token_hex(8),
        }

        def work(connection: psycopg.Connection[Any]) -> tuple[str, tuple[Any, ...] | None]:
            return params["token"], connection.execute(_ACQUIRE, params).fetchone()

        return work

    def _acquired(
        self, key: str, label: str, result: tuple[str, tuple[Any, ...] | None]
    ) -> MailboxLease | InUse:
        token, row = result
        assert row is not None
        taken, alive, holder, process = row
        if taken:
            lease = MailboxLease(key, label, handle=token)
            self._held[key] = lease
            return lease
        del self._held[key], self._labels[key]
        if not alive:
            raise LockUnavailable("this process's state lease has lapsed")
        return InUse(str(holder), None if process == self._process else str(process))

    def _failed(self, key: str, failure: Any) -> Any:
        self._held.pop(key, None)
        self._labels.pop(key, None)
        if failure.check(StateUnavailable):
            raise LockUnavailable(f"state database: {failure.getErrorMessage()}")
        return failure

    def release(self, lease: MailboxLease) -> Deferred[None]:
        if self._held.get(lease.key) is not lease:
            return succeed(None)
        del self._held[lease.key], self._labels[lease.key]
        # Fires after the first attempt, stored or not: an acquire of the
        # same mailbox waits for it, then takes over any leftover row itself.
        attempted: Deferred[None] = Deferred()
        self._releasing[lease.key] = attempted
        done: Deferred[None] = Deferred()
        token = str(lease.handle)

        def work(connection: psycopg.Connection[Any]) -> None:
            connection.execute(_RELEASE, (row_key(lease.key), self._process, token))

        def over() -> None:
            if self._releasing.get(lease.key) is attempted:
                del self._releasing[lease.key]
            attempted.callback(None)

        def deleted(_: object) -> None:
            over()
            done.callback(None)

        def failed(failure: Any) -> None:
            log.warn(
                "mailbox lock release not stored, retrying every {seconds:.0f} s: {error}",
                seconds=RELEASE_RETRY,
                error=failure.getErrorMessage(),
            )
            self._unreleased[token] = done
            self._retry_later()
            over()

        self._database.run(work).addCallbacks(deleted, failed)
        return done

    def _retry_later(self) -> None:
        if self._retry is None or not self._retry.active():
            self._retry = self._clock.callLater(RELEASE_RETRY, self._retry_releases)

    def _retry_releases(self) -> None:
        """One statement for every release the database missed, so that a
        long outage costs one connection per retry, not one per session."""
        batch, self._unreleased = self._unreleased, {}
        tokens = list(batch)

        def work(connection: psycopg.Connection[Any]) -> None:
            connection.execute(_RELEASE_MANY, (self._process, tokens))

        def deleted(_: object) -> None:
            for done in batch.values():
                done.callback(None)

        def failed(_: object) -> None:
            self._unreleased.update(batch)
            self._retry_later()

        self._database.run(work).addCallbacks(deleted, failed)

    def _lapsed(self) -> None:
        held = [lease for lease in self._held.values() if lease is not None]
        if held:
            log.warn(
                "state lease lapsed: dropping {count} POP3 sessions holding mailbox locks"
                " (without QUIT: nothing is deleted)",
                count=len(held),
            )
        for lease in held:
            lease.lost()
