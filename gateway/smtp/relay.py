"""The relay: takes spooled messages to the upstream, one worker per account.

A worker delivers its account's due messages oldest first over up to
`connections` upstream connections (logged in as the account), each reused
for as long as messages keep coming and closed with QUIT after `keepalive`
seconds without one. Accounts are independent: one provider being down delays
only its own accounts. A Graph account gets a `GraphSession` (gateway.smtp.graph_delivery).

What happens after an attempt:

- every recipient accepted: the spool entry is removed;
- 4xx, a lost connection, a refused login: the attempt counts, and the message
  is tried again after `retry_first`, doubling up to `retry_max_interval`
  (a refused login that only an admin can fix, classified by
  `gateway.upstream.refusals`, is an error line once per account and change);
  the last try is at the end of its `message_lifetime`, after which the
  remaining recipients fail with 4.4.7 (delivery time expired);
- 5xx for a recipient: that recipient failed for good.

Once no recipient is left to try and some failed, the sender gets a bounce
(RFC 3464, `gateway.smtp.dsn`) unless the message was itself a bounce or had
the null sender, and the message always becomes a dead letter (spool/dead/,
listed by `gateway queue list`) with an error line in the log.

Every `control_interval` seconds the relay asks the spool for messages other
processes accepted or left behind (`SpoolStore.refresh`: other workers' files,
or due rows in PostgreSQL nobody alive holds) and carries out the requests
`gateway queue retry|delete` left in spool/control/. Before each attempt a
message is claimed (`SpoolStore.claim`), so however many processes list it,
one delivers it; a claim held elsewhere skips the message until the next look.

Each outcome's log event carries a `delivery` field ("delivered", "deferred",
"expired", "dead_letter"): the metrics count those, JSON logs filter on it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from gateway.model import Account, Provider
from gateway.smtp import dsn
from gateway.smtp.policy import account_address
from gateway.smtp.relay_lane import Lane, cancel_call
from gateway.smtp.relay_session import Session, SessionDeferred, transmit
from gateway.smtp.relay_trouble import UpstreamTrouble
from gateway.smtp.spool_records import QueueEntry, new_id
from gateway.smtp.spool_store import SpoolStore, SpoolUnavailable
from gateway.timing import timed_step
from gateway.upstream.smtp import Reply, SMTPUpstreamError

log = Logger(namespace="gateway.smtp.relay")

# An SMTP session, or a Graph one for accounts that relay through Graph.
OpenSession = Callable[[Account, Provider], Awaitable[Session]]


@dataclass(frozen=True)
class RetryPolicy:
    first: float = 30.0
    max_interval: float = 3600.0
    lifetime: float = 5 * 24 * 3600.0

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt (1-based)."""
        return min(self.first * 2.0 ** min(max(attempts - 1, 0), 60), self.max_interval)


