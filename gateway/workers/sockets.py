"""Listening sockets a worker process inherited from its parent, and their endpoints.

The parent binds each listener once (`bind_listening`) and passes the file
descriptors down; a worker registers them (`inherit`) before it builds its
service tree, and `server_endpoint` then hands a listener's service an
endpoint that adopts the inherited socket instead of binding a new one. In a
process that inherited nothing (one process, the default) it is the plain
TCP endpoint, so that mode behaves as before.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from zope.interface import implementer

# What Twisted's own listenTCP asks for.
BACKLOG = 50


@dataclass(frozen=True)
class InheritedSocket:
    """A listening socket at `address:port`, open as `fd` in this process."""

    address: str
    port: int
    fd: int

    def describe(self) -> str:
        """`ADDRESS,PORT,FD`: how the parent names it on a worker's command line."""
        return f"{self.address},{self.port},{self.fd}"

    @classmethod
    def parse(cls, text: str) -> InheritedSocket:
        address, port, fd = text.rsplit(",", 2)
        return cls(address, int(port), int(fd))

    @property
    def family(self) -> socket.AddressFamily:
        return family_of(self.address)


_inherited: dict[tuple[str, int], InheritedSocket] = {}
# Set in a worker process: it listens only on sockets its parent bound.
_in_worker = False


def inherit(sockets: list[InheritedSocket]) -> None:
    """Use these sockets for the listeners at their addresses (a worker, at start)."""
    global _in_worker
    _in_worker = True
    for each in sockets:
        _inherited[(each.address, each.port)] = each


def inherited() -> list[InheritedSocket]:
    return list(_inherited.values())


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """Listens by adopting an already listening socket (`reactor.adoptStreamPort`).

    The port adopts a duplicate of the descriptor, so stopping the service
    (which closes the port) leaves the inherited one open: a service started
    again adopts it again."""

    def __init__(self, reactor: Any, inherited: InheritedSocket) -> None:
        self._reactor = reactor
        self._socket = inherited

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        try:
            port = self._reactor.adoptStreamPort(
                self._socket.fd, self._socket.family, protocolFactory
            )
        except Exception:
            return fail()
        return succeed(port)


@implementer(IStreamServerEndpoint)
class NotInherited:
    """A listener a worker has no socket for: one added to the file after the
    gateway started (a worker restarted since reads the current file). Binding
    it here would race the other workers for it, unprivileged; it stays
    unbound (the admin listener's /readyz says so) until a restart."""

    def __init__(self, address: str, port: int) -> None:
        self._where = f"{address}:{port}"

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return fail(
            CannotListenError(
                self._where, 0, "added after the gateway started: restart the gateway to listen"
            )
        )


def server_endpoint(reactor: Any, address: str, port: int) -> IStreamServerEndpoint:
    """The endpoint a listener on `address:port` listens with in this process."""
    found = _inherited.get((address, port))
    if found is not None:
        return AdoptedEndpoint(reactor, found)
    if _in_worker:
        return NotInherited(address, port)
    if family_of(address) == socket.AF_INET6:
        return TCP6ServerEndpoint(reactor, port, interface=address)
    return TCP4ServerEndpoint(reactor, port, interface=address)


def bind_listening(address: str, port: int) -> socket.socket:
    """A listening socket bound as `reactor.listenTCP` binds one (the parent).

    Raises OSError (in use, no permission) like binding in the service would."""
    sock = socket.socket(family_of(address), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(BACKLOG)
        # Every worker accepts from it in its own reactor.
        sock.setblocking(False)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock
