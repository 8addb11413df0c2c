"""The SMTP spool in PostgreSQL (`[state] backend = "postgresql"`), shared by
every node: table `gateway_spool` (migration 0007).

Accepting: the message (kept in memory, or in `spool-pg/tmp/` past
`IncomingMessage.SPILL`) is INSERTed with its envelope; the device gets `250`
only after that transaction's COMMIT, which PostgreSQL has fsynced. Messages
that arrive together share one transaction (group commit). A database that
cannot be reached makes the commit fail with `SpoolUnavailable` and the
device gets `451 4.3.0`; the next message tries again, so the gateway
recovers by itself when the database is back.

Delivering: a message is delivered by the process holding its lease
(`lease_holder`, `lease_until`). The accepting process takes it with the
INSERT, so it starts at once; every `[smtp] control_interval` each process
renews its leases and claims due messages (`FOR UPDATE SKIP LOCKED`, so two
processes never claim one message) whose lease is free, has passed, or is
held by a process whose `gateway_processes` lease passed. Before each
attempt the holder confirms the lease; after it, one statement that checks
the lease is still ours records the outcome (delete when delivered, or the
new delivery state) and lets the lease go. So a process killed with -9 holds
its messages for at most `[state] lease_time`; another process takes them
over at its next look: within `lease_time + control_interval` (32 s with
the defaults), and each is then tried when its retry time has come.

When a message can go out twice (SMTP's own windows, RFC 1047, and the
lease's):

- the upstream accepted the final "." and this process dies, or loses the
  database, before the DELETE commits: a few milliseconds normally; as long
  as the database stays unreachable, up to `lease_time`, after which
  another process delivers it again;
- the connection is lost after the final "." before the upstream's reply:
  the attempt counts as failed and the message is retried (as with files);
- a process that cannot reach the database for longer than `lease_time`
  (not dead, cut off) while an attempt is in flight: another process takes
  the message over. The holder learns it when its statement finds the lease
  gone and logs a warning naming the message.

Never lost: a row leaves the table only by a DELETE after delivery (checked
against our lease), an admin's delete, or as a dead letter kept in place.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, BinaryIO, TypeVar

import psycopg
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gateway.smtp.spool_commit import GroupCommit
from gateway.smtp.spool_control import Verb
from gateway.smtp.spool_files import IncomingMessage, SpoolDir
from gateway.smtp.spool_records import DeliveryState, Envelope, QueueEntry, QueueIndex, new_id
from gateway.smtp.spool_store import SpoolUnavailable
from gateway.state.backend import StateBackend
from gateway.state.database import Database, StateUnavailable, describe

log = Logger(namespace="gateway.smtp.spool")

T = TypeVar("T")
Connection = psycopg.Connection[Any]

# Messages a process claims at one look, beyond those it already holds.
CLAIM_BATCH = 100
# Tmp files older than this at start are junk (nobody is receiving them).
JUNK_AGE = 3600.0

_ALIVE = (
    "EXISTS (SELECT 1 FROM gateway_processes p"
    " WHERE p.process = s.lease_holder AND p.lease_until > now())"
)
# A message another process may take: never leased, or its lease passed, or
# its holder is dead.
_FREE = f"(s.lease_holder IS NULL OR s.lease_until <= now() OR NOT {_ALIVE})"


class PgIncoming(IncomingMessage):
    """A message being received, for an INSERT rather than a rename."""

    def _create(self) -> BinaryIO:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        return os.fdopen(fd, "w+b")

    def payload(self) -> bytes:
        """The message's bytes (spool thread); the tmp file goes with it."""
        self._open = False
        data = bytes(self._buffer)
        self._buffer = bytearray()
        if self._file is None:
            return data
        f, self._file = self._file, None
        try:
            f.flush()
            f.seek(0)
            data = f.read() + data
        finally:
            f.close()
            self.path.unlink(missing_ok=True)
        return data


