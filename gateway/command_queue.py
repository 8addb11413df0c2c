"""The command queue both device-facing servers hold.

A device may pipeline (RFC 2449, RFC 2920), but its commands run strictly in
order, one at a time: a command that waits (a password check, the upstream,
the spool's fsync) holds the rest until its answer is complete. The queue
also owns what goes with that:

- the idle timer, on the injected clock: silence counts only while no
  command waits, since a wait is the gateway's doing, not the device's;
- the line deadline: a command line must end within `line_timeout` of its
  first byte, so a client trickling a byte now and then (each one resets the
  idle timer) cannot hold a connection for ever;
- the pause of reading from a device whose pipelined backlog grows past a
  bound, so a client cannot make the gateway buffer without limit;
- the same for what goes out: the queue is the transport's producer for the
  whole connection, so the transport pauses it once the replies it has not
  yet sent pass its buffer size (64 KiB for TCP). While paused, no command
  runs, and reading stops as soon as a command waits: a client that
  pipelines `CAPA` or `NOOP` and never reads the answers costs that much
  memory and no more, and is closed if it stays that way past
  `stall_timeout`. (Reading is not stopped before a command waits: during a
  TLS handshake the TLS layer pauses the queue too, and needs to read to
  finish.) A maildrop streaming a message registers its producer with the
  queue (`output`), which passes the pause on.

Each server says what "the next command" is (`next_command`): its own
parser and state machine turn input into work; the queue only decides when
that work runs.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from enum import Enum
from typing import Any, Final, Literal

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProducer,
    IPushProducer,
    IReactorTime,
    ITLSTransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.tls import forget_tls_layer

Work = Coroutine[Any, Any, None]


class IDeviceTransport(ITLSTransport, IPushProducer, IConsumer):
    """What the servers use of a device's transport: a TCP transport that can
    start TLS (or a TLS one), whose reading can be paused, and that accepts a
    producer (a maildrop streaming a message)."""


class Empty(Enum):
    """`next_command` has nothing complete to run until more bytes arrive."""

    EMPTY = "empty"


EMPTY: Literal[Empty.EMPTY] = Empty.EMPTY
# What a server's `next_command` returns: work to wait for, None for a command
# answered at once, EMPTY when nothing complete is left.
Step = Work | Literal[Empty.EMPTY] | None


# How long a connection the gateway closes may linger: over TLS a close waits
# for the peer's close_notify, and a peer that never sends it would otherwise
# hold its socket (and, after a refusal, count nowhere) for ever.
CLOSE_GRACE: Final = 10.0


def _nothing() -> None:
    pass


def _no() -> bool:
    return False


def _none() -> int:
    return 0


def _ignore(failure: Failure) -> None:
    pass


def _empty() -> Step:
    return EMPTY


class Deadline:
    """One timer on the injected clock that can be started, pushed back and stopped.

    `close()` ends it for good and forgets what it would call: that callback
    is a method of the session holding the deadline, and keeping it would
    leave the closed session in a reference cycle, freed only by a full
    garbage collection.
    """

    def __init__(self, clock: IReactorTime, seconds: float, expired: Callable[[], None]) -> None:
        self._clock = clock
        self.seconds = seconds
        self._expired = expired
        self._call: IDelayedCall | None = None
        self._closed = False

    @property
    def armed(self) -> bool:
        return self._call is not None

    def start(self) -> None:
        """Expire `seconds` from now, whether or not the timer was running."""
        if self._closed:
            return
        if self._call is not None:
            self._call.reset(self.seconds)
        else:
            self._call = self._clock.callLater(self.seconds, self._fire)

    def reset(self) -> None:
        """Push a running timer back to `seconds` from now; a stopped one stays stopped."""
        if self._call is not None:
            self._call.reset(self.seconds)

    def stop(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def close(self) -> None:
        """Stop for good: `start` does nothing any more."""
        self.stop()
        self._closed = True
        self._expired = _nothing

    def _fire(self) -> None:
        self._call = None
        self._expired()


@implementer(IPushProducer, IConsumer)
class OutputFlow:
    """The device transport's producer for the whole connection.

    The transport pauses it while its unsent bytes exceed its buffer size and
    resumes it once they are written. A producer registered here (a maildrop
    streaming a message) is paused and resumed with it.
    """

    def __init__(self, blocked: Callable[[], None], unblocked: Callable[[], None]) -> None:
        self.paused = False
        self._blocked = blocked
        self._unblocked = unblocked
        self._inner: IPushProducer | None = None

    def pauseProducing(self) -> None:
        if self.paused:
            return
        self.paused = True
        if self._inner is not None:
            self._inner.pauseProducing()
        self._blocked()

    def resumeProducing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        if self._inner is not None:
            self._inner.resumeProducing()
        self._unblocked()

    def stopProducing(self) -> None:
        if self._inner is not None:
            self._inner.stopProducing()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if not streaming or not IPushProducer.providedBy(producer):
            raise ValueError("a maildrop streams with a push producer")
        self._inner = producer
        if self.paused:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        # Like a transport, this does not resume a producer it paused.
        self._inner = None

    def write(self, data: bytes) -> None:
        raise NotImplementedError("write to the transport; this only passes on the flow")

    def release(self) -> None:
        """The connection is gone: forget the queue's callbacks and the inner
        producer (the queue holds this flow, so they would make a cycle)."""
        self._blocked = self._unblocked = _nothing
        self._inner = None


class CommandQueue:
    """Runs a device's commands in order; one that returns work holds the queue."""

    def __init__(
        self,
        transport: IDeviceTransport,
        clock: IReactorTime,
        *,
        idle_timeout: float,
        stall_timeout: float,
        line_timeout: float,
        next_command: Callable[[], Step],
        partial_line: Callable[[], bool],
        connected: Callable[[], bool],
        backlog: Callable[[], int],
        max_backlog: int,
        on_idle: Callable[[], None],
        on_stalled: Callable[[], None],
        on_line_timeout: Callable[[], None],
        on_error: Callable[[Failure], None],
        after_batch: Callable[[], None] = lambda: None,
    ) -> None:
        self._transport = transport
        self._next_command = next_command
        self._connected = connected
        self._backlog = backlog
        self._max_backlog = max_backlog
        self._on_error = on_error
        self._after_batch = after_batch
        self._idle = Deadline(clock, idle_timeout, on_idle)
        self._stalled = Deadline(clock, stall_timeout, on_stalled)
        self._line = Deadline(clock, line_timeout, on_line_timeout)
        self._linger = Deadline(clock, CLOSE_GRACE, transport.abortConnection)
        self._partial_line = partial_line
        self._busy = False
        self._draining = False
        self._reading_paused = False
        self.output = OutputFlow(self._output_blocked, self._output_unblocked)
        transport.registerProducer(self.output, True)
        self._registered = True
        self._idle.start()

    @property
    def busy(self) -> bool:
        """Whether a command is waiting for its answer."""
        return self._busy

    def received(self, data: bytes) -> None:
        """`data` arrived and went to the parser: silence starts over; run what is
        complete. A line that ended gives the next one a deadline of its own."""
        self._idle.reset()
        if self._line.armed and b"\n" in data:
            self._line.stop()
        self.drain()

    def drain(self) -> None:
        """Run what is complete, in order, until a command waits or input runs out."""
        if self._draining:
            return
        self._draining = True
        try:
            while self._connected() and not self._busy and not self.output.paused:
                work = self._next_command()
                if work is EMPTY:
                    break
                if work is not None:
                    self._start(work)
            self._flow_control()
            self._watch_line()
        finally:
            self._draining = False
            self._after_batch()

    def lose_connection(self) -> None:
        """Close the connection once what was written is sent.

        The queue stops being the transport's producer first: a TLS transport
        does not shut down while a producer is registered, and a TCP one
        resumes a paused producer instead of closing. If the device does not
        read what is left, the stall deadline still aborts the connection.
        """
        if self._registered:
            self._registered = False
            self._transport.unregisterProducer()
        self._transport.loseConnection()
        if not self._linger.armed:
            self._linger.start()

    def stop(self) -> None:
        """The connection is gone: no timer may fire any more.

        The queue also lets go of its server's callbacks (bound methods and
        closures over the server, which holds the queue). Without that every
        closed session would be a reference cycle that only the garbage
        collector's full pass frees, and a burst of sessions would leave
        thousands of them behind. A command still running keeps what it
        needs through its own frame; when it ends, the queue sees the
        connection as gone and runs nothing more.
        """
        for deadline in (self._idle, self._stalled, self._line, self._linger):
            deadline.close()
        forget_tls_layer(self._transport)
        self.output.release()
        self._next_command = _empty
        self._connected = self._partial_line = _no
        self._backlog = _none
        self._on_error = _ignore
        self._after_batch = _nothing

    def _start(self, work: Work) -> None:
        self._busy = True
        self._idle.stop()
        d = Deferred.fromCoroutine(work)
        d.addErrback(self._on_error)
        d.addBoth(self._done)

    def _done(self, _: object) -> None:
        self._busy = False
        if self._connected():
            self._idle.start()
            self.drain()

    def _flow_control(self) -> None:
        # While replies cannot go out, nothing more is read once a command waits.
        limit = 0 if self.output.paused else self._max_backlog
        backlog = self._backlog()
        if not self._reading_paused and backlog > limit:
            self._reading_paused = True
            self._transport.pauseProducing()
        elif self._reading_paused and backlog <= limit // 2 and self._connected():
            self._reading_paused = False
            self._transport.resumeProducing()

    def _watch_line(self) -> None:
        # While reading is paused the line cannot end: its deadline waits too.
        if self._partial_line() and not self._reading_paused:
            if not self._line.armed:
                self._line.start()
        else:
            self._line.stop()

    def _output_blocked(self) -> None:
        self._stalled.start()
        if not self._draining:
            self._flow_control()

    def _output_unblocked(self) -> None:
        self._stalled.stop()
        if self._connected():
            self.drain()
