"""Group commit: many spool operations share one thread hand-off and one fsync."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

RunInThread = Callable[..., "Deferred[Any]"]


class GroupCommit:
    """Runs one kind of file work in batches in the spool's thread.

    What is submitted while a batch is in the thread waits and goes with the
    next batch, so under load many messages share one thread hand-off and one
    directory fsync (group commit), and an idle gateway still commits each
    message at once. `work` gets a list of items and returns one result per
    item: the value, or an exception to raise to that item's waiter.
    (`run_in_thread` may call it with more arguments first, such as a
    database connection.)
    """

    def __init__(self, work: Callable[..., list[Any]], run_in_thread: RunInThread) -> None:
        self._work = work
        self._run = run_in_thread
        self._pending: list[tuple[Any, Deferred[Any]]] = []
        self._busy = False

    def submit(self, item: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._pending.append((item, d))
        self._kick()
        return d

    def _kick(self) -> None:
        if self._busy or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._busy = True
        done = self._run(self._work, [item for item, _ in batch])

        def finished(results: list[Any]) -> None:
            self._busy = False
            for (_, d), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    d.errback(Failure(result))
                else:
                    d.callback(result)
            self._kick()

        def failed(failure: Failure) -> None:
            self._busy = False
            for _, d in batch:
                d.errback(failure)
            self._kick()

        done.addCallbacks(finished, failed)
