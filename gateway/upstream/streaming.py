"""Idle timeout and back-pressure for the upstream clients.

Every client (POP3, IMAP, SMTP) fails a command when the upstream sends
nothing for too long while an answer is due: `IdleTimer`. The maildrop
clients also stream message bodies to a consumer (the device connection) and
must let its pace reach the upstream socket: `StreamingClient`. Both are
mixins for a Twisted `Protocol`; the few things that differ per protocol
(when an answer is due, how long to wait, how the session ends) are hooks.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from zope.interface import implementer


class IdleTimer:
    """An idle timeout on an injected clock, for a protocol whose answers may be late.

    The timer is not reset for every chunk received: `dataReceived` only
    records `_last_activity`, and a timer that fires early rearms itself for
    the rest. That is cheaper than resetting a DelayedCall for every chunk of
    a large message.
    """

    _clock: IReactorTime
    _timeout: float
    _timer: IDelayedCall | None = None
    _last_activity: float = 0.0

    # -- hooks

    def _timer_due(self) -> bool:
        """Whether an answer is due now, so that silence counts."""
        raise NotImplementedError

    def _idle_limit(self) -> float | None:
        """Seconds of silence allowed now; None when nothing waits any more."""
        return self._timeout

    def _idle_expired(self, limit: float) -> None:
        """The upstream said nothing for `limit` seconds: end the session."""
        raise NotImplementedError

    # -- the timer

    def _arm_timer(self) -> None:
        """Start the timer if an answer is due and none runs; stop it if none is due."""
        limit = self._idle_limit() if self._timer_due() else None
        if limit is None:
            self._cancel_timer()
        elif self._timer is None:
            self._last_activity = self._clock.seconds()
            self._timer = self._clock.callLater(limit, self._timer_fired)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _timer_fired(self) -> None:
        self._timer = None
        limit = self._idle_limit()
        if limit is None:
            return
        idle = self._clock.seconds() - self._last_activity
        if idle < limit:
            # Data came meanwhile: rearm for the rest. Cheaper than resetting
            # a DelayedCall for every chunk of a large message.
            self._timer = self._clock.callLater(limit - idle, self._timer_fired)
            return
        self._idle_expired(limit)


@implementer(IPushProducer)
class UpstreamThrottle:
    """Registered on the consumer while a body streams: pauses the upstream socket.

    It goes inactive when the stream ends, so a late call from the consumer
    cannot pause the next command's answer.
    """

    def __init__(self, client: StreamingClient) -> None:
        self._client = client
        self.active = True

    def pauseProducing(self) -> None:
        if self.active:
            self._client._sink_pause()

    def resumeProducing(self) -> None:
        if self.active:
            self._client._sink_resume()

    def stopProducing(self) -> None:
        # The consumer (the device connection) is gone: nobody will read the rest.
        if self.active:
            self._client.abort("the consumer stopped while a message was streaming")


class StreamingClient(IdleTimer):
    """Back-pressure from a consumer to the upstream socket, plus the idle timer.

    While the consumer holds the upstream paused, silence does not count:
    the timer stops, and starts again at the resume. The protocol class says
    when an answer is due (`_answer_due`) and provides `abort(detail)`.
    """

    transport: Any
    _connected: bool
    _stream: tuple[IConsumer, UpstreamThrottle] | None = None
    _sink_paused: bool = False

    def abort(self, detail: str = "aborted by the gateway") -> None:
        raise NotImplementedError

    def _answer_due(self) -> bool:
        """Whether a command waits for its answer (and the session has not ended)."""
        raise NotImplementedError

    def _timer_due(self) -> bool:
        return self._connected and self._answer_due() and not self._sink_paused

    def _start_stream(self, consumer: IConsumer) -> None:
        throttle = UpstreamThrottle(self)
        self._stream = (consumer, throttle)
        consumer.registerProducer(throttle, True)

    def _stop_stream(self, *, resume: bool) -> None:
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
            if resume and self._connected and self.transport is not None:
                self.transport.resumeProducing()

    def _sink_pause(self) -> None:
        if self._sink_paused or not self._connected:
            return
        self._sink_paused = True
        self.transport.pauseProducing()
        self._arm_timer()

    def _sink_resume(self) -> None:
        if not self._sink_paused:
            return
        self._sink_paused = False
        if self._connected:
            self.transport.resumeProducing()
        self._arm_timer()
