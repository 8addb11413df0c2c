"""Login penalties shared by every gateway process: an attacker spreading
guesses over nodes (or a node's workers) is counted once.

The authenticator asks its book synchronously, and the reactor must never
wait on the database, so each process keeps its `MemoryPenaltyBook` as the
fast path and shares what it sees through a `PenaltyStore`:

- write-behind: each counted failure, each lockout and each success that
  clears something is appended to the store right away (one transaction at a
  time; events seen meanwhile go in the next one), never waited for;
- read: every `refresh` seconds (1 s) the book fetches the events other
  processes appended since its last look and replays them into its memory
  book, at their own times: their failures count towards this process's
  pauses and lockouts, their lockouts lock here, their successes clear here.

How stale a process's view is: another process's failure is seen here
within its write (one short transaction, at most `[state] timeout`) plus
one refresh interval, about a second. A lockout is decided by the process
whose failure reaches `lockout_after` with every failure it knows of, and is
then seen everywhere within the same delay. So an attacker gets at most
`lockout_after` guesses plus those that land on the other processes within
that second before the address is locked everywhere; and never more than
`lockout_after` per process, since each process also locks on its own
count alone (the bound of unshared books: `lockout_after` * processes).
A repeated attempt (a printer polling with a stale password) is recognised
by a keyed digest whose key each process draws at start, so it counts once
per process rather than once.

The database down (`StateUnavailable`, or any other error of the store):
penalties carry on in this process's memory (never a refused or delayed
login because of the store), one warning line says so and one info line
when it is back; the events seen meanwhile (at most `MAX_PENDING`) are
written then.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.model import PenaltySettings
from gateway.penalties.memory import KNOWN_FOR, MemoryPenaltyBook, Penalized, name_key

log = Logger(namespace="gateway.penalties")

# Seconds between two looks at the other processes' events.
REFRESH = 1.0
# Events kept for writing while the store is down (the latest win).
MAX_PENDING = 1000
# How late an event may become visible after events with higher ids (ids
# are drawn at insert, rows appear at commit): ids above the last look's
# highest are re-read for this long, the ones already replayed skipped.
SETTLE = 10.0
# Looks between two prunings of events no process needs any more.
PRUNE_EVERY = 60
# A success renews the shared "known here" mark at most this often.
KNOWN_RENEWAL = 24 * 3600.0


@dataclass(frozen=True)
class PenaltyEvent:
    """One thing a process saw, as it is shared.

    `network` and `name` are the book's keys (the folded address, the
    device-name key); `until` is a lockout's end, or for a success until
    when the pair counts as known (None: unchanged)."""

    kind: Literal["failure", "success", "lockout"]
    at: float
    network: str
    name: str = ""
    until: float | None = None


class PenaltyStore(Protocol):
    """Where the processes sharing a book append and read their events."""

    def record(self, events: Sequence[PenaltyEvent]) -> Deferred[None]:
        """Append this process's events, in one transaction."""
        ...

    def changes(
        self, after: int, since: float, now: float
    ) -> Deferred[list[tuple[int, PenaltyEvent]]]:
        """Other processes' events with an id above `after`, by id; only those
        that still matter (a failure or success after `since`, a lockout or
        known mark still running at `now`)."""
        ...

    def known(self, now: float, limit: int) -> Deferred[list[PenaltyEvent]]:
        """The (device, address) pairs known at `now`, as success events."""
        ...

    def prune(self, since: float, now: float) -> Deferred[None]:
        """Forget what no longer matters (as in `changes`)."""
        ...


