"""A device server and a client talking TLS over in-memory transports: the
real TLS layer (TLSMemoryBIOProtocol) on both sides, no sockets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

import trustme
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient

_P = TypeVar("_P", bound=Protocol)


class Peer(Protocol):
    """The client's application side: what it received, and whether it was closed."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed = True

    def take(self) -> bytes:
        data, self.received = self.received, b""
        return data


# How a side's TLS factory is made: (options, is_client, wrapped factory, clock).
TLSFactoryMaker = Callable[[Any, bool, Factory[Any], Clock], TLSMemoryBIOFactory]


def twisted_tls(options: Any, is_client: bool, wrapped: Factory[Any], clock: Clock) -> Any:
    return TLSMemoryBIOFactory(options, is_client, wrapped, clock=clock)


@overload
def tls_pair(
    server_factory: Factory[Any],
    clock: Clock,
    *,
    peer: None = None,
    server_tls: TLSFactoryMaker = ...,
    client_tls: TLSFactoryMaker = ...,
) -> tuple[Peer, Any, IOPump]: ...


@overload
def tls_pair(
    server_factory: Factory[Any],
    clock: Clock,
    *,
    peer: _P,
    server_tls: TLSFactoryMaker = ...,
    client_tls: TLSFactoryMaker = ...,
) -> tuple[_P, Any, IOPump]: ...


def tls_pair(
    server_factory: Factory[Any],
    clock: Clock,
    *,
    peer: Protocol | None = None,
    server_tls: TLSFactoryMaker = twisted_tls,
    client_tls: TLSFactoryMaker = twisted_tls,
) -> tuple[Any, Any, IOPump]:
    """(client, server TLS protocol, pump) with the handshake done and the
    greeting delivered. The TLS layers gather small writes until the next
    reactor turn: the pump's clock (the server's, `clock`) is that reactor.

    `peer` is the client's application protocol (a `Peer` by default);
    `server_tls`/`client_tls` make each side's TLS factory (Twisted's own by
    default), for tests of the gateway's TLS layers."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    server_options = PrivateCertificate.loadPEM(leaf.private_key_and_cert_chain_pem.bytes())
    client_options = optionsForClientTLS(
        "localhost", trustRoot=Certificate.loadPEM(ca.cert_pem.bytes())
    )
    client_app: Any = peer if peer is not None else Peer()
    server_side = server_tls(server_options.options(), False, server_factory, clock)
    client_side = client_tls(client_options, True, Factory.forProtocol(lambda: client_app), clock)
    _, server, pump = connectedServerAndClient(
        lambda: server_side.buildProtocol(None),
        lambda: client_side.buildProtocol(None),
        clock=clock,
    )
    pump.flush()
    return client_app, server, pump
