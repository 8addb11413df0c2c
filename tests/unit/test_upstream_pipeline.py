"""The command pipeline the upstream clients share, driven alone.

The POP3, IMAP and SMTP client tests prove it through each protocol; these
pin the shared rules themselves: one end that fails everything, one idle
timer on the injected clock, back-pressure, pipelining and QUIT/LOGOUT.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from gateway.upstream.errors import UpstreamLost, UpstreamUnavailable
from gateway.upstream.pipeline import Command, Pipeline, outcomes


class Harness:
    """A pipeline on a StringTransport; the test answers commands by hand."""

    def __init__(self, *, pipelining: bool = True) -> None:
        self.clock = Clock()
        self.transport = StringTransport()
        self.logged_in = False
        self.pipelining = pipelining
        self.mid_answer = False
        self.pipe: Pipeline[Command] = Pipeline(
            self.clock,
            10,
            peer="upstream",
            process=lambda: None,
            error=lambda: UpstreamLost if self.logged_in else UpstreamUnavailable,
            closing_error=UpstreamLost,
            mid_answer=lambda: self.mid_answer,
            can_pipeline=lambda: self.pipelining,
        )
        self.pipe.connection_made(self.transport)

    def send(self, verb: str, **options: Any) -> tuple[Command, Deferred[Any]]:
        cmd = Command(verb, self.pipe.new_deferred(), [verb.encode() + b"\r\n"], **options)
        return cmd, self.pipe.enqueue(cmd)

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data


def failure_of(d: Deferred[Any]) -> Failure:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert len(failures) == 1
    return failures[0]


def test_one_at_a_time_unless_both_may_be_pipelined() -> None:
    h = Harness()
    first, _ = h.send("NOOP")
    h.send("DELE", pipelinable=True)
    assert h.sent() == b"NOOP\r\n"  # NOOP may not be pipelined: DELE waits
    h.pipe.finish(first, "done", positive=True)
    second, _ = h.send("QUIT", pipelinable=True)
    assert h.sent() == b"DELE\r\nQUIT\r\n"
    assert [c.verb for c in h.pipe.inflight] == ["DELE", "QUIT"]
    assert h.pipe.inflight[1] is second


def test_pipelinable_commands_wait_when_the_server_does_not_pipeline() -> None:
    h = Harness(pipelining=False)
    h.send("DELE", pipelinable=True)
    h.send("DELE", pipelinable=True)
    assert h.sent() == b"DELE\r\n"


def test_the_end_fails_every_pending_and_later_command_once() -> None:
    h = Harness()
    _, inflight = h.send("LIST")
    _, queued = h.send("UIDL")
    h.logged_in = True
    h.pipe.end("it broke")
    for d in (inflight, queued):
        failure = failure_of(d)
        assert isinstance(failure.value, UpstreamLost) and failure.value.detail == "it broke"
    assert h.transport.disconnecting
    later = failure_of(h.send("STAT")[1])
    assert isinstance(later.value, UpstreamLost) and later.value.detail == "it broke"
    h.pipe.end("again")  # a second end changes nothing
    assert h.clock.getDelayedCalls() == []


def test_the_error_type_is_chosen_when_the_session_ends() -> None:
    h = Harness()
    _, d = h.send("USER")
    h.pipe.end("refused at once")
    assert isinstance(failure_of(d).value, UpstreamUnavailable)


def test_cancelling_a_command_abandons_the_session() -> None:
    h = Harness()
    _, first = h.send("RETR")
    _, second = h.send("RETR")
    first.cancel()
    assert h.pipe.ended and h.transport.disconnecting
    assert "a pending command was cancelled" in failure_of(second).value.detail
    failure_of(first)


def test_nothing_is_queued_after_quit() -> None:
    h = Harness()
    h.send("QUIT", ends_session=True)
    refused = failure_of(h.send("NOOP")[1])
    assert isinstance(refused.value, UpstreamLost)
    assert refused.value.detail == "the session with upstream is ending (QUIT sent)"
    assert h.sent() == b"QUIT\r\n"


def test_silence_while_an_answer_is_due_ends_the_session() -> None:
    h = Harness()
    _, d = h.send("STAT")
    h.clock.advance(6)
    h.pipe.note_activity()  # a chunk came: the silence starts again
    h.clock.advance(6)
    assert not d.called
    h.clock.advance(4)
    detail = failure_of(d).value.detail
    assert detail == "upstream sent nothing for 10 s while waiting for the STAT answer"
    assert h.clock.getDelayedCalls() == []


def test_a_command_may_allow_a_longer_silence() -> None:
    h = Harness()
    _, d = h.send("DATA", timeout=600)
    h.clock.advance(599)
    assert not d.called
    h.clock.advance(1)
    assert "sent nothing for 600 s" in failure_of(d).value.detail


def test_mid_answer_wording() -> None:
    h = Harness()
    _, d = h.send("RETR")
    h.mid_answer = True
    h.clock.advance(10)
    assert failure_of(d).value.detail.endswith("in the middle of the RETR answer")


def test_no_timer_while_nothing_is_due() -> None:
    h = Harness()
    cmd, d = h.send("NOOP")
    h.pipe.finish(cmd, "ok", positive=True)
    assert d.result == "ok"
    assert h.clock.getDelayedCalls() == []


class Sink:
    def __init__(self) -> None:
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        pass


def test_a_paused_sink_pauses_the_upstream_and_silence_does_not_count() -> None:
    h = Harness()
    _, d = h.send("RETR")
    sink = Sink()
    h.pipe.start_stream(sink)
    throttle = sink.producer
    throttle.pauseProducing()
    assert h.transport.producerState == "paused"
    h.clock.advance(60)
    assert not d.called  # the device is slow, not the upstream
    throttle.resumeProducing()
    assert h.transport.producerState == "producing"
    h.clock.advance(10)
    assert "sent nothing for 10 s" in failure_of(d).value.detail


def test_the_stream_ends_resumed_and_a_late_pause_does_nothing() -> None:
    h = Harness()
    h.send("RETR")
    sink = Sink()
    h.pipe.start_stream(sink)
    throttle = sink.producer
    throttle.pauseProducing()
    h.pipe.stop_stream(resume=True)
    assert sink.producer is None and h.transport.producerState == "producing"
    throttle.pauseProducing()
    assert h.transport.producerState == "producing"


def test_a_consumer_that_stops_ends_the_session() -> None:
    h = Harness()
    _, d = h.send("RETR")
    sink = Sink()
    h.pipe.start_stream(sink)
    sink.producer.stopProducing()
    assert "the consumer stopped" in failure_of(d).value.detail


def test_connection_lost_fails_pending_but_answers_logout() -> None:
    h = Harness()
    _, fetch = h.send("FETCH", pipelinable=True)
    _, logout = h.send("LOGOUT", pipelinable=True, ends_session=True, answered_by_close=True)
    closed = h.pipe.when_closed()
    h.pipe.connection_lost(h.pipe.describe_loss(Failure(ConnectionDone())))
    assert failure_of(fetch).value.detail == (
        "upstream closed the connection "
        "(ConnectionDone: Connection was closed cleanly.) while waiting for the FETCH answer"
    )
    assert logout.result is None
    assert closed.called
    assert h.pipe.when_closed().called


def test_outcomes_return_failures_in_order() -> None:
    ok: Deferred[str] = Deferred()
    bad: Deferred[str] = Deferred()
    d = Deferred.fromCoroutine(outcomes([bad, ok]))
    bad.errback(UpstreamLost("gone"))
    assert not d.called  # the later step is still awaited
    ok.callback("fine")
    second, first = d.result
    assert first == "fine"
    assert isinstance(second, Failure) and second.check(UpstreamLost)