class PgSpool(QueueIndex):
    def __init__(
        self,
        backend: StateBackend,
        files: SpoolDir,
        *,
        clock: IReactorTime,
        accounts: Mapping[str, object] | None = None,
    ) -> None:
        assert backend.database is not None
        self.database: Database = backend.database
        self.me = backend.identity.name
        self.node = backend.identity.node
        self.lease_time = backend.settings.lease_time
        self.process_lease = backend.lease
        self.dir = files  # tmp/ for large messages being received; its lock for readiness
        self.clock = clock
        self.accounts = accounts
        QueueIndex.__init__(self)
        self._commits = GroupCommit(self._insert_many, self._in_transaction)
        self._refresh_error: str | None = None

    # -- opening -----------------------------------------------------------------

    def open(self) -> list[QueueEntry]:
        self.dir.prepare()
        self.dir.lock(shared=True)
        self.dir.scan(junk_age=JUNK_AGE)
        return []

    def close(self) -> None:
        self.dir.unlock()

    @property
    def location(self) -> str:
        return "PostgreSQL table gateway_spool"

    @property
    def usable(self) -> str | None:
        if not self.dir.locked:
            return f"spool {self.dir.root} is not open"
        return None

    def lapsed(self) -> None:
        """Our process lease passed: others may have taken our messages."""
        for entry in list(self.entries.values()):
            self.forget(entry)

    # -- database ------------------------------------------------------------------

    def _in_transaction(self, work: Callable[..., T], *args: Any) -> Deferred[T]:
        return self.database.run(lambda connection: work(connection, *args))

    async def _run(self, work: Callable[..., T], *args: Any) -> T:
        try:
            return await self._in_transaction(work, *args)
        except StateUnavailable as e:
            raise SpoolUnavailable(f"state database unreachable: {e}") from None
        except psycopg.Error as e:
            raise SpoolUnavailable(f"state database: {describe(e)}") from None

    # -- the index (what this process holds) ------------------------------------

    # -- receiving ---------------------------------------------------------------

    def incoming(self, now: float) -> IncomingMessage:
        return PgIncoming(self.dir, new_id(now))

    async def commit(self, incoming: IncomingMessage, envelope: Envelope) -> QueueEntry:
        """Committed in PostgreSQL when this returns; raises OSError."""
        try:
            entry: QueueEntry = await self._commits.submit((incoming, envelope))
        except StateUnavailable as e:
            raise SpoolUnavailable(f"state database unreachable: {e}") from None
        except psycopg.Error as e:
            raise SpoolUnavailable(f"state database: {describe(e)}") from None
        self.track(entry)
        return entry

    def _insert_many(
        self, connection: Connection, items: list[tuple[IncomingMessage, Envelope]]
    ) -> list[QueueEntry | OSError]:
        rows = []
        results: list[QueueEntry | OSError] = []
        for incoming, envelope in items:
            try:
                data = incoming.payload() if isinstance(incoming, PgIncoming) else b""
            except OSError as e:
                incoming.abort()
                results.append(e)
                continue
            rows.append(_row(envelope, data, self.node, self.me, self.lease_time))
            results.append(QueueEntry(envelope, DeliveryState()))
        with connection.cursor() as cursor:
            cursor.executemany(_INSERT, rows)
        return results

    async def add(self, envelope: Envelope, message: bytes) -> QueueEntry:
        envelope = replace(envelope, size=len(message))
        row = _row(envelope, message, self.node, self.me, self.lease_time)
        await self._run(lambda c: c.execute(_INSERT, row))
        entry = QueueEntry(envelope, DeliveryState())
        self.track(entry)
        return entry

    # -- delivering ----------------------------------------------------------------

    async def claim(self, entry: QueueEntry) -> QueueEntry | None:
        """Confirm (and extend) our lease, and read the delivery state."""
        if self.process_lease is not None and not self.process_lease.alive:
            # Before our first renewal, or after a lapse, others may take
            # what we hold: no attempt until our own lease is known to hold.
            return None
        now = self.clock.seconds()
        row = await self._run(_confirm, entry.id, self.me, self.lease_time, now)
        if row is None:
            self.forget(entry)
            return None
        entry.state = DeliveryState.from_json(bytes(row[0]))
        return entry

    async def release(self, entry: QueueEntry) -> None:
        """After an attempt whose outcome was not written (it raised)."""
        if entry.id not in self.entries:
            return  # written down: the statement let the lease go
        self.forget(entry)
        me = self.me
        await self._run(
            lambda c: c.execute(
                "UPDATE gateway_spool SET lease_holder = NULL, lease_until = NULL"
                " WHERE id = %s AND lease_holder = %s",
                (entry.id, me),
            )
        )

    async def open_message(self, entry: QueueEntry) -> BinaryIO:
        def fetch(connection: Connection) -> bytes | None:
            row = connection.execute(
                "SELECT message FROM gateway_spool WHERE id = %s", (entry.id,)
            ).fetchone()
            return None if row is None else bytes(row[0])

        data = await self._run(fetch)
        if data is None:
            raise FileNotFoundError(f"message {entry.id} is no longer in the spool")
        return io.BytesIO(data)

    async def save(self, entry: QueueEntry) -> None:
        """A failed attempt (or some recipients done): written, lease let go."""
        self.forget(entry)
        await self._finish(entry, "queued")

    async def remove(self, entry: QueueEntry) -> None:
        """Delivered: deleted in one statement that checks the lease is ours."""
        self.forget(entry)
        me = self.me

        def delete(connection: Connection) -> int:
            cursor = connection.execute(
                "DELETE FROM gateway_spool WHERE id = %s AND lease_holder = %s", (entry.id, me)
            )
            return cursor.rowcount

        if not await self._run(delete):
            _lost(entry)

    async def bury(self, entry: QueueEntry, reason: str) -> None:
        self.forget(entry)
        entry.state.dead_reason = reason
        await self._finish(entry, "dead")
        entry.status = "dead"

    async def _finish(self, entry: QueueEntry, state: str) -> None:
        me, now = self.me, self.clock.seconds()

        def write(connection: Connection) -> bool:
            row = connection.execute(
                "SELECT request FROM gateway_spool s WHERE id = %s AND lease_holder = %s"
                " FOR UPDATE",
                (entry.id, me),
            ).fetchone()
            if row is None:
                return False
            if row[0] == "delete":
                connection.execute("DELETE FROM gateway_spool WHERE id = %s", (entry.id,))
                log.info("smtp queue: message {id} deleted by the admin", id=entry.id)
                return True
            status, delivery = state, entry.state
            if row[0] == "retry":
                status, delivery = "queued", _revived(entry.state, now, state == "dead")
            connection.execute(_UPDATE, _update_values(entry.id, status, delivery))
            return True

        if not await self._run(write):
            _lost(entry)

    async def retry_now(self, entry: QueueEntry, now: float) -> None:
        await self.request("retry", entry.id)

    async def refresh(self, now: float) -> list[QueueEntry]:
        """Renew our leases and claim due messages nobody (alive) holds."""
        wanted = max(0, CLAIM_BATCH - sum(len(q) for q in self._queued.values()))
        accounts = None if self.accounts is None else sorted(self.accounts)
        try:
            rows = await self._run(
                _claim_due, self.me, self.lease_time, now, wanted, accounts, list(self.entries)
            )
        except SpoolUnavailable as e:
            if str(e) != self._refresh_error:
                self._refresh_error = str(e)
                log.error("smtp spool: cannot look for messages to deliver: {error}", error=e)
            return []
        if self._refresh_error is not None:
            self._refresh_error = None
            log.info("smtp spool: state database reachable again")
        found = []
        for message_id, envelope, delivery, holder in rows:
            if message_id in self.entries:
                continue
            entry = QueueEntry(
                Envelope.from_json(bytes(envelope)), DeliveryState.from_json(bytes(delivery))
            )
            if holder is not None and holder != self.me:
                log.warn(
                    "smtp spool: took over message {id} from process {holder} (lease passed)",
                    id=message_id,
                    holder=holder,
                )
            self.track(entry)
            found.append(entry)
        return found

    async def listing(self) -> list[QueueEntry]:
        return await self._run(list_entries)

    # -- admin requests ---------------------------------------------------------------

    async def request(self, verb: Verb, message_id: str) -> bool:
        now = self.clock.seconds()
        return await self._run(lambda c: change(c, verb, message_id, now) is not None)

    def requests(self) -> list[tuple[Verb, str]]:
        return []  # carried out at once by `request`, or by the lease holder

    def request_done(self, verb: str, message_id: str) -> None:
        pass


