"""Upstream host names resolved through a short-lived cache, addresses tried in turn.

Everything on a `MemoryReactorClock`: its `connectTCP` records the attempts,
and the test plays the name resolver and each attempt's outcome.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import IResolutionReceiver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent
from twisted.python.failure import Failure

from gateway.maildrop import UpstreamUnavailable
from gateway.model import Endpoint, Provider
from gateway.upstream.connection import hostname_endpoint, open_connection
from gateway.upstream.pop3 import POP3Client
from gateway.upstream.resolve import ATTEMPT_DELAY, TTL, AddressCache, CachedHostEndpoint
from tests.helpers.upstream import failed, pending, succeeded, unhandled_errors

HOST = "pop.example.test"
PORT = 995


@pytest.fixture(autouse=True)
def _no_unhandled_errors() -> Iterator[list[LogEvent]]:
    yield from unhandled_errors()


class Resolver:
    """The reactor's `nameResolver`, answered by the test."""

    def __init__(self) -> None:
        self.lookups: list[tuple[IResolutionReceiver, str]] = []

    def resolveHostName(
        self, receiver: IResolutionReceiver, hostName: str, portNumber: int = 0, **kw: Any
    ) -> IResolutionReceiver:
        receiver.resolutionBegan(None)  # type: ignore[arg-type]
        self.lookups.append((receiver, hostName))
        return receiver

    def answer(self, *addresses: str, index: int = -1) -> None:
        receiver, _ = self.lookups[index]
        for a in addresses:
            kind = IPv6Address if ":" in a else IPv4Address
            receiver.addressResolved(kind("TCP", a, 0))
        receiver.resolutionComplete()


class Reactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.resolver = Resolver()
        self.nameResolver = self.resolver  # type: ignore[assignment]


def endpoint(reactor: Reactor, host: str = HOST, cache: AddressCache | None = None) -> Any:
    return CachedHostEndpoint(reactor, host, PORT, 30.0, cache or AddressCache(reactor))


def attempts(reactor: Reactor) -> list[str]:
    return [host for host, *_ in reactor.tcpClients]


def connect_attempt(reactor: Reactor, index: int) -> Protocol:
    """The attempt `index` connects."""
    _, _, factory, _, _ = reactor.tcpClients[index]
    protocol: Protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    return protocol


def refuse_attempt(reactor: Reactor, index: int) -> None:
    _, _, factory, _, _ = reactor.tcpClients[index]
    factory.clientConnectionFailed(
        reactor.connectors[index], Failure(ConnectionRefusedError("refused"))
    )


def factory() -> Factory:
    return Factory.forProtocol(Protocol)


def test_a_name_is_resolved_once_per_ttl() -> None:
    reactor = Reactor()
    cache = AddressCache(reactor)
    first = endpoint(reactor, cache=cache).connect(factory())
    assert [host for _, host in reactor.resolver.lookups] == [HOST]
    reactor.resolver.answer("192.0.2.7")
    assert attempts(reactor) == ["192.0.2.7"]
    assert reactor.tcpClients[0][1] == PORT
    connect_attempt(reactor, 0)
    succeeded(first)

    reactor.advance(TTL - 1)
    second = endpoint(reactor, cache=cache).connect(factory())
    assert len(reactor.resolver.lookups) == 1  # from the cache
    assert attempts(reactor) == ["192.0.2.7", "192.0.2.7"]
    connect_attempt(reactor, 1)
    succeeded(second)

    reactor.advance(1)
    endpoint(reactor, cache=cache).connect(factory())
    assert len(reactor.resolver.lookups) == 2  # expired: asked again
    assert len(reactor.tcpClients) == 2


def test_concurrent_logins_share_one_lookup() -> None:
    reactor = Reactor()
    cache = AddressCache(reactor)
    connecting = [endpoint(reactor, cache=cache).connect(factory()) for _ in range(3)]
    assert len(reactor.resolver.lookups) == 1
    reactor.resolver.answer("192.0.2.7")
    assert attempts(reactor) == ["192.0.2.7"] * 3
    for i, d in enumerate(connecting):
        connect_attempt(reactor, i)
        succeeded(d)


@pytest.mark.parametrize("literal", ["192.0.2.9", "2001:db8::9"])
def test_an_ip_literal_is_connected_to_without_a_lookup(literal: str) -> None:
    reactor = Reactor()
    d = endpoint(reactor, host=literal).connect(factory())
    assert reactor.resolver.lookups == []
    assert attempts(reactor) == [literal]
    connect_attempt(reactor, 0)
    succeeded(d)


