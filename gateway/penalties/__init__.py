"""Login penalties, after Dovecot's auth penalty (the rules: `gateway.penalties.memory`).

`PenaltyBook` is what the authenticator asks and tells; `penalty_book`
builds the one `[penalties]` and `[state]` ask for:

- the embedded backend, one process: a `MemoryPenaltyBook`, as always.
- the embedded backend with worker processes (`shared_dir` given: the state
  directory): a `SharedPenaltyBook` over `state_dir/penalties.sqlite`
  (`gateway.penalties.sqlite`), so the workers of a host count an attacker
  once, as nodes do through PostgreSQL. Without it, each worker would count
  alone and an address be locked out after at most `lockout_after` *
  workers guesses.
- PostgreSQL: a `SharedPenaltyBook` (`gateway.penalties.shared`): the same
  book in memory, sharing failures, lockouts and successes with every
  process of every node through the database, about a second behind them.
"""

from __future__ import annotations

from pathlib import Path
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
from gateway.penalties.shared import PenaltyStore, SharedPenaltyBook
from gateway.penalties.sqlite import SQLitePenaltyStore
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
    shared_dir: Path | None = None,
) -> PenaltyBook:
    """The book `[penalties]` asks for: shared when `state` is PostgreSQL, or
    through `shared_dir` (the state directory, for worker processes).

    `book` names whose logins it counts, so that the console's admin logins
    and the devices' never share a penalty. A shared book starts looking at
    the store once `clock` (the reactor) runs and writes what it saw before
    the reactor stops."""
    if not settings.enabled:
        return NoPenalties()
    store: PenaltyStore
    if state is not None and state.database is not None:
        store = PostgresPenaltyStore(state.database, book, state.identity.name)
    elif state is not None and shared_dir is not None:
        store = SQLitePenaltyStore.in_state_dir(shared_dir, book, state.identity.name)
    else:
        return MemoryPenaltyBook(settings, clock)
    shared = SharedPenaltyBook(settings, clock, store)
    reactor = IReactorCore(clock, None)
    if reactor is not None:
        reactor.callWhenRunning(shared.start)
        reactor.addSystemEventTrigger("before", "shutdown", shared.stop)
    return shared