# -- statements (also used by `gateway queue`) -----------------------------------------

_INSERT = (
    "INSERT INTO gateway_spool (id, account, node, envelope, delivery, next_attempt, size,"
    " message, lease_holder, lease_until)"
    " VALUES (%s, %s, %s, %s, %s, 0, %s, %s, %s, now() + make_interval(secs => %s))"
)
_UPDATE = (
    "UPDATE gateway_spool SET state = %s, delivery = %s, attempts = %s, next_attempt = %s,"
    " last_error = %s, lease_holder = NULL, lease_until = NULL, request = NULL WHERE id = %s"
)


def _row(envelope: Envelope, data: bytes, node: str, me: str, lease: float) -> tuple[Any, ...]:
    delivery = DeliveryState().to_json()
    return (
        envelope.id,
        envelope.account,
        node,
        envelope.to_json(),
        delivery,
        len(data),
        data,
        me,
        lease,
    )


def _update_values(message_id: str, status: str, state: DeliveryState) -> tuple[Any, ...]:
    return (
        status,
        state.to_json(),
        state.attempts,
        state.next_attempt,
        state.last_error,
        message_id,
    )


def _revived(state: DeliveryState, now: float, dead: bool) -> DeliveryState:
    """An admin's retry: try at once, lifetime restarts now; recipients
    already served stay so."""
    if dead:
        return DeliveryState(retry_base=now, next_attempt=now, delivered=list(state.delivered))
    return replace(state, next_attempt=now, retry_base=now)