class SharedPenaltyBook:
    """A `MemoryPenaltyBook` that shares its failures, lockouts and
    successes with the other processes of one store."""

    def __init__(
        self,
        settings: PenaltySettings,
        clock: IReactorTime,
        store: PenaltyStore,
        refresh: float = REFRESH,
    ) -> None:
        self.settings = settings
        self.local = MemoryPenaltyBook(settings, clock)
        self._clock = clock
        self._store = store
        self._refresh = refresh
        self._pending: deque[PenaltyEvent] = deque(maxlen=MAX_PENDING)
        self._writing: Deferred[None] | None = None
        self._reading: Deferred[None] | None = None
        self._loop: LoopingCall | None = None
        self._looks = 0
        # Ids at or below `_low` are replayed; above it, `_seen` says which.
        self._low = 0
        self._seen: set[int] = set()
        self._marks: deque[tuple[float, int]] = deque()
        self._loaded_known = False
        # Why the store failed last (None: it works), for one line each way.
        self._down: str | None = None

    # -- the PenaltyBook interface, answered from memory -------------------------

    def delay_for(self, address: str, device: str) -> float:
        return self.local.delay_for(address, device)

    def locked(self, address: str) -> bool:
        return self.local.locked(address)

    def failed(self, address: str, device: str, attempt: bytes = b"") -> tuple[Penalized, ...]:
        network = self.local.network(address)
        if network is None:
            return ()
        now = self._clock.seconds()
        counted = self.local.count_failure(network, device, now, attempt)
        if counted.counted:
            self._publish(PenaltyEvent("failure", now, network, name_key(device)))
        for penalty in counted.penalized:
            if penalty.kind == "lockout":
                until = now + penalty.seconds
                self._publish(PenaltyEvent("lockout", now, network, until=until))
        return counted.penalized

    def succeeded(self, address: str, device: str) -> None:
        network = self.local.network(address)
        if network is None:
            return
        now = self._clock.seconds()
        clears = self.local.holds(network, device)
        known = self.local.known_until(network, device)
        self.local.succeeded(address, device)
        renew = known is None or known < now + KNOWN_FOR - KNOWN_RENEWAL
        if clears or renew:
            until = now + KNOWN_FOR if renew else None
            self._publish(PenaltyEvent("success", now, network, name_key(device), until))

    # -- sharing -----------------------------------------------------------------

    def start(self) -> None:
        """Look at the store now and every `refresh` seconds."""
        if self._loop is not None:
            return
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self._clock
        self._loop.start(self._refresh, now=True)

    def stop(self) -> Deferred[None]:
        """Stop looking; fires once what was seen is written (or could not be)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return self.written()

    def written(self) -> Deferred[None]:
        """Fires once the events seen so far are written, or failed to be."""
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        self._flush()
        while self._writing is not None:
            writing, done = self._writing, Deferred[None]()

            def fire(result: None, done: Deferred[None] = done) -> None:
                done.callback(None)
                return result

            writing.addBoth(fire)
            await done

    def refresh(self) -> Deferred[None]:
        """One look at the other processes' events (and a write of ours that
        waited for the store); fires when done, never fails."""
        if self._pending and self._writing is None:
            self._flush()
        if self._reading is not None:
            return self._reading
        reading = Deferred.fromCoroutine(self._look())
        if not reading.called:
            self._reading = reading
        return reading

    async def _look(self) -> None:
        now = self._clock.seconds()
        since = now - self.settings.lockout_window
        self._looks += 1
        try:
            if not self._loaded_known:
                self._replay_known(await self._store.known(now, self.settings.max_entries))
            self._replay(await self._store.changes(self._low, since, now), now)
            if self._looks % PRUNE_EVERY == 0:
                await self._store.prune(since, now)
        except Exception:
            self._failed(Failure())
        else:
            self._up(None)
        finally:
            self._reading = None

    def _replay_known(self, pairs: list[PenaltyEvent]) -> None:
        for event in pairs:
            self.local.absorb_known(event.network, event.name, event.until)
        self._loaded_known = True

    def _replay(self, events: list[tuple[int, PenaltyEvent]], looked: float) -> None:
        highest = self._low
        for event_id, event in events:
            highest = max(highest, event_id)
            if event_id in self._seen:
                continue
            self._seen.add(event_id)
            if event.kind == "failure":
                self.local.count_failure(event.network, event.name, event.at, remote=True)
            elif event.kind == "lockout" and event.until is not None:
                self.local.absorb_lockout(event.network, event.until)
            elif event.kind == "success":
                self.local.absorb_success(event.network, event.name, event.until)
        self._marks.append((looked, max(highest, self._marks[-1][1] if self._marks else 0)))
        while self._marks and self._marks[0][0] <= looked - SETTLE:
            self._low = max(self._low, self._marks.popleft()[1])
        self._seen = {each for each in self._seen if each > self._low}

    def _publish(self, event: PenaltyEvent) -> None:
        self._pending.append(event)
        if self._writing is None and self._down is None:
            self._flush()

    def _flush(self) -> None:
        if self._writing is not None or not self._pending:
            return
        batch = list(self._pending)
        self._pending.clear()
        writing = self._store.record(batch)

        def failed(failure: Failure) -> None:
            # Written later, with what is seen meanwhile (at most MAX_PENDING).
            self._pending.extendleft(reversed(batch))
            self._failed(failure)

        def done(_: object) -> None:
            self._writing = None
            if self._pending and self._down is None:
                self._flush()

        self._writing = writing
        writing.addCallbacks(self._up, failed).addBoth(done)

    def _up(self, _: object) -> None:
        if self._down is not None:
            log.info("login penalties: the state database is back, penalties shared again")
            self._down = None

    def _failed(self, failure: Failure) -> None:
        if self._down is None:
            self._down = failure.getErrorMessage() or str(failure.type)
            log.warn(
                "login penalties: state database unavailable ({error}); penalties count"
                " on this process alone until it is back",
                error=self._down,
            )
