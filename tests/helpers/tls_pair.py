"""A device server and a client talking TLS over in-memory transports: the
real TLS layer (TLSMemoryBIOProtocol) on both sides, no sockets."""

from __future__ import annotations

from typing import Any

import trustme
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient


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


def tls_pair(server_factory: Factory[Any], clock: Clock) -> tuple[Peer, Any, IOPump]:
    """(client, server TLS protocol, pump) with the handshake done and the
    greeting delivered. The TLS layers gather small writes until the next
    reactor turn: the pump's clock (the server's, `clock`) is that reactor."""
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    server_options = PrivateCertificate.loadPEM(leaf.private_key_and_cert_chain_pem.bytes())
    client_options = optionsForClientTLS(
        "localhost", trustRoot=Certificate.loadPEM(ca.cert_pem.bytes())
    )
    peer = Peer()
    server_tls = TLSMemoryBIOFactory(server_options.options(), False, server_factory, clock=clock)
    client_tls = TLSMemoryBIOFactory(
        client_options, True, Factory.forProtocol(lambda: peer), clock=clock
    )
    _, server, pump = connectedServerAndClient(
        lambda: server_tls.buildProtocol(None),
        lambda: client_tls.buildProtocol(None),
        clock=clock,
    )
    pump.flush()
    return peer, server, pump
