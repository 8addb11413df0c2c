"""A closed session is freed by reference counting alone, in memory.

Each test switches the cycle collector off, runs a session to its end, drops
its own references and checks, through weak references, that the session's
objects are gone: one reference cycle (a callback capturing its owner, a
deadline pointing back at the server) would keep them. The real gateway in
front of real servers is tests/integration/test_session_garbage.py.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from argon2 import PasswordHasher
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from gateway.command_queue import Deadline
from gateway.devices import DeviceAuthenticator
from gateway.limits import ConnectionLimits
from gateway.locks import AccountLocks
from gateway.maildrop.memory import MemoryMaildrop
from gateway.model import Account, Device, Listener, Secret
from gateway.pop3.server import POP3ServerFactory
from gateway.tls import forget_tls_layer
from gateway.upstream.imap.client import IMAPClient
from gateway.upstream.pop3.client import POP3Client
from gateway.upstream.smtp.client import SMTPClient

FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PEER = IPv4Address("TCP", "10.1.2.3", 40000)


@pytest.fixture(autouse=True)
def without_collector() -> Iterator[None]:
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    yield
    if was_enabled:
        gc.enable()


def _run_now(f: Any, *args: Any) -> Any:
    return succeed(f(*args))


def _factory(clock: MemoryReactorClock, limits: ConnectionLimits) -> POP3ServerFactory:
    async def open_maildrop(account: Account) -> MemoryMaildrop:
        return MemoryMaildrop([b"Subject: one\r\n\r\nhello\r\n"])

    device = Device("printer", Secret(FAST_HASHER.hash("printer-pw")), "scanner")
    return POP3ServerFactory(
        listener=Listener("pop3", 995, "implicit"),
        tls_options=None,
        authenticator=DeviceAuthenticator({"printer": device}, run_in_thread=_run_now),
        accounts={"scanner": Account("scanner", "corp", "scanner@example.com")},
        open_maildrop=open_maildrop,
        locks=AccountLocks(),
        clock=clock,
        limits=limits,
    )


@pytest.mark.parametrize("end", ["quit", "drop", "idle timeout", "lifetime"])
def test_closed_pop3_session_is_freed(end: str) -> None:
    clock = MemoryReactorClock()
    limits = ConnectionLimits()
    factory = _factory(clock, limits)
    server = factory.buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    server.makeConnection(transport)
    server.dataReceived(b"USER printer\r\nPASS printer-pw\r\nRETR 1\r\n")
    assert b"+OK maildrop has 1 messages" in transport.value()
    if end == "quit":
        server.dataReceived(b"QUIT\r\n")
    elif end == "idle timeout":
        clock.advance(factory.idle_timeout)
    elif end == "lifetime":
        clock.advance(limits._settings().max_session_lifetime)
    assert end == "drop" or transport.disconnecting or transport.disconnected
    server.connectionLost(Failure(ConnectionDone()))
    gone = [weakref.ref(o) for o in (server, server._queue, server._queue.output, server._slot)]
    del server, transport  # a transport that is not closed yet holds the queue's producer
    assert [ref() for ref in gone] == [None] * len(gone)
    assert limits.total == 0
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("client_class", "greeting"),
    [
        (POP3Client, b"+OK ready\r\n"),
        (IMAPClient, b"* OK ready\r\n"),
        (SMTPClient, b"220 ready\r\n"),
    ],
)
def test_closed_upstream_client_is_freed(client_class: Any, greeting: bytes) -> None:
    clock = MemoryReactorClock()
    client = client_class(clock, 30.0, peer="upstream")
    client.makeConnection(StringTransport())
    client.dataReceived(greeting)
    assert client.greeting().called
    closed = client.when_closed()
    client.connectionLost(Failure(ConnectionDone()))
    assert closed.called and client.ended
    gone = [weakref.ref(client), weakref.ref(client._pipe)]
    del client
    assert [ref() for ref in gone] == [None, None]


def test_a_closed_deadline_forgets_its_callback_and_never_starts() -> None:
    clock = MemoryReactorClock()
    fired: list[str] = []
    deadline = Deadline(clock, 5.0, lambda: fired.append("fired"))
    deadline.start()
    deadline.close()
    deadline.start()
    clock.advance(10.0)
    assert fired == [] and not deadline.armed and clock.getDelayedCalls() == []


def test_starttls_links_come_off_the_transport() -> None:
    class Transport:
        def getHandle(self) -> str:
            return "socket"

    class TLSProtocol:
        def __init__(self, transport: Transport) -> None:
            self.transport = transport

        def getHandle(self) -> str:
            return "tls connection"

        def getPeerCertificate(self) -> None:
            return None

    transport = Transport()
    tls = TLSProtocol(transport)
    # What twisted.internet._newtls.startTLS does to the TCP transport.
    transport.getHandle = tls.getHandle  # type: ignore[method-assign]
    transport.getPeerCertificate = tls.getPeerCertificate  # type: ignore[attr-defined]
    gone = weakref.ref(tls)
    del tls
    forget_tls_layer(transport)
    assert gone() is None
    assert transport.getHandle() == "socket"
    forget_tls_layer(object())  # anything else is left alone
