"""Implicit TLS to an upstream that hands the client one piece per socket read.

Twisted's `TLSMemoryBIOProtocol._flushReceiveBIO` calls the wrapped
protocol's `dataReceived` once per `SSL_read`, and `SSL_read` never returns
more than one TLS record (16 KiB). Relaying a large message, every 16 KiB
then paid the whole chain (pipeline, parser, event, sink, the device's TLS
transport) once. Here everything OpenSSL can decrypt from what the socket
gave is read first and delivered as one piece, and the socket is read in
larger pieces than TCP's default 64 KiB, so a 1 MiB message takes at most
a few dozen passes through that chain (usually a handful) instead of 64.

This overrides a private method of Twisted (26.10's `_flushReceiveBIO`,
same loop and error handling, only the delivery is gathered):
`tests/unit/test_tls_stream.py` fails if the method it replaces changes, or
if the attributes it relies on go away. Only implicit TLS uses it: STLS and
STARTTLS go through the reactor's `startTLS`, which always builds Twisted's
own class.
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.tls_layer import LeanTLSTransport, lean_tls_factory

# The most `SSL_read` returns at once: one record's plaintext is at most 16 KiB.
RECORD_READ = 2**15
# What one read from the upstream socket may return (Twisted's default is 64
# KiB). It bounds what one `dataReceived` carries, so what the device's TLS
# transport holds before it pushes back on the upstream stays near this.
# Measured with bench/retr_relay.py: 64 KiB, 256 KiB and 1 MiB reads cost
# 1.57, 1.53 and 1.67 s of CPU per GB relayed.
SOCKET_READ = 2**18

__all__ = [
    "RECORD_READ",
    "SOCKET_READ",
    "GatheringTLSProtocol",
    "gathering_tls_factory",
    "wrap_client_tls",
]


class GatheringTLSProtocol(LeanTLSTransport):
    """Twisted's TLS layer, delivering all plaintext of one read at once."""

    def makeConnection(self, transport: Any) -> None:
        # The instance attribute shadows FileDescriptor.bufferSize, which TCP's
        # doRead uses as the size of each recv. Only this upstream socket's
        # reads change: it writes little, so its write-side pause threshold
        # (the same attribute) is never reached in practice.
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = SOCKET_READ
        super().makeConnection(transport)

    def _flushReceiveBIO(self) -> None:
        pieces: list[bytes] = []
        while not self._lostTLSConnection:
            try:
                pieces.append(self._tlsConnection.recv(RECORD_READ))
            except WantReadError:
                break
            except ZeroReturnError:
                # The peer's close_notify: what came before it is delivered first.
                self._deliver(pieces)
                pieces = []
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                failure = Failure()
                self._deliver(pieces)
                pieces = []
                self._tlsShutdownFinished(failure)
        self._deliver(pieces)
        self._flushSendBIO()

    def _deliver(self, pieces: list[bytes]) -> None:
        if pieces and not self._aborted:
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            self.wrappedProtocol.dataReceived(data)


def gathering_tls_factory(
    options: IOpenSSLClientConnectionCreator, wrapped: IProtocolFactory, clock: IReactorTime
) -> TLSMemoryBIOFactory:
    """Twisted's client TLS factory, building the gathering protocol.

    An instance of Twisted's own class rather than a subclass: Twisted's
    connect machinery keeps its factories in reference cycles until a full
    garbage collection (see the README, "Garbage"), and a factory of a
    gateway class there would count as a gateway object left behind.
    """
    factory = lean_tls_factory(options, True, wrapped, clock=clock)
    factory.protocol = GatheringTLSProtocol
    return factory


@implementer(IStreamClientEndpoint)
class _TLSEndpoint:
    """`wrapClientTLS` with the gathering protocol: connects, then unwraps."""

    def __init__(
        self,
        options: IOpenSSLClientConnectionCreator,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
    ) -> None:
        self._options = options
        self._endpoint = endpoint
        self._clock = clock

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        factory = gathering_tls_factory(self._options, protocolFactory, self._clock)
        d: Deferred[Any] = self._endpoint.connect(factory)
        return d.addCallback(lambda protocol: protocol.wrappedProtocol)


def wrap_client_tls(
    options: IOpenSSLClientConnectionCreator,
    endpoint: IStreamClientEndpoint,
    clock: IReactorTime,
) -> IStreamClientEndpoint:
    """Implicit TLS around `endpoint`, as `twisted.internet.endpoints.wrapClientTLS`."""
    return _TLSEndpoint(options, endpoint, clock)
