"""In-memory pieces the device-facing POP3 and SMTP state-machine tests share.

Each front-end test drives a server factory over Twisted's StringTransport with a
fast password hasher and synchronous device lookups; the transports here add what
StringTransport lacks (a STARTTLS record, a peer that reads only when told)."""

from __future__ import annotations

from typing import Any

from argon2 import PasswordHasher
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocol, IProtocolFactory
from twisted.internet.testing import StringTransport

FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def run_now(f: Any, *args: Any) -> Deferred[Any]:
    """Stands in for `deferToThread`: the work runs at once, on the test's thread."""
    return succeed(f(*args))


class TLSRecordingTransport(StringTransport):
    tls_started_with: object = None

    def startTLS(self, options: object) -> None:
        self.tls_started_with = options


class UnreadTransport(TLSRecordingTransport):
    """A TCP-like transport whose peer reads only when told to: like Twisted's
    FileDescriptor, it pauses its producer once more than 64 KiB wait unsent,
    and resumes it when the peer has read them all."""

    buffer_size = 65536
    unread = 0
    producer_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.unread += len(data)
        if self.producer is not None and not self.producer_paused:
            if self.unread > self.buffer_size:
                self.producer_paused = True
                self.producer.pauseProducing()

    def peer_reads(self) -> bytes:
        data: bytes = self.value()
        self.clear()
        self.unread = 0
        if self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()
        return data


def pipeline_until_paused(transport: UnreadTransport, proto: IProtocol, command: bytes) -> int:
    """Send `command` over and over, 64 KiB at a time, as long as the gateway
    reads (up to 4 MiB); the number of bytes sent."""
    chunk = command * (65536 // len(command))
    sent = 0
    while transport.producerState == "producing" and sent < 4 * 2**20:
        proto.dataReceived(chunk)
        sent += len(chunk)
    return sent


def connect_in_memory(
    factory: IProtocolFactory, peer: str, transport_class: type[StringTransport]
) -> tuple[Any, Any]:
    """A device at `peer` connected to the front end `factory` builds, over an
    in-memory transport of `transport_class`: the protocol and the transport."""
    address = IPv4Address("TCP", peer, 40000)
    proto = factory.buildProtocol(address)
    assert proto is not None
    transport = transport_class(peerAddress=address)
    proto.makeConnection(transport)
    return proto, transport
