"""The Graph request rules with a fake HTTP client on a fake clock: Retry-After
honoured within the caller's bound, one forced token refresh after 401,
errors mapped to the maildrop family, the Prefer header on every request,
four requests at a time per mailbox, and the wire-form size count."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from gateway.dotstuff import DotStuffer, unstuff
from gateway.maildrop.graph import graph_uidl
from gateway.maildrop.graph_wire import CRLFLines, WireCounter
from gateway.upstream.errors import UpstreamRejected, UpstreamUnavailable
from gateway.upstream.graph import GraphHTTP, GraphMailbox, GraphNotFound, MailboxSlots
from gateway.upstream.graph.http import retry_after

BASE = "https://graph.example/v1.0"


class FakeResponse:
    def __init__(self, code: int, body: Any = b"", headers: dict[str, str] | None = None):
        self.code = code
        self.body = json.dumps(body).encode() if not isinstance(body, bytes) else body
        self.headers = Headers({k: [v] for k, v in (headers or {}).items()})
        self.length = len(self.body)

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(None)
        if self.body:
            protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))


class FakeHTTP:
    """Answers requests from a queue; `hold` keeps them pending instead."""

    def __init__(self, *answers: FakeResponse) -> None:
        self.answers = list(answers)
        self.sent: list[tuple[str, str, Headers, Any]] = []
        self.hold = False
        self.pending: list[Deferred[Any]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.sent.append((method, url, kwargs["headers"], kwargs.get("json")))
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            return d
        return succeed(self.answers.pop(0))


def client(http: FakeHTTP, clock: Clock, budget: float = 30.0, tokens: list[bool] | None = None):
    async def token(force: bool) -> str:
        if tokens is not None:
            tokens.append(force)
        return "tok-fresh" if force else "tok"

    return GraphHTTP(
        base_url=BASE,
        mailbox="alice@example.com",
        token=token,
        http=http,  # type: ignore[arg-type]
        clock=clock,
        timeout=10,
        retry_budget=budget,
        slots=MailboxSlots(),
    )


def run(coro: Any) -> Deferred[Any]:
    return ensureDeferred(coro)


def result_of(d: Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "not finished"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def test_retry_after_forms() -> None:
    assert retry_after(Headers({b"retry-after": [b"7"]}), 0) == 7
    assert retry_after(Headers({}), 0) is None
    when = retry_after(Headers({b"retry-after": [b"Thu, 01 Jan 1970 00:01:40 GMT"]}), 40)
    assert when == 60


def test_429_waits_for_retry_after_on_the_clock() -> None:
    clock = Clock()
    http = FakeHTTP(
        FakeResponse(429, {"error": {"code": "TooManyRequests"}}, {"Retry-After": "5"}),
        FakeResponse(200, {"value": []}),
    )
    graph = client(http, clock)
    d = run(graph.json("GET", "/users/x/mailFolders/inbox", kind="folder"))
    assert not d.called and len(http.sent) == 1
    clock.advance(4.9)
    assert len(http.sent) == 1
    clock.advance(0.2)
    assert result_of(d) == {"value": []}
    assert graph.stats.throttled == 1 and graph.stats.requests == 2


def test_503_without_retry_after_backs_off() -> None:
    clock = Clock()
    http = FakeHTTP(FakeResponse(503), FakeResponse(503), FakeResponse(200, {}))
    d = run(client(http, clock).json("GET", "/x", kind="t"))
    clock.advance(1)
    assert len(http.sent) == 2
    clock.advance(2)
    assert result_of(d) == {}


def test_wait_beyond_the_bound_gives_up_at_once() -> None:
    clock = Clock()
    http = FakeHTTP(FakeResponse(429, {}, {"Retry-After": "120"}))
    d = run(client(http, clock, budget=30).json("GET", "/x", kind="list"))
    with pytest.raises(UpstreamUnavailable) as info:
        result_of(d)
    assert info.value.code == "SYS/TEMP"
    assert "Retry-After 120 s" in info.value.detail
    assert clock.getDelayedCalls() == []


def test_401_refreshes_the_token_once() -> None:
    clock = Clock()
    tokens: list[bool] = []
    http = FakeHTTP(
        FakeResponse(401), FakeResponse(401, {"error": {"code": "InvalidAuthenticationToken"}})
    )
    d = run(client(http, clock, tokens=tokens).json("GET", "/x", kind="list"))
    with pytest.raises(UpstreamRejected) as info:
        result_of(d)
    assert tokens == [False, True]
    assert "InvalidAuthenticationToken" in info.value.detail
    assert [h.getRawHeaders(b"authorization") for _, _, h, _ in http.sent] == [
        [b"Bearer tok"],
        [b"Bearer tok-fresh"],
    ]


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (404, GraphNotFound),
        (403, UpstreamRejected),
        (400, UpstreamRejected),
        (500, UpstreamUnavailable),
        (504, UpstreamUnavailable),
    ],
)
def test_errors_map_to_the_maildrop_family(status: int, kind: type[Exception]) -> None:
    http = FakeHTTP(FakeResponse(status, {"error": {"code": "Something", "message": "why"}}))
    d = run(client(http, Clock()).json("GET", "/x", kind="list"))
    with pytest.raises(kind):
        result_of(d)


def test_every_request_prefers_immutable_ids_and_follows_next_links() -> None:
    page1 = {"value": [{"id": "a"}], "@odata.nextLink": f"{BASE}/users/x/next?$skip=1"}
    http = FakeHTTP(
        FakeResponse(200, {"id": "F"}),
        FakeResponse(200, page1),
        FakeResponse(200, {"value": [{"id": "b"}]}),
    )
    mailbox = GraphMailbox(client(http, Clock()))

    async def go() -> list[dict[str, Any]]:
        folder = await mailbox.folder_id("Inbox")
        return await mailbox.list_messages(folder, ["id"])

    assert result_of(run(go())) == [{"id": "a"}, {"id": "b"}]
    assert http.sent[2][1] == f"{BASE}/users/x/next?$skip=1"  # verbatim
    assert "$top=1000" in http.sent[1][1] and "/mailFolders/inbox?" in http.sent[0][1]
    for _, _, headers, _ in http.sent:
        assert headers.getRawHeaders(b"prefer") == [b'IdType="ImmutableId"']


def test_next_link_to_another_host_is_not_followed() -> None:
    page = {"value": [], "@odata.nextLink": "https://evil.example/v1.0/steal"}
    http = FakeHTTP(FakeResponse(200, page))
    d = run(GraphMailbox(client(http, Clock())).list_messages("F", ["id"]))
    with pytest.raises(UpstreamUnavailable):
        result_of(d)
    assert len(http.sent) == 1


def test_four_requests_at_a_time_per_mailbox() -> None:
    http = FakeHTTP()
    http.hold = True
    graph = client(http, Clock())
    calls = [run(graph.json("GET", f"/m/{n}", kind="t")) for n in range(6)]
    assert len(http.sent) == 4
    http.pending.pop(0).callback(FakeResponse(200, {}))
    assert len(http.sent) == 5
    while http.pending:
        http.pending.pop(0).callback(FakeResponse(200, {}))
    assert [result_of(c) for c in calls] == [{}] * 6


def test_timeout_on_the_injected_clock() -> None:
    clock = Clock()
    http = FakeHTTP()
    http.hold = True
    d = run(client(http, clock).json("GET", "/x", kind="list"))
    clock.advance(10)
    with pytest.raises(UpstreamUnavailable) as info:
        result_of(d)
    assert "no answer within 10 s" in info.value.detail


def test_uidl_is_rfc1939_and_stable() -> None:
    uidl = graph_uidl("AAMkAGI2TG93AAA=")
    assert uidl == graph_uidl("AAMkAGI2TG93AAA=") != graph_uidl("AAMkAGI2TG93AAB=")
    assert 1 <= len(uidl) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in uidl)


@given(
    st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"x.y", b"\xff"]), max_size=40),
    st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=10),
)
def test_size_count_equals_what_retr_sends(parts: list[bytes], cuts: list[int]) -> None:
    mime = b"".join(parts)
    chunks, at, i = [], 0, 0
    while at < len(mime):
        step = cuts[i % len(cuts)]
        chunks.append(mime[at : at + step])
        at, i = at + step, i + 1
    counter, crlf, stuffer = WireCounter(), CRLFLines(), DotStuffer()
    sent = b""
    for chunk in chunks:
        counter.feed(chunk)
        sent += stuffer.feed(crlf.feed(chunk))
    sent += stuffer.close()
    assert counter.total() == len(unstuff(sent))
    whole = CRLFLines().feed(mime)
    assert b"\n" not in whole.replace(b"\r\n", b"")
    assert unstuff(sent).startswith(whole)


class FakeProducer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


def pump_with(on_data: Any, clock: Clock | None = None) -> tuple[Any, FakeProducer, list[Any]]:
    from twisted.internet.interfaces import IPushProducer
    from zope.interface import directlyProvides

    from gateway.upstream.graph import BodyPump
    from tests.helpers.graph import Sink

    sink = Sink()
    pump = BodyPump(on_data, sink)
    if clock is not None:
        pump.watch(clock, 10)
    transport = FakeProducer()
    directlyProvides(transport, IPushProducer)
    pump.makeConnection(transport)
    outcome: list[Any] = []
    pump.done.addBoth(outcome.append)
    return pump, transport, outcome


def test_pump_passes_device_back_pressure_to_graph() -> None:
    pump, transport, outcome = pump_with(lambda data: True)
    pump.pauseProducing()
    pump.resumeProducing()
    assert transport.calls == ["pause", "resume"]
    pump.dataReceived(b"x")
    pump.connectionLost(Failure(ResponseDone()))
    assert outcome == [None]


def test_pump_stops_reading_once_it_has_enough() -> None:
    pump, transport, outcome = pump_with(lambda data: False)
    pump.dataReceived(b"header\r\n\r\nline\r\n")
    assert transport.calls == ["stop"] and outcome == [None]
    pump.dataReceived(b"more")  # arriving after the stop: ignored
    assert pump.octets == len(b"header\r\n\r\nline\r\n")


def test_pump_gives_up_on_a_silent_graph_but_not_on_a_slow_device() -> None:
    from gateway.upstream.errors import UpstreamLost

    clock = Clock()
    pump, transport, outcome = pump_with(lambda data: True, clock)
    pump.pauseProducing()  # the device is slow: Graph is not to blame
    clock.advance(60)
    assert outcome == []
    pump.resumeProducing()
    pump.dataReceived(b"x")
    clock.advance(9)
    pump.dataReceived(b"y")
    clock.advance(9)
    assert outcome == []
    clock.advance(1)
    assert isinstance(outcome[0], Failure) and outcome[0].check(UpstreamLost)
    assert transport.calls[-1] == "stop"
    assert clock.getDelayedCalls() == []
