"""The PROXY protocol wrapper, on in-memory transports with a fake clock."""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from gateway.devices import DeviceAuthenticator
from gateway.model import Config, IPNetwork, Listener, ProxySettings, TLSFiles, TLSMode
from gateway.proxy_protocol import (
    V2_SIGNATURE,
    BadHeader,
    HeaderReader,
    ProxyProtocolFactory,
    ProxyProtocolWrapper,
)
from gateway.runtime import Runtime, listener_service
from gateway.tls import load_server_identity
from tests.harness.certs import make_tls_material

TRUSTED: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("fd00::/8"),
)
V1 = b"PROXY TCP4 192.0.2.7 10.1.1.1 5555 995\r\n"


def v2(
    command: int = 1,
    family: int = 0x11,
    source: str = "192.0.2.7",
    destination: str = "10.1.1.1",
    ports: tuple[int, int] = (5555, 995),
    tlvs: bytes = b"",
) -> bytes:
    if family == 0x11:
        body = socket.inet_pton(socket.AF_INET, source) + socket.inet_pton(
            socket.AF_INET, destination
        )
    elif family == 0x21:
        body = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(
            socket.AF_INET6, destination
        )
    else:
        body = b""
    body += struct.pack("!HH", *ports) if body else b""
    body += tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


class Recorder(Protocol):
    """Greets on connectionMade, like the POP3 and SMTP servers, and keeps what it sees."""

    def __init__(self) -> None:
        self.received = b""
        self.peer: IAddress | None = None
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peer = self.transport.getPeer()
        self.transport.write(b"+OK greeting\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason


class Setup:
    def __init__(self, real_peer: IAddress | None = None, timeout: float = 10.0) -> None:
        self.clock = MemoryReactorClock()
        self.built: list[Recorder] = []
        self.inner = Factory.forProtocol(self._build)
        self.factory = ProxyProtocolFactory(
            self.inner,
            trusted=TRUSTED,
            clock=self.clock,
            header_timeout=timeout,
            name="pop3 0.0.0.0:995",
        )
        self.transport = StringTransport(
            peerAddress=real_peer or IPv4Address("TCP", "10.9.9.9", 40000),
            hostAddress=IPv4Address("TCP", "10.1.1.1", 995),
        )
        self.wrapper = self.factory.buildProtocol(self.transport.getPeer())
        self.wrapper.makeConnection(self.transport)

    def _build(self) -> Recorder:
        protocol = Recorder()
        self.built.append(protocol)
        return protocol

    @property
    def app(self) -> Recorder:
        assert len(self.built) == 1
        return self.built[0]

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting or self.transport.disconnected)


@pytest.fixture
def logged() -> Any:
    lines: list[str] = []

    def observer(event: LogEvent) -> None:
        if event.get("log_namespace") == "gateway.proxy":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)  # type: ignore[arg-type]
    yield lines
    globalLogPublisher.removeObserver(observer)  # type: ignore[arg-type]


def test_v1_header_gives_the_client_address_and_then_the_greeting() -> None:
    s = Setup()
    assert s.built == [] and s.transport.value() == b""
    s.wrapper.dataReceived(V1 + b"CAPA\r\n")
    assert s.app.peer == IPv4Address("TCP", "192.0.2.7", 5555)
    assert s.wrapper.getHost() == IPv4Address("TCP", "10.1.1.1", 995)
    assert s.transport.value() == b"+OK greeting\r\n"
    assert s.app.received == b"CAPA\r\n"
    s.wrapper.dataReceived(b"QUIT\r\n")
    assert s.app.received == b"CAPA\r\nQUIT\r\n"
    assert s.clock.getDelayedCalls() == []


def test_v1_tcp6() -> None:
    s = Setup()
    s.wrapper.dataReceived(b"PROXY TCP6 2001:DB8:0:0::7 2001:db8::1 5555 995\r\n")
    assert s.app.peer == IPv6Address("TCP", "2001:db8::7", 5555)


def test_v2_header_ipv4_and_ipv6() -> None:
    s = Setup()
    s.wrapper.dataReceived(v2())
    assert s.app.peer == IPv4Address("TCP", "192.0.2.7", 5555)
    s = Setup()
    s.wrapper.dataReceived(v2(family=0x21, source="2001:db8::7", destination="2001:db8::1"))
    assert s.app.peer == IPv6Address("TCP", "2001:db8::7", 5555)


