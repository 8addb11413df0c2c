"""The shared penalty book's replay on its own, over a store in memory: rows
that become visible late (ids are drawn before commit) are still replayed,
once each, and another process's older failure counts at its own time."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from gateway.model import PenaltySettings
from gateway.penalties.shared import SETTLE, PenaltyEvent, SharedPenaltyBook

ATTACKER = "203.0.113.9"


class MemoryStore:
    """Rows by id; `hidden` ids are drawn but not yet committed."""

    def __init__(self) -> None:
        self.rows: dict[int, tuple[str, PenaltyEvent]] = {}
        self.hidden: set[int] = set()
        self.down = False

    def add(self, process: str, event: PenaltyEvent, *, hidden: bool = False) -> int:
        event_id = max(self.rows, default=0) + 1
        self.rows[event_id] = (process, event)
        if hidden:
            self.hidden.add(event_id)
        return event_id

    def record(self, events: Sequence[PenaltyEvent]) -> Deferred[None]:
        if self.down:
            return fail(ConnectionError("store down"))
        for event in events:
            self.add("me", event)
        return succeed(None)

    def changes(
        self, after: int, since: float, now: float
    ) -> Deferred[list[tuple[int, PenaltyEvent]]]:
        if self.down:
            return fail(ConnectionError("store down"))
        return succeed(
            [
                (i, event)
                for i, (process, event) in sorted(self.rows.items())
                if i > after and process != "me" and i not in self.hidden
            ]
        )

    def known(self, now: float, limit: int) -> Deferred[list[PenaltyEvent]]:
        return succeed([])

    def prune(self, since: float, now: float) -> Deferred[None]:
        return succeed(None)


def book(**settings: object) -> tuple[SharedPenaltyBook, MemoryStore, Clock]:
    clock, store = Clock(), MemoryStore()
    clock.advance(1000)
    options = {"lockout_after": 10, **settings}
    return SharedPenaltyBook(PenaltySettings(**options), clock, store), store, clock  # type: ignore[arg-type]


def failure(at: float) -> PenaltyEvent:
    return PenaltyEvent("failure", at, ATTACKER, "printer")


def test_a_row_committed_late_is_replayed_once() -> None:
    shared, store, clock = book()
    late = store.add("other", failure(clock.seconds()), hidden=True)
    store.add("other", failure(clock.seconds()))
    shared.refresh()
    assert shared.delay_for(ATTACKER, "printer") == 2  # one failure seen
    store.hidden.discard(late)  # its transaction commits now
    clock.advance(1)
    shared.refresh()
    assert shared.delay_for(ATTACKER, "printer") == 4
    for _ in range(3):
        clock.advance(SETTLE)
        shared.refresh()
    assert shared.delay_for(ATTACKER, "printer") == 4  # never counted twice


def test_another_processes_older_failure_counts_at_its_own_time() -> None:
    shared, store, clock = book(lockout_window=60)
    shared.failed(ATTACKER, "printer", b"now")
    store.add("other", failure(clock.seconds() - 50))
    shared.refresh()
    assert shared.delay_for(ATTACKER, "printer") == 4
    clock.advance(11)  # the other's failure leaves the window first
    assert shared.delay_for(ATTACKER, "printer") == 2


def test_a_store_down_loses_nothing_it_can_write_later() -> None:
    shared, store, _ = book(lockout_after=2)
    store.down = True
    shared.failed(ATTACKER, "printer", b"1")
    [lockout] = shared.failed(ATTACKER, "printer", b"2")
    assert lockout.kind == "lockout" and shared.locked(ATTACKER)
    assert store.rows == {}
    store.down = False
    shared.refresh()
    assert [event.kind for _, event in store.rows.values()] == ["failure", "failure", "lockout"]
