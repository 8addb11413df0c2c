"""Login penalties, after Dovecot's auth penalty (the rules: `gateway.penalties.memory`).

`PenaltyBook` is what the authenticator asks and tells; `penalty_book`
builds the one `[penalties]` and `[state]` ask for:

- the embedded backend: a `MemoryPenaltyBook` per process. With several
  worker processes on one host each counts its own failures, so an address
  is locked out after at most `lockout_after` * workers guesses (each worker
  still locks on its own count); the pauses double per worker alike.
- PostgreSQL: a `SharedPenaltyBook` (`gateway.penalties.shared`): the same
  book in memory, sharing failures, lockouts and successes with every
  process of every node through the database, about a second behind them.
"""

from __future__ import annotations

from typing import Literal

from twisted.internet.interfaces import IReactorCore, IReactorTime

from gateway.model import PenaltySettings
from gateway.penalties.memory import (
    KNOWN_FOR,
    REPEATS_REMEMBERED,
    Counted,
    MemoryPenaltyBook,
    NoPenalties,
    Penalized,
    PenaltyBook,
    name_key,
)
from gateway.penalties.postgres import PostgresPenaltyStore
from gateway.penalties.shared import SharedPenaltyBook
from gateway.state.backend import StateBackend

__all__ = [
    "KNOWN_FOR",
    "REPEATS_REMEMBERED",
    "Counted",
    "MemoryPenaltyBook",
    "NoPenalties",
    "Penalized",
    "PenaltyBook",
    "SharedPenaltyBook",
    "name_key",
    "penalty_book",
]


def penalty_book(
    settings: PenaltySettings,
    clock: IReactorTime,
    state: StateBackend | None = None,
    book: Literal["devices", "console"] = "devices",
) -> PenaltyBook:
    """The book `[penalties]` asks for, shared when `state` is PostgreSQL.

    `book` names whose logins it counts, so that the console's admin logins
    and the devices' never share a penalty. A shared book starts looking at
    the database once `clock` (the reactor) runs and writes what it saw
    before the reactor stops."""
    if not settings.enabled:
        return NoPenalties()
    if state is None or state.database is None:
        return MemoryPenaltyBook(settings, clock)
    store = PostgresPenaltyStore(state.database, book, state.identity.name)
    shared = SharedPenaltyBook(settings, clock, store)
    reactor = IReactorCore(clock, None)
    if reactor is not None:
        reactor.callWhenRunning(shared.start)
        reactor.addSystemEventTrigger("before", "shutdown", shared.stop)
    return shared