class Relay(Service):
    """Owns the account workers, the control-request poller and the spool index."""

    def __init__(
        self,
        *,
        spool: SpoolStore,
        accounts: Mapping[str, Account],
        providers: Mapping[str, Provider],
        open_session: OpenSession,
        clock: IReactorTime,
        hostname: str,
        retry: RetryPolicy,
        control_interval: float = 2.0,
        keepalive: float = 2.0,
        stop_grace: float = 10.0,
        connections: int = 3,
    ) -> None:
        self.spool = spool
        self.accounts = accounts
        self.providers = providers
        self.open_session = open_session
        self.clock = clock
        self.hostname = hostname
        self.retry = retry
        self.keepalive = keepalive
        # Upstream sessions per account at once. Microsoft 365 allows 3
        # concurrent SMTP AUTH connections per mailbox.
        self.connections = max(1, connections)
        self.stop_grace = stop_grace
        self.control_interval = control_interval
        self.workers: dict[str, AccountWorker] = {}
        # Messages whose claim another process held at our last try: left
        # alone until the next look.
        self.busy: set[str] = set()
        self.claim_error: str | None = None
        self._control: LoopingCall | None = None
        self._control_error: str | None = None
        self._stopping = False

    # -- service ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        names = sorted({e.envelope.account for e in self.spool.entries.values()})
        for name in names:
            queued = self.spool.queued(name)
            if name not in self.accounts:
                log.error(
                    "smtp spool holds {count} message(s) for account {account}, which is no "
                    "longer configured; they stay queued",
                    count=len(queued),
                    account=name,
                )
                continue
            if queued:
                log.info(
                    "smtp spool: {count} message(s) queued for account {account}",
                    count=len(queued),
                    account=name,
                )
                self.worker(name).wake()
        self._control = LoopingCall(self.check_requests)
        self._control.clock = self.clock
        self._control.start(self.control_interval, now=False).addErrback(
            lambda f: log.failure("smtp queue control poller stopped", f)
        )

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self._stopping = True
        if self._control is not None and self._control.running:
            self._control.stop()
        return DeferredList([w.stop() for w in self.workers.values()])

    # -- entry points -------------------------------------------------------------

    def worker(self, account: str) -> AccountWorker:
        if account not in self.workers:
            self.workers[account] = AccountWorker(self, account)
        return self.workers[account]

    def submitted(self, entry: QueueEntry) -> None:
        """A message was just spooled: start on it now."""
        if not self._stopping and entry.envelope.account in self.accounts:
            self.worker(entry.envelope.account).wake()

    def accounts_changed(self, removed: Iterable[str], added: Iterable[str]) -> None:
        """After a config reload (`accounts` shows the new file): a removed
        account's messages stay queued, its worker idles; an added (or
        re-added) account's queued messages are tried now."""
        for name in removed:
            queued = len(self.spool.queued(name))
            if queued:
                log.error(
                    "smtp spool holds {count} message(s) for account {account}, which is no "
                    "longer configured; they stay queued",
                    count=queued,
                    account=name,
                )
        for name in added:
            if not self._stopping and name in self.accounts and self.spool.queued(name):
                self.worker(name).wake()

    def check_requests(self) -> Deferred[None]:
        """Look for others' messages, then carry out `gateway queue retry|delete`
        requests left in spool/control/."""
        return Deferred.fromCoroutine(self._look())

    async def _look(self) -> None:
        try:
            found = await self.spool.refresh(self.clock.seconds())
        except (OSError, ValueError) as e:
            log.error("smtp spool: looking for messages failed: {error}", error=e)
            found = []
        busy, self.busy = self.busy, set()
        accounts = {e.envelope.account for e in found}
        accounts |= {
            self.spool.entries[i].envelope.account for i in busy if i in self.spool.entries
        }
        for name in sorted(accounts):
            if not self._stopping and name in self.accounts:
                self.worker(name).wake()
        await self._check_requests()

    async def _check_requests(self) -> None:
        try:
            requests = self.spool.requests()
        except OSError as e:
            # Once per distinct error, not every `control_interval`.
            if str(e) != self._control_error:
                self._control_error = str(e)
                log.error("smtp queue control directory unreadable: {error}", error=e)
            return
        if self._control_error is not None:
            self._control_error = None
            log.info("smtp queue control directory readable again")
        for verb, message_id in requests:
            try:
                done = await self._carry_out(verb, message_id)
            except OSError as e:
                log.error(
                    "smtp queue {verb} {id} failed: {error}", verb=verb, id=message_id, error=e
                )
                done = True
            if done:
                self.spool.request_done(verb, message_id)

    async def _carry_out(self, verb: str, message_id: str) -> bool:
        """False when another process holds the message: asked again later."""
        entry = self.spool.entries.get(message_id)
        if entry is None:
            log.warn("smtp queue {verb} {id}: no such message", verb=verb, id=message_id)
            return True
        worker = self.worker(entry.envelope.account)
        if entry.id in worker.in_flight:
            # Being delivered right now: decide when the attempt is over.
            worker.after_attempt[entry.id] = verb
            return True
        if await self.spool.claim(entry) is None:
            return entry.id not in self.spool.entries
        try:
            await self._change(verb, entry)
        finally:
            await self.spool.release(entry)
        if verb == "retry":
            self.submitted(entry)
        return True

    async def _change(self, verb: str, entry: QueueEntry) -> None:
        message_id = entry.id
        if verb == "delete":
            await self.spool.remove(entry)
            log.info(
                "smtp queue: message {id} deleted by the admin ({status})",
                id=message_id,
                status=entry.status,
            )
        else:
            await self.spool.retry_now(entry, self.clock.seconds())
            log.info("smtp queue: retry of message {id} requested by the admin", id=message_id)


