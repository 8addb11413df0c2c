"""The leaner TLS layer (`gateway.tls_layer`) under the device listeners and upstreams.

It replaces three private methods of Twisted's TLS layer; these tests fail if
Twisted changes them, and check over real TLS in memory that the result is
the same connection: the same interfaces declared, every byte delivered in
order, the handshake and a close still right, only with fewer transport
writes for a large write.
"""

from __future__ import annotations

import hashlib
import inspect
import socket
import ssl
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import tcp
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.test.iosim import IOPump
from zope.interface import providedBy

from gateway.tls_layer import DRAIN, LeanTLSTransport, lean_tls_factory
from tests.helpers.tls_pair import tls_pair, twisted_tls

# Sources of the Twisted 26.10 methods LeanTLSTransport replaces. If one of
# these fails, Twisted changed it: compare the new version with the override,
# port what changed, then record the new digest.
_TWISTED = {
    "makeConnection": "c83b193e6cb07f9f9cef7fd04be06e64ede1cfcc17431f51da8cdcead4723ac1",
    "_write": "b795cc8e83620d7dedbca54820d1388d6df792b760706af7c34954c7cc8d38de",
    "_flushSendBIO": "c034168e4f0faf2cf4d45d7aa671c0b8b16733067b9f600d5cae8c0c8a743b86",
}


class Recorder(Protocol):
    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)


def _lean_tls(options: Any, is_client: bool, wrapped: Any, clock: Clock) -> Any:
    return lean_tls_factory(options, is_client, wrapped, clock=clock)


def _pair(*, lean: bool) -> tuple[Any, Recorder, IOPump, Clock]:
    """(server TLS protocol, client application, pump, clock) after the handshake."""
    clock = Clock()
    make = _lean_tls if lean else twisted_tls
    app, server, pump = tls_pair(
        Factory.forProtocol(Protocol), clock, peer=Recorder(), server_tls=make, client_tls=make
    )
    return server, app, pump, clock


def _count_writes(server: Any) -> list[int]:
    """Sizes of what the server's TLS layer hands its TCP transport from now on."""
    sizes: list[int] = []
    transport = server.transport
    original = transport.write

    def write(data: bytes) -> None:
        sizes.append(len(data))
        original(data)

    transport.write = write
    return sizes


def test_twisted_methods_replaced_are_unchanged() -> None:
    for name, digest in _TWISTED.items():
        source = inspect.getsource(getattr(TLSMemoryBIOProtocol, name))
        assert hashlib.sha256(source.encode()).hexdigest() == digest, name


def test_the_attributes_the_overrides_use_exist() -> None:
    server, _app, _pump, _clock = _pair(lean=True)
    assert isinstance(server, LeanTLSTransport)
    for name in ("_tlsConnection", "_lostTLSConnection", "_connectWrapped", "_appSendBuffer"):
        assert hasattr(server, name), name
    for name in ("_checkHandshakeStatus", "_bufferedWrite", "_tlsShutdownFinished"):
        assert callable(getattr(server, name)), name


def test_the_same_interfaces_as_twisteds_own_layer() -> None:
    lean, _, _, _ = _pair(lean=True)
    plain, _, _, _ = _pair(lean=False)
    assert set(providedBy(lean)) == set(providedBy(plain))
    assert ITCPTransport.providedBy(lean)


def test_a_large_write_arrives_whole_in_few_transport_writes() -> None:
    data = bytes(range(256)) * 1024  # 256 KiB: sixteen TLS records
    for lean in (False, True):
        server, app, pump, clock = _pair(lean=lean)
        sizes = _count_writes(server)
        server.write(data)
        clock.advance(0)
        pump.flush()
        assert b"".join(app.pieces) == data
        if lean:
            # All records encrypted first, then the BIO drained into one write.
            assert len(sizes) == 1, sizes
        else:
            assert len(sizes) >= 16, sizes


def test_small_writes_and_a_write_of_exactly_one_drain() -> None:
    server, app, pump, clock = _pair(lean=True)
    expected = b""
    for data in (b"+OK hello\r\n", b"x" * (DRAIN - 29), b"y" * DRAIN, b".\r\n"):
        server.write(data)
        clock.advance(0)
        pump.flush()
        expected += data
        assert b"".join(app.pieces) == expected


def test_a_clean_close_still_reaches_the_peer() -> None:
    server, app, pump, clock = _pair(lean=True)
    lost: list[object] = []
    app.connectionLost = lost.append  # type: ignore[method-assign]
    server.write(b"bye\r\n")
    server.loseConnection()
    clock.advance(0)
    pump.flush()
    assert b"".join(app.pieces) == b"bye\r\n"
    assert lost


class _Echo(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"+OK hello\r\n")

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data.upper())


@pytest_twisted.ensureDeferred
async def test_on_a_real_socket_writes_leave_without_waiting_for_the_reactor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The handshake, a greeting and an answer reach a real client, and the TCP
    transport never had to ask the reactor to tell it when it may write."""
    from twisted.internet import reactor

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    options = PrivateCertificate.loadPEM(leaf.private_key_and_cert_chain_pem.bytes()).options()
    registered: list[object] = []
    plain_start_writing = tcp.Server.startWriting

    def start_writing(transport: tcp.Server) -> None:
        registered.append(transport)
        plain_start_writing(transport)

    monkeypatch.setattr(tcp.Server, "startWriting", start_writing)
    port = reactor.listenTCP(  # type: ignore[attr-defined]
        0, lean_tls_factory(options, False, Factory.forProtocol(_Echo)), interface="127.0.0.1"
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)

    def client() -> tuple[bytes, bytes]:
        with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                greeting = tls.recv(100)
                tls.sendall(b"ping\r\n")
                answer = tls.recv(100)
                seen = list(registered)
                return greeting + answer, repr(seen).encode()

    try:
        received, seen = await deferToThread(client)
    finally:
        await port.stopListening()
    assert received == b"+OK hello\r\nPING\r\n"
    assert seen == b"[]", "a write waited for the reactor"
