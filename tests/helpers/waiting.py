"""Polling for what a real process does on its own time.

Integration tests watch other processes (twistd, Dovecot, a sink, an emulator)
through files, logs and sockets, where no event can be awaited: they poll, and
one loop here keeps the deadline, the pause and the failure text the same."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    timeout: float = 10.0,
    message: str | Callable[[T], str] = "condition not met in time",
    *,
    done: Callable[[T], object] = bool,
    interval: float = 0.05,
) -> T:
    """Call `condition` until `done` holds for what it returns (by default: until
    it returns something true), and return that; past `timeout` seconds, fail
    with `message` (or `message(last result)`)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(message(result) if callable(message) else message)
        time.sleep(interval)
