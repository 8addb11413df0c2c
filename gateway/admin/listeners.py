"""What the admin side knows about each device listener: bound or not, and how
many connections are open on it.

A `ListenerWatch` puts two thin wrappers on a listener's service (both are
public attributes of `StreamServerEndpointService`): around its endpoint, to
see the port bound or the bind fail, and around its protocol factory, to see
each connection made. The protocols and transports underneath are the same
objects as without it; the servers do not know it is there.
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    ILoggingContext,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer


def _connected(protocol: Protocol) -> bool:
    transport = getattr(protocol, "transport", None)
    if transport is None:
        return False
    return bool(getattr(transport, "connected", False)) and not getattr(
        transport, "disconnected", False
    )


@implementer(IProtocolFactory, ILoggingContext)
class CountingFactory:
    """Hands out the wrapped factory's protocols and remembers them weakly.

    Weakly, so a connection long closed costs nothing here even if nobody
    scrapes; open ones are told apart by their transport's `connected` flag,
    which Twisted clears when the connection is lost.
    """

    def __init__(self, wrapped: IProtocolFactory) -> None:
        self.wrapped = wrapped
        self._built: weakref.WeakSet[Any] = weakref.WeakSet()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = self.wrapped.buildProtocol(addr)
        if protocol is not None:
            self._built.add(protocol)
        return protocol

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def logPrefix(self) -> str:
        # The port's "... starting on PORT" line names the real factory.
        if ILoggingContext.providedBy(self.wrapped):
            prefix: str = ILoggingContext(self.wrapped).logPrefix()
            return prefix
        return type(self.wrapped).__name__

    def open_connections(self) -> int:
        return sum(1 for protocol in list(self._built) if _connected(protocol))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


@implementer(IStreamServerEndpoint)
class RecordingEndpoint:
    """Passes `listen` through and tells the watch how it went."""

    def __init__(self, wrapped: IStreamServerEndpoint, watch: ListenerWatch) -> None:
        self.wrapped = wrapped
        self._watch = watch

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        d = self.wrapped.listen(protocolFactory)
        d.addCallbacks(self._watch.listening, self._watch.failed)
        return d


class ListenerWatch:
    """One device listener as readiness and metrics see it."""

    def __init__(self, service: StreamServerEndpointService, protocol: str) -> None:
        self.name: str = service.name or "unnamed"
        self.protocol = protocol
        self.port: IListeningPort | None = None
        self.error: str | None = None
        self.factory = CountingFactory(service.factory)
        service.factory = self.factory
        service.endpoint = RecordingEndpoint(service.endpoint, self)

    @property
    def bound(self) -> bool:
        return self.port is not None

    def active(self) -> int:
        return self.factory.open_connections()

    def listening(self, port: IListeningPort) -> IListeningPort:
        self.port, self.error = port, None
        return port

    def failed(self, reason: Failure) -> Failure:
        self.port = None
        self.error = reason.getErrorMessage()
        return reason