def test_a_name_without_addresses_is_a_lookup_error_and_not_cached() -> None:
    reactor = Reactor()
    cache = AddressCache(reactor)
    d = endpoint(reactor, cache=cache).connect(factory())
    reactor.resolver.answer()
    error = failed(d, DNSLookupError)
    assert str(error) == f"DNS lookup failed: no results for hostname lookup: {HOST}."
    endpoint(reactor, cache=cache).connect(factory())
    assert len(reactor.resolver.lookups) == 2
    assert reactor.tcpClients == []


def test_a_refused_address_moves_on_at_once_and_the_working_one_goes_first() -> None:
    reactor = Reactor()
    cache = AddressCache(reactor)
    d = endpoint(reactor, cache=cache).connect(factory())
    reactor.resolver.answer("2001:db8::1", "192.0.2.1")
    assert attempts(reactor) == ["2001:db8::1"]  # the resolver's order
    refuse_attempt(reactor, 0)
    assert attempts(reactor) == ["2001:db8::1", "192.0.2.1"]
    connect_attempt(reactor, 1)
    succeeded(d)
    assert reactor.getDelayedCalls() == []
    # The next login tries the address that answered first.
    endpoint(reactor, cache=cache).connect(factory())
    assert attempts(reactor)[2] == "192.0.2.1"


def test_a_silent_address_gets_company_after_the_attempt_delay() -> None:
    reactor = Reactor()
    d = endpoint(reactor).connect(factory())
    reactor.resolver.answer("2001:db8::1", "192.0.2.1")
    reactor.advance(ATTEMPT_DELAY - 0.01)
    assert attempts(reactor) == ["2001:db8::1"]
    reactor.advance(0.01)
    assert attempts(reactor) == ["2001:db8::1", "192.0.2.1"]
    connect_attempt(reactor, 1)
    succeeded(d)
    # The first attempt, still connecting, is abandoned.
    assert reactor.connectors[0].stoppedConnecting
    assert reactor.getDelayedCalls() == []


def test_when_every_address_fails_the_first_error_counts_and_the_entry_is_forgotten() -> None:
    reactor = Reactor()
    cache = AddressCache(reactor)
    d = endpoint(reactor, cache=cache).connect(factory())
    reactor.resolver.answer("192.0.2.1", "192.0.2.2")
    refuse_attempt(reactor, 0)
    pending(d)
    refuse_attempt(reactor, 1)
    failed(d, ConnectionRefusedError)
    assert reactor.getDelayedCalls() == []
    endpoint(reactor, cache=cache).connect(factory())
    assert len(reactor.resolver.lookups) == 2


def test_cancelling_during_the_lookup_or_the_attempts() -> None:
    reactor = Reactor()
    cache = AddressCache(reactor)
    d = endpoint(reactor, cache=cache).connect(factory())
    d.cancel()
    failed(d, CancelledError)
    reactor.resolver.answer("192.0.2.1", "192.0.2.2")  # too late: nobody connects
    assert reactor.tcpClients == []

    d = endpoint(reactor, cache=cache).connect(factory())
    assert attempts(reactor) == ["192.0.2.1"]
    d.cancel()
    failed(d, CancelledError)
    assert reactor.connectors[0].stoppedConnecting
    assert reactor.getDelayedCalls() == []
    reactor.advance(ATTEMPT_DELAY)
    assert attempts(reactor) == ["192.0.2.1"]


def test_a_lookup_failure_is_unavailable_with_todays_message() -> None:
    reactor = Reactor()
    provider = Provider("corp", pop3=Endpoint(HOST, PORT, "implicit"))
    d = Deferred.fromCoroutine(
        open_connection(
            provider,
            provider.pop3,  # type: ignore[arg-type]
            POP3Client,
            reactor=reactor,
            endpoint_factory=hostname_endpoint,
            secure=lambda client, mode, tls: Deferred(),
        )
    )
    reactor.resolver.lookups[-1][0].resolutionComplete()
    error = failed(d, UpstreamUnavailable)
    assert error.detail == (
        f"cannot connect to provider corp ({HOST}:{PORT}): "
        f"DNSLookupError: DNS lookup failed: no results for hostname lookup: {HOST}."
    )
    assert reactor.getDelayedCalls() == []
