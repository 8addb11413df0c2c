"""Twisted's TLS layer with its per-connection and per-write overhead cut.

Two costs of `twisted.protocols.tls` showed in the profiles of full sessions
and of RETR (issue 14):

- `makeConnection` calls `directlyProvides` once per interface of the TCP
  transport (about nine, each building a new zope.interface declaration),
  and then `ProtocolWrapper.makeConnection` replaces all of them with one
  declaration of every interface anyway. When the wrapped protocol is
  connected at once (`_connectWrapped`, as for every connection here), the
  loop's work is thrown away: it is skipped. About a tenth of a millisecond
  per TLS connection, and a session has two.
- `_write` cuts a write into 16 KiB pieces and, after encrypting each, reads
  the memory BIO (`bio_read(2**15)`) and writes to the socket transport: one
  Python round per TLS record. Here every piece is encrypted first and the
  BIO is then drained in 64 KiB reads into one transport write, so a 256 KiB
  piece of a RETR body costs one pass, not sixteen. And what the BIO gives
  is sent on the socket at once when Twisted has nothing buffered
  (`send_now`), instead of at the reactor's next turn.

Both are overrides of private methods of Twisted 26.10, kept as close to the
originals as the change allows; `tests/unit/test_tls_layer.py` fails if the
originals change, and checks the behaviour over real TLS in memory. STLS and
STARTTLS go through the reactor's `startTLS`, which always builds Twisted's
own class: only implicit TLS (device listeners and upstream connections) uses
this one.
"""

from __future__ import annotations

from typing import Any

from OpenSSL.SSL import Error, WantReadError
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure

# A TLS record carries at most 16 KiB of plaintext.
RECORD = 2**14
# One read of the memory BIO: under glibc's mmap threshold, so the buffer
# pyOpenSSL allocates for it comes from the heap, not from an mmap per read.
DRAIN = 2**16

__all__ = ["DRAIN", "RECORD", "LeanTLSTransport", "lean_tls_factory", "send_now"]


class LeanTLSTransport(BufferingTLSTransport):
    """`BufferingTLSTransport` (what `TLSMemoryBIOFactory` builds), leaner."""

    def makeConnection(self, transport: Any) -> None:
        if not self._connectWrapped:
            super().makeConnection(transport)
            return
        # Twisted's method without the per-interface `directlyProvides` loop:
        # ProtocolWrapper.makeConnection below declares them all at once.
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        ProtocolWrapper.makeConnection(self, transport)
        self._checkHandshakeStatus()

    def _write(self, bytes: bytes) -> None:
        if self._lostTLSConnection:
            return
        view = memoryview(bytes)
        sent_so_far = 0
        while sent_so_far < len(view):
            try:
                sent = self._tlsConnection.send(view[sent_so_far : sent_so_far + RECORD])
            except WantReadError:
                self._flushSendBIO()
                self._bufferedWrite(bytes[sent_so_far:])
                return
            except Error:
                self._flushSendBIO()
                self._tlsShutdownFinished(Failure())
                return
            sent_so_far += sent
        self._flushSendBIO()

    def _flushSendBIO(self) -> None:
        pieces: list[bytes] = []
        while True:
            try:
                piece = self._tlsConnection.bio_read(DRAIN)
            except WantReadError:
                break
            pieces.append(piece)
            if len(piece) < DRAIN:
                break  # a short read emptied the BIO
        if pieces and self.transport is not None:
            send_now(self.transport, pieces[0] if len(pieces) == 1 else b"".join(pieces))


def send_now(transport: Any, data: bytes) -> None:
    """Write `data` to `transport`, handing the socket at once what it takes.

    Twisted's TCP `write` only buffers and asks the reactor to say when the
    socket is writable; the send happens at the next turn, in `doWrite`. A
    proxied session answers about fifteen commands, so that is fifteen more
    reactor events, each with two `epoll_ctl` calls. When nothing is waiting
    in Twisted's buffer (so the order of bytes cannot change), the socket is
    tried first, and only what it does not take goes through `write`, whose
    buffering, back-pressure to producers and error handling stay as they
    are. An error from the socket leaves the data to `write` too, so the
    connection is lost the way Twisted loses it.
    """
    if (
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN: the socket is full; anything else: Twisted reports it
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def lean_tls_factory(
    options: Any, is_client: bool, wrapped: Any, clock: Any = None
) -> TLSMemoryBIOFactory:
    """Twisted's `TLSMemoryBIOFactory` building `LeanTLSTransport`s.

    The protocol is set on the instance rather than in a subclass of the
    factory: Twisted's client connectors hold their factory in reference
    cycles of their own (README, "Garbage"), and those must not hold an
    object of a gateway class.
    """
    factory = TLSMemoryBIOFactory(options, is_client, wrapped, clock=clock)
    factory.protocol = LeanTLSTransport
    return factory
