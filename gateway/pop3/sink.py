"""Where a maildrop streams one message to a POP3 device."""

from __future__ import annotations

from twisted.internet.interfaces import IConsumer, IProducer
from zope.interface import implementer

from gateway.command_queue import IDeviceTransport


@implementer(IConsumer)
class MessageSink:
    """Where a maildrop streams one message: the device transport, plus the
    status line sent just before the first byte, byte counting, and the
    guarantee that the terminating "." starts a line of its own."""

    def __init__(self, transport: IDeviceTransport, flow: IConsumer) -> None:
        self._transport = transport
        self._flow = flow
        self.started = False
        self.octets = 0
        self._tail = b"\r\n"

    def _start(self) -> None:
        if not self.started:
            self.started = True
            self._transport.write(b"+OK message follows\r\n")

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._start()
        self.octets += len(data)
        self._tail = (self._tail + data)[-2:] if len(data) < 2 else data[-2:]
        self._transport.write(data)

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self._flow.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._flow.unregisterProducer()

    def finish(self) -> None:
        self._start()
        self._transport.write(b".\r\n" if self._tail == b"\r\n" else b"\r\n.\r\n")
