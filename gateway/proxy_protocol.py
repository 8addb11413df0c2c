"""PROXY protocol v1 and v2 in front of a device listener (HAProxy's `send-proxy`).

Behind a load balancer every connection comes from the balancer, so the
device's own address, which `allow_from`, `relay_without_auth` and the logs
depend on, has to come from the header the balancer writes first. That header
is a claim anyone could write, so it is taken only from configured trusted
networks, and on a listener that expects it nothing else is accepted: a peer
outside those networks, a missing or garbled header, or silence past the
deadline closes the connection before the device protocol (or TLS) starts.

`HeaderReader` finds where the header ends and which version it is, across
reads of any size; decoding is left to Twisted's own parsers in
`twisted.protocols.haproxy`. `ProxyProtocolFactory` is the Twisted glue: it
wraps a listener's factory (TLS included, so that on implicit-TLS listeners
the header is read before the handshake) and builds the wrapped protocol only
once the header is in, so the greeting goes out after it and the protocol's
transport answers `getPeer()` with the address the header carries.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    ITransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from gateway.model import IPNetwork
from gateway.net import parse_peer_address
from gateway.tls import forget_tls_layer

log = Logger(namespace="gateway.proxy")

V2_SIGNATURE: Final = V2Parser.PREFIX
V1_SIGNATURE: Final = b"PROXY "
# The v1 specification's bound, CRLF included: a longer line is not a header.
V1_MAX_LENGTH: Final = 107
V2_FIXED_LENGTH: Final = 16

TCPAddress = IPv4Address | IPv6Address


class BadHeader(Exception):
    """The peer did not start with a usable PROXY header; the text says why."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header. `source` None: a v2 LOCAL command (a health check) or
    an UNKNOWN/UNSPEC connection, for which the real peer address stands."""

    version: int
    source: TCPAddress | None
    destination: TCPAddress | None
    # Bytes after the header: the first bytes of the proxied stream.
    remaining: bytes


class HeaderReader:
    """Buffers the start of a connection until a whole header is there."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> ProxyHeader | None:
        """The header once complete, None while more bytes are needed;
        raises `BadHeader` as soon as the bytes cannot be one."""
        self._buffer += data
        buffer = self._buffer
        head = buffer[: len(V2_SIGNATURE)]
        if len(head) < len(V2_SIGNATURE) and V2_SIGNATURE.startswith(head):
            return None
        if head == V2_SIGNATURE:
            return self._v2()
        head = buffer[: len(V1_SIGNATURE)]
        if V1_SIGNATURE.startswith(head):
            return None if len(head) < len(V1_SIGNATURE) else self._v1()
        raise BadHeader("no PROXY protocol header")

    def _v1(self) -> ProxyHeader | None:
        end = self._buffer.find(b"\r\n")
        if end < 0 or end + 2 > V1_MAX_LENGTH:
            if end >= 0 or len(self._buffer) >= V1_MAX_LENGTH:
                raise BadHeader(f"v1 header longer than {V1_MAX_LENGTH} bytes")
            return None
        line, remaining = self._buffer[:end], self._buffer[end + 2 :]
        self._buffer = b""
        if line.split(b" ")[1] == V1Parser.UNKNOWN_PROTO:
            # "PROXY UNKNOWN" may end there; Twisted's parser wants more after it.
            return ProxyHeader(version=1, source=None, destination=None, remaining=remaining)
        try:
            info = V1Parser.parse(line)
        except (InvalidProxyHeader, ValueError, UnicodeDecodeError):
            raise BadHeader("malformed v1 header") from None
        return ProxyHeader(
            version=1,
            source=_checked(info.source, "source"),
            destination=_checked(info.destination, "destination"),
            remaining=remaining,
        )

    def _v2(self) -> ProxyHeader | None:
        buffer = self._buffer
        if len(buffer) < V2_FIXED_LENGTH:
            return None
        if buffer[12] & 0xF0 != 0x20:
            raise BadHeader(f"unsupported PROXY protocol version {buffer[12] >> 4}")
        (length,) = struct.unpack("!H", buffer[14:16])
        size = V2_FIXED_LENGTH + length
        if len(buffer) < size:
            return None
        header, remaining = buffer[:size], buffer[size:]
        self._buffer = b""
        try:
            info = V2Parser.parse(header)
        except (InvalidProxyHeader, ValueError, KeyError, struct.error, UnicodeDecodeError):
            raise BadHeader("malformed v2 header") from None
        return ProxyHeader(
            version=2,
            source=_checked(info.source, "source"),
            destination=_checked(info.destination, "destination"),
            remaining=remaining,
        )


def _checked(address: IAddress | None, which: str) -> TCPAddress | None:
    """A TCP address with a real IP (normalised, so logs and policy see one
    spelling), or None; Twisted's parsers take the v1 text on trust."""
    if address is None:
        return None
    if not isinstance(address, IPv4Address | IPv6Address) or address.type != "TCP":
        raise BadHeader(f"{which} is not a TCP address")
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        raise BadHeader(f"{which} address is not an IP address") from None
    if not 0 <= address.port <= 65535:
        raise BadHeader(f"{which} port out of range")
    if ip.version == 4:
        if not isinstance(address, IPv4Address):
            raise BadHeader(f"{which} address does not match the address family")
        return IPv4Address("TCP", str(ip), address.port)
    if not isinstance(address, IPv6Address):
        raise BadHeader(f"{which} address does not match the address family")
    return IPv6Address("TCP", str(ip), address.port)


