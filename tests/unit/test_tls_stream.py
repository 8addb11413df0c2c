"""The upstream TLS layer that gathers a read's plaintext into one delivery.

`GatheringTLSProtocol` replaces a private method of Twisted's TLS layer;
these tests fail if Twisted changes that method or the attributes the
replacement uses, and check the behaviour over real TLS in memory.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump
from zope.interface import implementer

from gateway.upstream.tls_stream import (
    SOCKET_READ,
    GatheringTLSProtocol,
    gathering_tls_factory,
    wrap_client_tls,
)
from tests.helpers.tls_pair import tls_pair, twisted_tls

# The source of the Twisted method GatheringTLSProtocol._flushReceiveBIO
# replaces (Twisted 26.10). If this fails, Twisted changed it: compare the new
# version with the override, port what changed, then record the new digest.
_TWISTED_FLUSH_RECEIVE = "b45e129f60c448628c0950f8800c0a8aa8fd04df848043d08627b3b01a98ed27"


class Recorder(Protocol):
    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.lost = reason


def _gathering(options: Any, is_client: bool, wrapped: Any, clock: Clock) -> Any:
    return gathering_tls_factory(options, wrapped, clock)


def _pair(*, gathering: bool) -> tuple[Recorder, Any, IOPump, Clock]:
    """(client application, server TLS protocol, pump, clock) after the handshake."""
    clock = Clock()
    app, server, pump = tls_pair(
        Factory.forProtocol(Protocol),
        clock,
        peer=Recorder(),
        client_tls=_gathering if gathering else twisted_tls,
    )
    return app, server, pump, clock


def _send(server: Any, pump: IOPump, clock: Clock, data: bytes) -> None:
    """The server writes `data` in records of up to 16 KiB; they arrive in one read."""
    server.write(data)
    clock.advance(0)  # the server's TLS layer gathers writes until the next turn
    pump.pump()


def test_twisted_method_replaced_is_unchanged() -> None:
    source = inspect.getsource(TLSMemoryBIOProtocol._flushReceiveBIO)
    assert hashlib.sha256(source.encode()).hexdigest() == _TWISTED_FLUSH_RECEIVE


def test_the_attributes_the_override_uses_exist() -> None:
    app, _server, _pump, _clock = _pair(gathering=True)
    client = app.transport
    assert isinstance(client, GatheringTLSProtocol)
    for name in ("_tlsConnection", "_lostTLSConnection", "_aborted"):
        assert hasattr(client, name), name
    for name in ("_shutdownTLS", "_tlsShutdownFinished", "_flushSendBIO"):
        assert callable(getattr(client, name)), name


def test_twisted_delivers_one_record_at_a_time() -> None:
    """What the override exists for: without it, 100 KiB arrive in 7 pieces."""
    app, server, pump, clock = _pair(gathering=False)
    data = bytes(range(256)) * 400
    _send(server, pump, clock, data)
    assert b"".join(app.pieces) == data
    assert len(app.pieces) == 7


def test_one_read_is_one_delivery() -> None:
    app, server, pump, clock = _pair(gathering=True)
    data = bytes(range(256)) * 400
    _send(server, pump, clock, data)
    assert app.pieces == [data]
    _send(server, pump, clock, b"small")
    assert app.pieces == [data, b"small"]


def test_data_before_close_notify_comes_first_then_a_clean_close() -> None:
    app, server, pump, _clock = _pair(gathering=True)
    data = b"x" * 50_000
    server.write(data)
    server.loseConnection()  # flushes, then sends close_notify
    pump.flush()
    assert app.pieces == [data]
    assert app.lost is not None
    assert app.lost.check(ConnectionDone)


def test_data_before_a_broken_record_comes_first_then_the_error() -> None:
    app, server, _pump, clock = _pair(gathering=True)
    server.write(b"y" * 20_000)
    clock.advance(0)
    wire = server.transport.getOutBuffer()
    # A record with a corrupted tag after two good ones: the good bytes are
    # delivered, then the connection fails.
    corrupt = wire + wire[-100:-1] + bytes([wire[-1] ^ 1])
    client = app.transport
    assert isinstance(client, GatheringTLSProtocol)
    client.dataReceived(corrupt)
    assert b"".join(app.pieces) == b"y" * 20_000
    assert len(app.pieces) == 1
    client.connectionLost(Failure(ConnectionDone()))
    assert app.lost is not None
    assert not app.lost.check(ConnectionDone)


def test_the_socket_is_read_in_larger_pieces() -> None:
    transport = StringTransport()
    transport.bufferSize = 2**16  # type: ignore[attr-defined]  # as a TCP transport has
    clock = Clock()
    options = optionsForClientTLS("localhost")
    factory = gathering_tls_factory(options, Factory.forProtocol(Protocol), clock)
    protocol = factory.buildProtocol(None)
    assert protocol is not None
    protocol.makeConnection(transport)
    assert transport.bufferSize == SOCKET_READ  # type: ignore[attr-defined]
    assert transport.value()  # the ClientHello went out


@implementer(IStreamClientEndpoint)
class _Endpoint:
    def __init__(self) -> None:
        self.factory: IProtocolFactory | None = None

    def connect(self, factory: IProtocolFactory) -> Any:
        self.factory = factory
        return succeed(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 995)))


def test_wrap_client_tls_connects_through_the_gathering_layer() -> None:
    inner = _Endpoint()
    app = Recorder()
    endpoint = wrap_client_tls(optionsForClientTLS("localhost"), inner, Clock())
    connected: list[Any] = []
    endpoint.connect(Factory.forProtocol(lambda: app)).addCallback(connected.append)
    assert isinstance(inner.factory, TLSMemoryBIOFactory)
    assert inner.factory.protocol is GatheringTLSProtocol
    assert connected == [app]