def test_v2_with_tlvs_and_data_after_it() -> None:
    s = Setup()
    tlv = b"\x05\x00\x04abcd"  # PP2_TYPE_UNIQUE_ID
    s.wrapper.dataReceived(v2(tlvs=tlv) + b"\x16\x03\x01")
    assert s.app.peer == IPv4Address("TCP", "192.0.2.7", 5555)
    assert s.app.received == b"\x16\x03\x01"


def test_v2_local_command_keeps_the_real_peer() -> None:
    s = Setup()
    s.wrapper.dataReceived(v2(command=0, family=0x00))
    assert s.app.peer == IPv4Address("TCP", "10.9.9.9", 40000)
    assert s.transport.value() == b"+OK greeting\r\n"


def test_v1_unknown_keeps_the_real_peer() -> None:
    s = Setup()
    s.wrapper.dataReceived(b"PROXY UNKNOWN\r\n")
    assert s.app.peer == IPv4Address("TCP", "10.9.9.9", 40000)


@pytest.mark.parametrize("header", [V1, v2(), v2(family=0x21, source="::1", destination="::2")])
def test_header_split_across_reads(header: bytes) -> None:
    s = Setup()
    for i in range(len(header)):
        assert s.built == []
        s.wrapper.dataReceived(header[i : i + 1])
    assert len(s.built) == 1 and not s.closed
    assert s.app.peer is not None and s.app.peer != s.transport.getPeer()


def test_untrusted_peer_is_closed_at_once_without_greeting(logged: list[str]) -> None:
    s = Setup(real_peer=IPv4Address("TCP", "192.168.1.5", 40000))
    assert s.closed
    assert s.built == [] and s.transport.value() == b""
    s.wrapper.dataReceived(V1)
    assert s.built == []
    assert s.clock.getDelayedCalls() == []
    assert logged == [
        "proxy protocol: connection from 192.168.1.5 refused on pop3 0.0.0.0:995: "
        "not a trusted proxy"
    ]


def test_ipv4_mapped_trusted_peer_is_trusted() -> None:
    s = Setup(real_peer=IPv6Address("TCP", "::ffff:10.2.3.4", 40000))
    assert not s.closed
    s.wrapper.dataReceived(V1)
    assert s.app.peer == IPv4Address("TCP", "192.0.2.7", 5555)


def test_missing_header_closes(logged: list[str]) -> None:
    s = Setup()
    s.wrapper.dataReceived(b"USER printer\r\n")
    assert s.closed and s.built == [] and s.transport.value() == b""
    assert logged == [
        "proxy protocol: connection from 10.9.9.9 closed on pop3 0.0.0.0:995: "
        "no PROXY protocol header"
    ]
    assert s.clock.getDelayedCalls() == []


def test_tls_hello_without_header_closes() -> None:
    s = Setup()
    s.wrapper.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert s.closed and s.built == []


