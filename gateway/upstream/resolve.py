"""Upstream host names resolved once a minute, not once per login.

Twisted's `HostnameEndpoint` resolves the name on every connection (a
getaddrinfo call in the thread pool: a thread hop of latency and CPU on the
reactor thread), defines a class per call and runs its happy-eyeballs
machinery; for a provider that every device's poll connects to, that was
about 8% of the gateway's CPU per session. Here the addresses of a host are
resolved the same way (the reactor's `nameResolver`, getaddrinfo off the
reactor thread) and remembered for `TTL` seconds: providers' DNS answers live
for minutes (outlook.office365.com, imap.gmail.com: short TTLs, rotating
addresses), and a minute is what caching proxies such as nginx use for the
same trade-off. Concurrent logins to a host whose entry expired share one
lookup. When every address of an entry fails to connect, the entry is
forgotten, so the next login asks the resolver again.

The addresses are tried in the order the resolver gave them (its IPv6/IPv4
preference); the next one starts when the previous fails, or after
`ATTEMPT_DELAY` seconds without an answer (RFC 8305's delay), the first
connection wins and the others are cancelled. The address that answered
moves to the front of the entry, so the next logins try it first.

An IP literal is connected to directly; whether a host is one is decided once
per host name (`ipaddress` raises for a name, which costs more than it seems
when done on every login).
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import implementer

# Seconds a resolved host's addresses are used before asking the resolver again.
TTL = 60.0
# Seconds to wait for one address before also trying the next (RFC 8305 section 5).
ATTEMPT_DELAY = 0.25

# An address to connect to: (IPv6?, the address as text).
Address = tuple[bool, str]


@functools.lru_cache(maxsize=1024)
def ip_literal(host: str) -> Address | None:
    """(IPv6?, host) if `host` is an IP address, None for a name."""
    try:
        parsed = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (parsed.version == 6, host)


@dataclass
class _Entry:
    addresses: list[Address]
    expires: float


@implementer(IResolutionReceiver)
class _Receiver:
    """Collects one lookup's addresses; one object per lookup (not a class per call)."""

    def __init__(self) -> None:
        self.addresses: list[Address] = []
        self.done: Deferred[list[Address]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        if isinstance(address, IPv6Address):
            self.addresses.append((True, address.host))
        elif isinstance(address, IPv4Address):
            self.addresses.append((False, address.host))

    def resolutionComplete(self) -> None:
        # De-duplicated in order: getaddrinfo lists an address once per socket type.
        self.done.callback(list(dict.fromkeys(self.addresses)))


class AddressCache:
    """The addresses of upstream hosts, resolved with `reactor.nameResolver`,
    kept for `ttl` seconds on `reactor`'s clock."""

    def __init__(self, reactor: Any, ttl: float = TTL) -> None:
        self._reactor = reactor
        self._ttl = ttl
        self._entries: dict[str, _Entry] = {}
        self._lookups: dict[str, list[Deferred[list[Address]]]] = {}

    def addresses(self, host: str) -> Deferred[list[Address]]:
        """The addresses of `host` (a name), from the cache or a new lookup.

        Fails with `DNSLookupError` when the name resolves to nothing.
        """
        entry = self._entries.get(host)
        if entry is not None:
            if entry.expires > self._reactor.seconds():
                return succeed(entry.addresses)
            del self._entries[host]
        waiting = self._lookups.get(host)
        answer: Deferred[list[Address]] = Deferred()
        if waiting is not None:
            waiting.append(answer)
            return answer
        self._lookups[host] = [answer]
        receiver = _Receiver()
        receiver.done.addCallbacks(
            self._resolved, self._lookup_failed, callbackArgs=(host,), errbackArgs=(host,)
        )
        try:
            self._reactor.nameResolver.resolveHostName(receiver, host, portNumber=0)
        except Exception:
            self._lookup_failed(Failure(), host)
        return answer

    def prefer(self, host: str, address: Address) -> None:
        """`address` answered: try it first next time."""
        entry = self._entries.get(host)
        if entry is not None and entry.addresses[0] != address and address in entry.addresses:
            entry.addresses = [address] + [a for a in entry.addresses if a != address]

    def forget(self, host: str) -> None:
        """None of `host`'s addresses answered: resolve it again next time."""
        self._entries.pop(host, None)

    def _resolved(self, addresses: list[Address], host: str) -> None:
        waiting = self._lookups.pop(host, [])
        if not addresses:
            for d in waiting:
                d.errback(DNSLookupError(f"no results for hostname lookup: {host}"))
            return
        self._entries[host] = _Entry(addresses, self._reactor.seconds() + self._ttl)
        for d in waiting:
            d.callback(addresses)

    def _lookup_failed(self, failure: Failure, host: str) -> None:
        waiting = self._lookups.pop(host, [])
        error = DNSLookupError(f"Couldn't find the hostname '{host}'")
        for d in waiting:
            d.errback(error)


_caches: WeakKeyDictionary[Any, AddressCache] = WeakKeyDictionary()


def cache_for(reactor: Any) -> AddressCache:
    """The process's cache for `reactor` (the real one, or a test's)."""
    cache = _caches.get(reactor)
    if cache is None:
        cache = _caches[reactor] = AddressCache(reactor)
    return cache


@implementer(IStreamClientEndpoint)
class CachedHostEndpoint:
    """TCP to `host`:`port`, a name resolved through `cache` or an IP literal."""

    def __init__(
        self, reactor: Any, host: str, port: int, timeout: float, cache: AddressCache
    ) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        self._timeout = timeout
        self._cache = cache

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        literal = ip_literal(self._host)
        if literal is not None:
            return self._endpoint(literal).connect(protocolFactory)
        addresses = self._cache.addresses(self._host)
        attempts: list[_Attempts] = []

        def start(found: list[Address]) -> Deferred[IProtocol]:
            attempt = _Attempts(self, found, protocolFactory)
            attempts.append(attempt)
            return attempt.result

        def cancel(d: Deferred[IProtocol]) -> None:
            addresses.cancel()
            for attempt in attempts:
                attempt.result.cancel()

        connected: Deferred[IProtocol] = Deferred(cancel)
        addresses.addCallback(start).chainDeferred(connected)
        return connected

    def _endpoint(self, address: Address) -> IStreamClientEndpoint:
        kind = TCP6ClientEndpoint if address[0] else TCP4ClientEndpoint
        return kind(self._reactor, address[1], self._port, timeout=self._timeout)


class _Attempts:
    """One connection over several addresses: staggered attempts, the first to connect wins."""

    def __init__(
        self, endpoint: CachedHostEndpoint, addresses: list[Address], factory: IProtocolFactory
    ) -> None:
        self._endpoint = endpoint
        self._addresses = list(addresses)
        self._factory = factory
        self._next = 0
        self._pending: dict[Address, Deferred[IProtocol]] = {}
        self._timer: IDelayedCall | None = None
        self._failure: Failure | None = None
        self._done = False
        self.result: Deferred[IProtocol] = Deferred(self._cancel)
        self._start_next()

    def _start_next(self) -> None:
        self._timer = None
        address = self._addresses[self._next]
        self._next += 1
        attempt = self._endpoint._endpoint(address).connect(self._factory)
        self._pending[address] = attempt
        if self._next < len(self._addresses) and not attempt.called:
            self._timer = self._endpoint._reactor.callLater(ATTEMPT_DELAY, self._start_next)
        attempt.addCallbacks(
            self._connected, self._failed, callbackArgs=(address,), errbackArgs=(address,)
        )

    def _connected(self, protocol: IProtocol, address: Address) -> None:
        del self._pending[address]
        self._done = True
        self._stop()
        self._endpoint._cache.prefer(self._endpoint._host, address)
        self.result.callback(protocol)

    def _failed(self, failure: Failure, address: Address) -> None:
        self._pending.pop(address, None)
        if self._done:
            return
        if self._failure is None:
            self._failure = failure
        if self._next < len(self._addresses):
            if self._timer is not None:
                self._timer.cancel()
            self._start_next()
        elif not self._pending:
            self._done = True
            self._stop()
            self._endpoint._cache.forget(self._endpoint._host)
            self.result.errback(self._failure)

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        for attempt in pending.values():
            attempt.cancel()

    def _cancel(self, d: Deferred[IProtocol]) -> None:
        # The Deferred fails with CancelledError once this returns.
        self._done = True
        self._stop()


def cached_endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """The default `EndpointFactory`: `CachedHostEndpoint` with the reactor's cache."""
    return CachedHostEndpoint(reactor, host, port, timeout, cache_for(reactor))


__all__ = [
    "ATTEMPT_DELAY",
    "TTL",
    "AddressCache",
    "CachedHostEndpoint",
    "cache_for",
    "cached_endpoint",
    "ip_literal",
]