def _lost(entry: QueueEntry) -> None:
    log.warn(
        "smtp spool: message {id} was taken over by another process while this one"
        " held it (its lease passed); it may have been delivered twice",
        id=entry.id,
    )


def _confirm(connection: Connection, message_id: str, me: str, lease: float, now: float) -> Any:
    """Our lease extended and the delivery state, or None if it is not ours
    (or an admin's delete was waiting for it)."""
    row = connection.execute(
        "UPDATE gateway_spool SET lease_until = now() + make_interval(secs => %s)"
        " WHERE id = %s AND lease_holder = %s AND state = 'queued'"
        " RETURNING delivery, request",
        (lease, message_id, me),
    ).fetchone()
    if row is None or row[1] is None:
        return row
    if row[1] == "delete":
        connection.execute("DELETE FROM gateway_spool WHERE id = %s", (message_id,))
        log.info("smtp queue: message {id} deleted by the admin", id=message_id)
        return None
    state = _revived(DeliveryState.from_json(bytes(row[0])), now, False)
    connection.execute(
        "UPDATE gateway_spool SET delivery = %s, next_attempt = %s, request = NULL WHERE id = %s",
        (state.to_json(), state.next_attempt, message_id),
    )
    return (state.to_json(), None)


def _claim_due(
    connection: Connection,
    me: str,
    lease: float,
    now: float,
    limit: int,
    accounts: list[str] | None,
    held: list[str],
) -> list[tuple[Any, ...]]:
    """Renew our leases; claim up to `limit` due messages that are free,
    or ours but no longer in our index (an attempt that could not be
    written down)."""
    connection.execute(
        "UPDATE gateway_spool SET lease_until = now() + make_interval(secs => %s)"
        " WHERE lease_holder = %s",
        (lease, me),
    )
    if limit <= 0:
        return []
    return connection.execute(
        "WITH due AS (SELECT s.id, s.lease_holder FROM gateway_spool s"
        " WHERE s.state = 'queued' AND s.next_attempt <= %s"
        " AND NOT (s.id = ANY(%s::text[]))"
        f" AND (s.lease_holder = %s OR {_FREE})"
        " AND (%s::text[] IS NULL OR s.account = ANY(%s::text[]))"
        " ORDER BY s.id LIMIT %s FOR UPDATE OF s SKIP LOCKED)"
        " UPDATE gateway_spool t SET lease_holder = %s,"
        " lease_until = now() + make_interval(secs => %s)"
        " FROM due WHERE t.id = due.id"
        " RETURNING t.id, t.envelope, t.delivery, due.lease_holder",
        (now, held, me, accounts, accounts, limit, me, lease),
    ).fetchall()


def list_entries(connection: Connection) -> list[QueueEntry]:
    rows = connection.execute(
        "SELECT envelope, delivery, state FROM gateway_spool ORDER BY id"
    ).fetchall()
    return [
        QueueEntry(Envelope.from_json(bytes(e)), DeliveryState.from_json(bytes(d)), s)
        for e, d, s in rows
    ]


def change(connection: Connection, verb: Verb, message_id: str, now: float) -> str | None:
    """An admin's retry or delete: done now ("done"), or left for the live
    process delivering it right now ("requested"); None if no such message."""
    row = connection.execute(
        f"SELECT s.state, s.delivery, NOT {_FREE} FROM gateway_spool s WHERE s.id = %s FOR UPDATE",
        (message_id,),
    ).fetchone()
    if row is None:
        return None
    status, delivery, held = row
    if held:
        connection.execute(
            "UPDATE gateway_spool SET request = %s WHERE id = %s", (verb, message_id)
        )
        return "requested"
    if verb == "delete":
        connection.execute("DELETE FROM gateway_spool WHERE id = %s", (message_id,))
    else:
        state = _revived(DeliveryState.from_json(bytes(delivery)), now, status == "dead")
        connection.execute(_UPDATE, _update_values(message_id, "queued", state))
    return "done"
