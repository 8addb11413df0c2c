"""The command pipeline every upstream client (POP3, IMAP, SMTP) holds.

The three protocols differ in how replies look and what a command sends; they
agree on everything around that, and it lives here once:

- a queue of commands, each with a Deferred, sent one at a time or pipelined
  while only pipelinable commands are in flight;
- the end of a session, once: every pending and later command fails with the
  error the client chose, so no Deferred is ever left unfired;
- one idle timeout on the injected clock: a command fails when the upstream
  sends nothing for too long while an answer is due. The timer is not reset
  per received chunk (`note_activity` only records the time; a timer that
  fires early rearms itself for the rest), which is cheaper than resetting a
  DelayedCall for every chunk of a large message;
- back-pressure while an answer streams to a consumer (the device
  connection): a producer registered there pauses the upstream socket, and
  silence does not count while it holds the upstream paused;
- the end of the connection worded one way for the logs, and `when_closed()`.

A client is a Twisted `Protocol` that *holds* a `Pipeline` and drives it from
`connectionMade`, `dataReceived` and `connectionLost`; what to do with parsed
replies stays in the client.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.net import set_no_delay
from gateway.tls import forget_tls_layer
from gateway.upstream.errors import UpstreamLost, UpstreamUnavailable, describe_error


@dataclass(eq=False)
class Command:
    """One command in the pipeline; clients subclass it for their own fields."""

    verb: str  # for messages only: never the arguments, which may carry secrets
    deferred: Deferred[Any]
    # What goes on the wire: the first piece at once, each next one after a
    # continuation request (IMAP literals). Empty for a greeting.
    pieces: list[bytes] = field(default_factory=list)
    pipelinable: bool = False
    # Seconds of silence allowed while this command waits, if longer than the default.
    timeout: float | None = None
    # Runs synchronously at the positive answer, before any byte after it is read.
    on_ok: Callable[[], None] | None = None
    # No command may follow it (QUIT, LOGOUT).
    ends_session: bool = False
    # The server closing the connection answers it well enough (LOGOUT).
    answered_by_close: bool = False


ErrorFactory = Callable[[str], Exception]
_C = TypeVar("_C", bound=Command)
_T = TypeVar("_T")


def _nothing() -> None:
    pass


def _no() -> bool:
    return False


async def outcome(step: Deferred[_T]) -> _T | Failure:
    """The result of a pipelined command, or its Failure: returned, not raised.

    Awaiting every step of a pipeline this way leaves no failure unhandled,
    whichever step fails first, and the type says which value is which.
    """
    try:
        return await step
    except Exception:
        return Failure()


async def outcomes(steps: Sequence[Deferred[Any]]) -> list[Any | Failure]:
    """`outcome` of each step, in order."""
    return [await outcome(step) for step in steps]


@implementer(IPushProducer)
class UpstreamThrottle:
    """Registered on the consumer while an answer streams: pauses the upstream socket.

    It goes inactive when the stream ends, so a late call from the consumer
    cannot pause the next command's answer.
    """

    def __init__(self, pipeline: Pipeline[Any]) -> None:
        self._pipeline = pipeline
        self.active = True

    def pauseProducing(self) -> None:
        if self.active:
            self._pipeline.sink_pause()

    def resumeProducing(self) -> None:
        if self.active:
            self._pipeline.sink_resume()

    def stopProducing(self) -> None:
        # The consumer (the device connection) is gone: nobody will read the rest.
        if self.active:
            self._pipeline.end("the consumer stopped while a message was streaming")


class Pipeline(Generic[_C]):
    """Commands, their Deferreds, the idle timer and back-pressure of one connection.

    `error()` gives the error type a failed session raises (it may depend on
    whether the client logged in yet); `closing_error` the one for a command
    queued after QUIT/LOGOUT. `process` parses what is buffered (the client's
    reply loop); `mid_answer` says whether an answer is half read, for the
    wording of a failure. `can_pipeline` says whether the server allows more
    than one command in flight. `read_ahead` hands bytes that arrived before a
    command was sent to its answer (POP3, where replies carry no tag).
    """

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        *,
        peer: str,
        process: Callable[[], None],
        error: Callable[[], ErrorFactory],
        closing_error: ErrorFactory,
        mid_answer: Callable[[], bool],
        can_pipeline: Callable[[], bool] = lambda: True,
        read_ahead: Callable[[], bool] | None = None,
    ) -> None:
        self.clock = clock
        self.timeout = timeout
        self.peer = peer
        self.queue: deque[_C] = deque()
        self.inflight: deque[_C] = deque()
        self.transport: Any = None
        self.connected = False
        self._error = error
        self._closing_error = closing_error
        self._mid_answer = mid_answer
        self._can_pipeline = can_pipeline
        self._read_ahead = read_ahead
        self._process = process
        self._ended: tuple[ErrorFactory, str] | None = None
        self._closing: str | None = None
        self._lost = False
        self._closed_waiters: list[Deferred[None]] = []
        self._processing = False
        self._timer: IDelayedCall | None = None
        self._last_activity = 0.0
        self._stream: tuple[IConsumer, UpstreamThrottle] | None = None
        self._sink_paused = False

    # -- the session

    @property
    def ended(self) -> bool:
        return self._ended is not None

    @property
    def closing(self) -> bool:
        """QUIT/LOGOUT was queued: nothing more can be."""
        return self._closing is not None

    @property
    def head(self) -> _C | None:
        return self.inflight[0] if self.inflight else None

    def new_deferred(self) -> Deferred[Any]:
        # Cancelling any pending command abandons the whole session: the
        # server will still answer it, and nothing can be read after that.
        return Deferred(lambda d: self.end("a pending command was cancelled"))

    def expect(self, cmd: _C) -> Deferred[Any]:
        """Wait for an answer nobody asked for (the greeting)."""
        self.inflight.append(cmd)
        return cmd.deferred

    def enqueue(self, cmd: _C) -> Deferred[Any]:
        if self._ended is not None:
            make, detail = self._ended
            return fail(make(detail))
        if self._closing is not None:
            return fail(
                self._closing_error(
                    f"the session with {self.peer} is ending ({self._closing} sent)"
                )
            )
        self.queue.append(cmd)
        if cmd.ends_session:
            self._closing = cmd.verb
        self.send_queued()
        return cmd.deferred

    def send_now(self, cmd: _C, data: bytes) -> Deferred[Any]:
        """Put `cmd` in flight with `data` as written, bypassing the queue (message content)."""
        if self._ended is not None:
            make, detail = self._ended
            return fail(make(detail))
        assert not self.inflight and not self.queue, "sent with commands pending"
        assert self._closing is None
        self.inflight.append(cmd)
        if data:
            self.write(data)
        self.arm_timer()
        return cmd.deferred

    def send_queued(self) -> None:
        while self.queue and self.connected and self._ended is None:
            nxt = self.queue[0]
            if self.inflight and not (
                nxt.pipelinable
                and self._can_pipeline()
                and all(c.pipelinable for c in self.inflight)
            ):
                break
            self.queue.popleft()
            self.inflight.append(nxt)
            self.write(nxt.pieces.pop(0))
        self.arm_timer()
        if self._read_ahead is not None and self.inflight and self._read_ahead():
            # Bytes that came before this command was sent (after the end of
            # the previous answer) are read as its answer, as on the wire.
            self.process()

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def finish(self, cmd: _C, result: object, *, positive: bool) -> None:
        """`cmd` was answered: run its `on_ok`, send what waits, fire its Deferred."""
        if positive and cmd.on_ok is not None:
            cmd.on_ok()
            if self._ended is not None:
                return  # on_ok ended the session, which failed `cmd` too
        if cmd in self.inflight:
            self.inflight.remove(cmd)
        # The next command may have another timeout (the end of SMTP DATA).
        self.cancel_timer()
        self.send_queued()
        if isinstance(result, Exception):
            cmd.deferred.errback(Failure(result))
        else:
            cmd.deferred.callback(result)

    def process(self) -> None:
        """Run the client's reply loop, never re-entered (a callback may send)."""
        if self._processing:
            return
        self._processing = True
        try:
            self._process()
        finally:
            self._processing = False

    def end(self, detail: str, *, abort_transport: bool = True) -> None:
        """End the session once: fail everything pending, drop the connection."""
        if self._ended is not None:
            if abort_transport and self.connected and self.transport is not None:
                self.transport.abortConnection()
            return
        make = self._error()
        self._ended = (make, detail)
        self.cancel_timer()
        self.stop_stream(resume=False)
        pending = list(self.inflight) + list(self.queue)
        self.inflight.clear()
        self.queue.clear()
        if abort_transport and self.connected and self.transport is not None:
            self.transport.abortConnection()
        for cmd in pending:
            if not cmd.deferred.called:
                if cmd.answered_by_close and not abort_transport:
                    # The server closed after (or instead of) answering: the
                    # session is over either way, which is all it asked.
                    cmd.deferred.callback(None)
                    continue
                cmd.deferred.errback(Failure(make(detail)))

    def waiting_for(self) -> str:
        """What the session waited for, as the end of a log detail."""
        head = self.head
        if head is None:
            return ""
        if self._mid_answer():
            return f" in the middle of the {head.verb} answer"
        return f" while waiting for the {head.verb} answer"

    def fail_protocol(self, error: Exception) -> None:
        """The upstream sent something its protocol does not allow: end the session."""
        self.end(f"{self.peer}: {error}{self.waiting_for()}")

    # -- the connection

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.connected = True
        set_no_delay(transport)
        self.arm_timer()

    def note_activity(self) -> bool:
        """Bytes came (or went): silence starts again. False once the session ended."""
        if self._ended is not None:
            return False  # the session is over; its pending commands have failed
        self._last_activity = self.clock.seconds()
        return True

    def describe_loss(self, reason: Failure, *, quiet_when_idle: bool = True) -> str:
        """Why the connection ended, as a log detail.

        A clean close while nothing was pending is unremarkable: with
        `quiet_when_idle` no error text is added to it then.
        """
        if reason.check(SSL.Error, VerificationError):
            return f"TLS with {self.peer} failed ({describe_error(reason.value)})"
        idle = not self.inflight and not self.queue
        if quiet_when_idle and idle and reason.check(ConnectionDone):
            return f"{self.peer} closed the connection"
        return f"{self.peer} closed the connection ({describe_error(reason.value)})"

    def connection_lost(self, what: str) -> None:
        """The connection is gone: end the session with `what` and tell the waiters."""
        self.connected = False
        self._lost = True
        if self._ended is None:
            self.end(f"{what}{self.waiting_for()}", abort_transport=False)
        else:
            self.cancel_timer()
        waiters, self._closed_waiters = self._closed_waiters, []
        self._release()
        for d in waiters:
            d.callback(None)

    def _release(self) -> None:
        """Forget the client's callbacks once the connection is gone.

        They are the client's bound methods and closures over it, and the
        client holds this pipeline: kept, they would make every closed
        connection a reference cycle that only a full garbage collection
        frees. Nothing calls them any more: the session has ended, so
        `enqueue` fails at once and no reply is read.
        """
        assert self._ended is not None  # connection_lost ended the session
        make = self._ended[0]
        self._process = _nothing
        self._error = lambda: make
        self._mid_answer = self._can_pipeline = _no
        self._read_ahead = None

    def when_closed(self) -> Deferred[None]:
        """Fires (never fails) once the connection is gone."""
        if self._lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closed_waiters.append(d)
        return d

    # -- the idle timer

    def _idle_limit(self) -> float | None:
        head = self.head
        return max(self.timeout, head.timeout or 0.0) if head is not None else None

    def _timer_due(self) -> bool:
        return (
            self.connected and self._ended is None and bool(self.inflight) and not self._sink_paused
        )

    def arm_timer(self) -> None:
        """Start the timer if an answer is due and none runs; stop it if none is due."""
        limit = self._idle_limit() if self._timer_due() else None
        if limit is None:
            self.cancel_timer()
        elif self._timer is None:
            self._last_activity = self.clock.seconds()
            self._timer = self.clock.callLater(limit, self._timer_fired)

    def cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timer_fired(self) -> None:
        self._timer = None
        limit = self._idle_limit()
        if limit is None or not self._timer_due():
            return
        idle = self.clock.seconds() - self._last_activity
        if idle < limit:
            self._timer = self.clock.callLater(limit - idle, self._timer_fired)
            return
        self.end(f"{self.peer} sent nothing for {limit:g} s{self.waiting_for()}")

    # -- back-pressure

    def start_stream(self, consumer: IConsumer) -> None:
        throttle = UpstreamThrottle(self)
        self._stream = (consumer, throttle)
        consumer.registerProducer(throttle, True)

    def stop_stream(self, *, resume: bool) -> None:
        if self._stream is None:
            return
        consumer, throttle = self._stream
        self._stream = None
        throttle.active = False
        consumer.unregisterProducer()
        if self._sink_paused:
            self._sink_paused = False
            # unregisterProducer does not resume a paused producer: without
            # this the upstream would never be read again.
            if resume and self.connected and self.transport is not None:
                self.transport.resumeProducing()

    def sink_pause(self) -> None:
        if self._sink_paused or not self.connected:
            return
        self._sink_paused = True
        self.transport.pauseProducing()
        self.arm_timer()

    def sink_resume(self) -> None:
        if not self._sink_paused:
            return
        self._sink_paused = False
        if self.connected:
            self.transport.resumeProducing()
        self.arm_timer()