def is_trusted(host: str | None, trusted: Sequence[IPNetwork]) -> bool:
    ip = parse_peer_address(host) if host is not None else None
    if ip is None:
        return False
    return any(ip.version == net.version and ip in net for net in trusted)


class ProxyProtocolFactory(ServerFactory["ProxyProtocolWrapper"]):
    """Wraps a listener's factory: every connection must start with a PROXY
    header from a trusted network before `wrapped` builds its protocol."""

    def __init__(
        self,
        wrapped: IProtocolFactory,
        *,
        trusted: Sequence[IPNetwork],
        clock: Any,
        header_timeout: float,
        name: str,
    ) -> None:
        self.wrapped = wrapped
        self.trusted = tuple(trusted)
        self.clock = clock
        self.header_timeout = header_timeout
        self.name = name

    def doStart(self) -> None:
        self.wrapped.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()
        super().doStop()

    def buildProtocol(self, addr: IAddress | None) -> ProxyProtocolWrapper:
        return ProxyProtocolWrapper(self)


@implementer(ITransport)
class ProxyProtocolWrapper(Protocol):
    """Reads the header, then is the wrapped protocol's transport: writes and
    producers go to the real transport, `getPeer`/`getHost` answer with the
    header's addresses, and anything else (`startTLS` for STLS/STARTTLS,
    `setTcpNoDelay`) is the real transport's."""

    # The real connection's transport: TCP, with whatever it offers beyond ITransport.
    transport: Any

    def __init__(self, factory: ProxyProtocolFactory) -> None:
        self.factory: ProxyProtocolFactory = factory
        self.wrappedProtocol: IProtocol | None = None
        self.disconnecting = False
        self._reader = HeaderReader()
        self._header: ProxyHeader | None = None
        self._deadline: IDelayedCall | None = None
        self._refused = False

    # -- the connection from the proxy ------------------------------------

    def makeConnection(self, transport: Any) -> None:
        # Look like the transport (ITCPTransport, ...) to the wrapped protocol.
        directlyProvides(self, providedBy(transport))
        super().makeConnection(transport)

    def connectionMade(self) -> None:
        host = self._real_host()
        if not is_trusted(host, self.factory.trusted):
            log.warn(
                "proxy protocol: connection from {peer} refused on {listener}: not a trusted proxy",
                peer=host,
                listener=self.factory.name,
            )
            self._refuse()
            return
        self._deadline = self.factory.clock.callLater(
            self.factory.header_timeout, self._header_timed_out
        )

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._refused:
            return
        try:
            header = self._reader.feed(data)
        except BadHeader as e:
            self._close_without_header(str(e))
            return
        if header is not None:
            self._start(header)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        # The wrapped protocol's STLS/STARTTLS went to the real transport.
        forget_tls_layer(self.transport)
        protocol, self.wrappedProtocol = self.wrappedProtocol, None
        if protocol is not None:
            protocol.connectionLost(reason)

    def _start(self, header: ProxyHeader) -> None:
        self._cancel_deadline()
        self._header = header
        protocol = self.factory.wrapped.buildProtocol(self.getPeer())
        if protocol is None:
            self.loseConnection()
            return
        self.wrappedProtocol = protocol
        protocol.makeConnection(self)
        if header.remaining:
            protocol.dataReceived(header.remaining)

    def _header_timed_out(self) -> None:
        self._deadline = None
        self._close_without_header(
            f"no PROXY protocol header within {self.factory.header_timeout:g} s"
        )

    def _close_without_header(self, reason: str) -> None:
        log.warn(
            "proxy protocol: connection from {peer} closed on {listener}: {reason}",
            peer=self._real_host(),
            listener=self.factory.name,
            reason=reason,
        )
        self._refuse()

    def _refuse(self) -> None:
        self._refused = True
        self._cancel_deadline()
        self.abortConnection()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _real_host(self) -> str | None:
        peer = self.transport.getPeer() if self.transport is not None else None
        host = getattr(peer, "host", None)
        return host if isinstance(host, str) else None

    # -- the transport of the wrapped protocol ----------------------------

    def getPeer(self) -> IAddress:
        if self._header is not None and self._header.source is not None:
            return self._header.source
        peer: IAddress = self.transport.getPeer()
        return peer

    def getHost(self) -> IAddress:
        if self._header is not None and self._header.destination is not None:
            return self._header.destination
        host: IAddress = self.transport.getHost()
        return host

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.transport.writeSequence(data)

    def loseConnection(self) -> None:
        self.disconnecting = True
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self.disconnecting = True
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            self.transport.loseConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def logPrefix(self) -> str:
        return f"{self.factory.name} (PROXY)"

    def __getattr__(self, name: str) -> Any:
        # Only reached for what this class lacks (startTLS, setTcpNoDelay,
        # pauseProducing, getHandle after STARTTLS): the real transport's.
        if name.startswith("__") or "transport" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["transport"], name)