class AccountWorker:
    """Delivers one account's messages over up to `connections` upstream sessions.

    Each `Lane` is one connection taking due messages one at a time; a message
    is claimed (`in_flight`) by one lane only. Lanes start as messages become
    due and end when nothing is left; the worker then sleeps until the next
    retry time.
    """

    def __init__(self, relay: Relay, account: str) -> None:
        self.relay = relay
        self.account = account
        self.in_flight: dict[str, QueueEntry] = {}
        # Admin requests that arrived while their message was in flight.
        self.after_attempt: dict[str, str] = {}
        self.lanes = [Lane(self, n) for n in range(relay.connections)]
        self._timer: IDelayedCall | None = None
        self.trouble = UpstreamTrouble(account)

    # -- scheduling ---------------------------------------------------------------

    def due(self, limit: int | None = None) -> list[QueueEntry]:
        """Messages whose time has come and that no lane holds, oldest first.

        `limit` stops the look early: with a backlog of thousands, a lane
        asking for its next message must not scan them all every time.
        """
        if self.account not in self.relay.accounts:
            return []  # removed by a config reload: its messages wait
        now = self.relay.clock.seconds()
        found: list[QueueEntry] = []
        busy = self.relay.busy
        for entry in self.relay.spool.iter_queued(self.account):
            if (
                entry.state.next_attempt <= now
                and entry.id not in self.in_flight
                and entry.id not in busy
            ):
                found.append(entry)
                if limit is not None and len(found) >= limit:
                    break
        return found

    def wake(self) -> None:
        if self.relay._stopping:
            return
        self._cancel(self._timer)
        self._timer = None
        wanted = len(self.due(limit=len(self.lanes)))
        for lane in self.lanes:
            if wanted <= 0:
                break
            if lane.running is None:
                lane.start()
            wanted -= 1
        self.lane_finished()

    def lane_finished(self) -> None:
        """When no lane runs: sleep until the earliest retry time, if any."""
        if self.relay._stopping or any(lane.running is not None for lane in self.lanes):
            return
        if self.account not in self.relay.accounts:
            return
        # Those another process holds are looked at again at the next look.
        busy = self.relay.busy
        queued = self.relay.spool.iter_queued(self.account)
        waiting = [e.state.next_attempt for e in queued if e.id not in busy]
        if waiting and self._timer is None:
            delay = max(0.0, min(waiting) - self.relay.clock.seconds())
            self._timer = self.relay.clock.callLater(delay, self.wake)

    def stop(self) -> Deferred[Any]:
        """Finish deliveries in progress (within `stop_grace`), then hang up."""
        self._cancel(self._timer)
        self._timer = None
        return DeferredList([lane.stop() for lane in self.lanes])

    _cancel = staticmethod(cancel_call)

    # -- outcomes -------------------------------------------------------------------

    async def connection_failed(self, error: SMTPUpstreamError) -> None:
        """No session could be opened: one failed attempt for every due message."""
        self.trouble.failed(error)
        entries = self.due()
        # Claimed, so that a lane with a working connection does not deliver
        # one of them while its failed attempt is being written.
        self.in_flight.update((e.id, e) for e in entries)
        for entry in entries:
            try:
                if await self._claim(entry):
                    failed = dict.fromkeys(entry.pending)
                    try:
                        await self._recorded(
                            entry, self._attempt_failed(entry, failed, error.detail)
                        )
                    finally:
                        await self._recorded(entry, self.relay.spool.release(entry))
            finally:
                del self.in_flight[entry.id]
                await self._after_attempt(entry)

    async def _recorded(self, entry: QueueEntry, step: Awaitable[None]) -> None:
        """Run `step`; if the spool's database went away (the attempt is not
        recorded: a delivered message may go out again, as spool_pg states) or
        another process took `entry` over and finished it, look again later."""
        try:
            await step
        except (SpoolUnavailable, FileNotFoundError) as e:
            self.relay.busy.add(entry.id)
            log.warn("smtp spool: attempt on {id} not recorded: {error}", id=entry.id, error=e)

    async def _claim(self, entry: QueueEntry) -> bool:
        """Hold `entry` for an attempt, if no other process does and it is
        still due (another process may have tried it meanwhile)."""
        spool = self.relay.spool
        try:
            claimed = await spool.claim(entry)
        except (OSError, ValueError) as e:
            # Once per distinct error (a database down fails every claim).
            if str(e) != self.relay.claim_error:
                self.relay.claim_error = str(e)
                log.error("smtp spool: cannot claim message {id}: {error}", id=entry.id, error=e)
            claimed = None
        if claimed is None:
            if entry.id in spool.entries:
                self.relay.busy.add(entry.id)
            return False
        self.relay.claim_error = None
        if entry.status == "queued" and entry.state.next_attempt <= self.relay.clock.seconds():
            return True
        await spool.release(entry)
        return False

    async def deliver(self, lane: Lane, client: Session, entry: QueueEntry) -> None:
        self.in_flight[entry.id] = entry
        claimed = False
        try:
            claimed = await self._claim(entry)
        finally:
            if not claimed:
                del self.in_flight[entry.id]
        if not claimed:
            return
        try:
            await self._recorded(entry, self._attempt(lane, client, entry))
        finally:
            try:
                await self._recorded(entry, self.relay.spool.release(entry))
            finally:
                del self.in_flight[entry.id]
                await self._after_attempt(entry)

    async def _attempt(self, lane: Lane, client: Session, entry: QueueEntry) -> None:
        envelope = entry.envelope
        recipients = entry.pending
        try:
            with await self.relay.spool.open_message(entry) as source:
                sending = transmit(
                    client,
                    sender=envelope.sender,
                    recipients=recipients,
                    source=source,
                    size=envelope.size,
                    eight_bit=envelope.eight_bit or envelope.body == "8BITMIME",
                )
                provider = self.relay.accounts[self.account].provider
                replies = await timed_step("smtp", provider, "send", sending)
        except SMTPUpstreamError as e:
            lane.client = None
            self.trouble.failed(e)
            not_before = e.retry_after if isinstance(e, SessionDeferred) else None
            await self._attempt_failed(entry, dict.fromkeys(recipients), e.detail, not_before)
            return
        except SpoolUnavailable:
            raise  # not an attempt: `_recorded` logs it and looks again later
        except Exception as e:
            # A spool file unreadable, or a bug: back off, no tight loop.
            log.failure("smtp relay of {id} failed", id=entry.id)
            client.abort("internal error")
            lane.client = None
            await self._attempt_failed(
                entry, dict.fromkeys(recipients), f"internal error: {type(e).__name__}: {e}"
            )
            return
        self.trouble.logged_in()
        await self._judge(entry, replies, client.peer)

    async def _judge(self, entry: QueueEntry, replies: Mapping[str, Reply], peer: str) -> None:
        state = entry.state
        delivered = [r for r, reply in replies.items() if reply.code // 100 == 2]
        state.delivered += delivered
        for recipient, reply in replies.items():
            if reply.permanent:
                state.failed[recipient] = reply.describe()
        deferred = {r: reply for r, reply in replies.items() if reply.code // 100 == 4}
        if delivered:
            envelope = entry.envelope
            log.info(
                "smtp relayed {id} device={device} account={account} from=<{sender}> "
                "sent_as=<{envelope_sender}> rcpts={count}/{total} size={size} "
                "from_rewritten={rewritten} via {peer} attempts={attempts}",
                delivery="delivered",
                id=entry.id,
                device=envelope.device,
                account=self.account,
                sender=envelope.original_sender,
                envelope_sender=envelope.sender,
                count=len(delivered),
                total=len(envelope.recipients),
                size=envelope.size,
                rewritten=envelope.from_rewritten,
                peer=peer,
                attempts=state.attempts + 1,
            )
        if deferred:
            first = next(iter(deferred.values()))
            await self._attempt_failed(entry, deferred, first.describe())
            return
        await self._settle(entry)

    async def _attempt_failed(
        self,
        entry: QueueEntry,
        deferred: Mapping[str, Reply | None],
        error: str,
        not_before: float | None = None,
    ) -> None:
        """Count a failed attempt for the `deferred` recipients; retry or expire
        (not within `not_before` seconds, when the upstream asked for that)."""
        state = entry.state
        now = self.relay.clock.seconds()
        state.attempts += 1
        state.last_error = error
        expiry = entry.expires + self.relay.retry.lifetime
        if now >= expiry:
            for recipient in deferred:
                state.failed[recipient] = f"delivery time expired; last error: {error}"
            log.warn(
                "smtp message {id} for account {account} expired after {attempts} attempts",
                delivery="expired",
                id=entry.id,
                account=self.account,
                attempts=state.attempts,
            )
            await self._settle(entry)
            return
        delay = max(self.relay.retry.delay(state.attempts), not_before or 0.0)
        state.next_attempt = min(now + delay, expiry)
        await self.relay.spool.save(entry)
        log.warn(
            "smtp deferred {id} account={account} attempt={attempts} retry_in={delay:.0f}s: "
            "{error}",
            delivery="deferred",
            id=entry.id,
            account=self.account,
            attempts=state.attempts,
            delay=state.next_attempt - now,
            error=error,
        )

    async def _settle(self, entry: QueueEntry) -> None:
        """Nothing left to try: delivered, or bounced and buried."""
        if entry.pending:
            await self.relay.spool.save(entry)
            return
        if not entry.state.failed:
            await self.relay.spool.remove(entry)
            return
        try:
            bounced = await self._bounce(entry)
        except OSError as e:
            bounced = f"not bounced ({e.strerror or e})"
        reason = "; ".join(f"<{r}>: {why}" for r, why in entry.state.failed.items())
        try:
            await self.relay.spool.bury(entry, reason)
        except OSError as e:
            # Its file is gone (removed by hand?): nothing left to keep.
            self.relay.spool.forget(entry)
            reason += f" (no dead letter kept: {e.strerror or e})"
        log.error(
            "smtp message {id} from device {device} (account {account}, sender <{sender}>) "
            "is a dead letter, {bounce}: {reason}",
            delivery="dead_letter",
            id=entry.id,
            device=entry.envelope.device,
            account=self.account,
            sender=entry.envelope.original_sender,
            bounce=bounced,
            reason=reason,
        )

    async def _bounce(self, entry: QueueEntry) -> str:
        envelope = entry.envelope
        if envelope.identified_by == "bounce":
            return "not bounced (it was a bounce itself)"
        if not envelope.original_sender:
            return "not bounced (null sender)"
        failures = {r: dsn.Failure(_status(why), why) for r, why in entry.state.failed.items()}
        with await self.relay.spool.open_message(entry) as f:
            head = f.read(min(envelope.size, dsn.MAX_ORIGINAL_HEADERS))
        now = self.relay.clock.seconds()
        message = dsn.build_bounce(
            envelope,
            failures,
            reporting_mta=self.relay.hostname,
            from_address=account_address(self.relay.accounts[self.account]),
            headers=dsn.original_headers(head),
            now=now,
        )
        bounce = replace(
            envelope,
            id=new_id(now),
            device=envelope.device,
            identified_by="bounce",
            original_sender="",
            sender="",
            recipients=(envelope.original_sender,),
            received=now,
            size=len(message),
            eight_bit=not message.isascii(),
            body=None,
            bounce_of=envelope.id,
        )
        self.relay.submitted(await self.relay.spool.add(bounce, message))
        return f"bounce {bounce.id} to <{envelope.original_sender}>"

    async def _after_attempt(self, entry: QueueEntry) -> None:
        verb = self.after_attempt.pop(entry.id, None)
        if verb is not None and entry.id in self.relay.spool.entries:
            await self.relay._carry_out(verb, entry.id)


def _status(why: str) -> str:
    """RFC 3463 status for a failure text ("550 5.1.1 ..." or an expiry)."""
    if why.startswith("delivery time expired"):
        return "4.4.7"
    words = why.split()
    if len(words) > 1 and words[1].count(".") == 2 and words[1][:1] in "45":
        return words[1]
    return "5.0.0"