class _Parser(TypingProtocol):
    def feed(self, data: bytes) -> None: ...


class PipelinedClient(Protocol, Generic[_C]):
    """The Twisted glue of an upstream client: connection events go to its `Pipeline`.

    A client sets `_parser` and `_pipe` in its `__init__` and supplies the
    reply loop (`Pipeline(process=...)`); this class is the rest of what
    every client does alike between connect and close.
    """

    peer: str
    # After login a broken session is `UpstreamLost`, before it `UpstreamUnavailable`.
    logged_in = False
    _parser: _Parser
    _pipe: Pipeline[_C]
    # Whether a clean close while nothing was pending goes without error text.
    _quiet_close_when_idle = True

    @property
    def ended(self) -> bool:
        return self._pipe.ended

    def when_closed(self) -> Deferred[None]:
        """Fires (never fails) once the connection is gone."""
        return self._pipe.when_closed()

    def abort(self, detail: str = "aborted by the gateway") -> None:
        """Drop the connection now, without a goodbye; fail whatever is pending. Idempotent."""
        self._pipe.end(detail)

    def connectionMade(self) -> None:
        self._pipe.connection_made(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._pipe.note_activity():
            self._parser.feed(data)
            self._pipe.process()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        forget_tls_layer(self.transport)  # after STLS/STARTTLS
        self._pipe.connection_lost(self._describe_loss(reason))

    def _describe_loss(self, reason: Failure) -> str:
        return self._pipe.describe_loss(reason, quiet_when_idle=self._quiet_close_when_idle)

    def _error_type(self) -> ErrorFactory:
        """What a failed session raises: for the maildrop clients, by login state."""
        return UpstreamLost if self.logged_in else UpstreamUnavailable


def verb_of(line: bytes) -> str:
    """The command's name for messages: never its arguments, which may carry secrets."""
    return line.split(b" ", 1)[0].decode("ascii", "replace").upper()
