"""In-memory upstream connections for the POP3 and IMAP client tests.

The test plays the upstream server on a `StringTransport` with a fake clock:
it checks each command byte for byte and answers it. What each protocol's
session looks like (greeting, login, snapshot) stays in its own test module,
in a subclass of `ScriptedUpstream`.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any, ClassVar

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure


def unhandled_errors() -> Iterator[list[LogEvent]]:
    """Fail a test that leaves a failed Deferred nobody looked at.

    A generator for `pytest.fixture(autouse=True)` in the test modules: an
    autouse fixture here would apply to every module that imports a helper.
    """
    failures: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield failures
        gc.collect(1)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert not failures, [e["log_failure"].getTraceback() for e in failures]


class UpstreamTransport(StringTransport):
    """A TCP transport that records TCP_NODELAY and STARTTLS (without doing TLS)."""

    def __init__(self) -> None:
        super().__init__()
        self.no_delay = False
        self.tls_options: Any = None
        self.written_before_tls: bytes | None = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def startTLS(self, options: Any) -> None:
        self.tls_options = options
        self.written_before_tls = self.value()


class ScriptedUpstream:
    """The far end of one in-memory upstream connection, played by the test.

    It is an endpoint factory and the endpoint it makes, in one. Subclasses
    name the client class they expect (`client`) and the port it connects to.
    """

    client: ClassVar[type[Protocol]]
    port: ClassVar[int]

    def __init__(self, connecting: Deferred[Any] | None = None) -> None:
        self.clock = MemoryReactorClock()
        self.transport = UpstreamTransport()
        self.protocol: Any = None
        self.connected_to: tuple[str, int, float] | None = None
        self._connecting = connecting

    def endpoint_factory(self, reactor: Any, host: str, port: int, timeout: float) -> Any:
        assert reactor is self.clock
        self.connected_to = (host, port, timeout)
        return self

    def connect(self, factory: Factory) -> Deferred[Any]:
        if self._connecting is not None:
            return self._connecting
        protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", self.port))
        assert isinstance(protocol, self.client)
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        return succeed(protocol)

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def say(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.dataReceived(data)

    def expect(self, command: bytes, answer: bytes | None = None) -> None:
        assert self.sent() == command
        if answer is not None:
            self.say(answer)

    def drop(self, reason: Exception | None = None) -> None:
        assert self.protocol is not None
        self.protocol.connectionLost(Failure(reason or ConnectionLost("gone")))

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)


def succeeded(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failed(d: Deferred[Any], kind: type[BaseException]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    result = results[0]
    assert isinstance(result, Failure), f"succeeded with {result!r}"
    assert result.check(kind), result.getTraceback()
    return result.value


def pending(d: Deferred[Any]) -> None:
    assert not d.called