@pytest.mark.parametrize(
    ("garbage", "reason"),
    [
        (b"PROXY TCP4 999.0.2.7 10.1.1.1 5555 995\r\n", "source address is not an IP address"),
        (b"PROXY TCP4 2001:db8::7 10.1.1.1 5555 995\r\n", "does not match the address family"),
        (b"PROXY TCP4 192.0.2.7 10.1.1.1 port 995\r\n", "malformed v1 header"),
        (b"PROXY TCP4 192.0.2.7 10.1.1.1 99999 995\r\n", "source port out of range"),
        (b"PROXY TCP5 192.0.2.7 10.1.1.1 5555 995\r\n", "malformed v1 header"),
        (b"PROXY TCP4 192.0.2.7\r\n", "malformed v1 header"),
        (b"PROXY " + b"1" * 120, "v1 header longer than 107 bytes"),
        (b"PROXY TCP4 " + b"1" * 100 + b"\r\n", "v1 header longer than 107 bytes"),
        (V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\x00" * 12, "unsupported PROXY protocol version 3"),
        (V2_SIGNATURE + b"\x25\x11\x00\x0c" + b"\x00" * 12, "malformed v2 header"),
        (V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4, "malformed v2 header"),
        (V2_SIGNATURE + b"\x21\x17\x00\x0c" + b"\x00" * 12, "malformed v2 header"),
        (v2()[:13] + b"\x12" + v2()[14:], "source is not a TCP address"),
        (V2_SIGNATURE[:5] + b"X", "no PROXY protocol header"),
    ],
)
def test_garbled_header_closes(garbage: bytes, reason: str, logged: list[str]) -> None:
    s = Setup()
    s.wrapper.dataReceived(garbage)
    assert s.closed and s.built == [] and s.transport.value() == b""
    assert len(logged) == 1 and logged[0].endswith(reason), logged
    assert s.clock.getDelayedCalls() == []


def test_silent_peer_is_closed_at_the_deadline(logged: list[str]) -> None:
    s = Setup(timeout=10.0)
    s.clock.advance(9.9)
    assert not s.closed
    s.wrapper.dataReceived(b"PROXY TCP4 192.0.2.7")  # a partial header does not extend it
    s.clock.advance(0.1)
    assert s.closed and s.built == []
    assert logged == [
        "proxy protocol: connection from 10.9.9.9 closed on pop3 0.0.0.0:995: "
        "no PROXY protocol header within 10 s"
    ]


def test_deadline_cancelled_by_header_and_by_close() -> None:
    s = Setup()
    s.wrapper.dataReceived(V1)
    assert s.clock.getDelayedCalls() == []
    s.clock.advance(60)
    assert not s.closed
    s = Setup()
    s.wrapper.connectionLost(Failure(ConnectionError()))
    assert s.clock.getDelayedCalls() == []
    assert s.built == []


def test_connection_lost_reaches_the_wrapped_protocol() -> None:
    s = Setup()
    s.wrapper.dataReceived(V1)
    reason = Failure(ConnectionError("gone"))
    s.wrapper.connectionLost(reason)
    assert s.app.lost is reason


def test_wrapped_protocol_uses_the_real_transport_for_the_rest() -> None:
    """STARTTLS/STLS and TCP_NODELAY go through to the TCP transport."""

    class TCPish(StringTransport):
        started: object = None
        nodelay: bool = False

        def startTLS(self, options: object) -> None:
            self.started = options

        def setTcpNoDelay(self, enabled: bool) -> None:
            self.nodelay = enabled

    clock = MemoryReactorClock()
    factory = ProxyProtocolFactory(
        Factory.forProtocol(Recorder), trusted=TRUSTED, clock=clock, header_timeout=5, name="x"
    )
    transport = TCPish(peerAddress=IPv4Address("TCP", "10.0.0.1", 1))
    wrapper = factory.buildProtocol(None)
    wrapper.makeConnection(transport)
    wrapper.dataReceived(V1)
    marker = object()
    wrapper.startTLS(marker)
    wrapper.setTcpNoDelay(True)
    assert transport.started is marker and transport.nodelay
    wrapper.loseConnection()
    assert transport.disconnecting


def test_factory_refusing_the_connection_closes_it() -> None:
    class Refusing(Factory):
        def buildProtocol(self, addr: Any) -> None:
            return None

    factory = ProxyProtocolFactory(
        Refusing(), trusted=TRUSTED, clock=MemoryReactorClock(), header_timeout=5, name="x"
    )
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1))
    wrapper: ProxyProtocolWrapper = factory.buildProtocol(None)
    wrapper.makeConnection(transport)
    wrapper.dataReceived(V1)
    assert transport.disconnecting


def test_reader_needs_more_then_fails_on_first_wrong_byte() -> None:
    reader = HeaderReader()
    assert reader.feed(b"\r\n\r\n") is None
    with pytest.raises(BadHeader):
        reader.feed(b"X")
    reader = HeaderReader()
    assert reader.feed(b"PRO") is None
    with pytest.raises(BadHeader):
        reader.feed(b"XX")


# -- wiring: where runtime.listener_service puts the wrapper ----------------------------


@pytest.mark.parametrize(
    ("tls", "proxy_protocol"),
    [("implicit", True), ("starttls", True), ("implicit", False), ("starttls", False)],
)
def test_listener_service_wraps_outside_tls(
    tmp_path: Path, tls: TLSMode, proxy_protocol: bool
) -> None:
    material = make_tls_material(tmp_path)
    files = TLSFiles(material.certificate, material.private_key)
    config = Config(
        state_dir=tmp_path,
        tls=files,
        proxy=ProxySettings(trusted=TRUSTED, header_timeout=3.0),
    )
    clock = MemoryReactorClock()
    runtime = Runtime(
        config=config,
        reactor=clock,
        identity=load_server_identity(files),
        authenticator=DeviceAuthenticator({}),
    )
    app = Factory.forProtocol(Recorder)
    listener = Listener("pop3", 995, tls, proxy_protocol=proxy_protocol)
    service = listener_service(runtime, listener, lambda options: app)
    factory = service.factory  # type: ignore[attr-defined]
    if proxy_protocol:
        assert isinstance(factory, ProxyProtocolFactory)
        assert factory.trusted == TRUSTED and factory.header_timeout == 3.0
        assert factory.clock is clock
        factory = factory.wrapped
    if tls == "implicit":
        assert isinstance(factory, TLSMemoryBIOFactory)
        factory = factory.wrappedFactory
    assert factory is app
