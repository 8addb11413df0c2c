"""Writing an IMAP message, or its TOP, to the device in POP3 wire form.

The IMAP client streams `BODY[]` literals to a receiver; these receivers
dot-stuff what they get (`gateway.dotstuff`) and, for TOP, cut it after the
header and n body lines, so the device sees what an upstream POP3 would send.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from gateway.dotstuff import DotStuffer
from gateway.upstream.imap import IMAPProtocolError

if TYPE_CHECKING:
    from twisted.internet.interfaces import IConsumer

_BODY_ITEM = re.compile(rb"((?:BODY|BINARY)\[[^\]]*\](?:<\d+>)?) ~?\{\d+\}\Z", re.IGNORECASE)


def _item(line: bytes, peer: str) -> bytes:
    match = _BODY_ITEM.search(line)
    if match is None:
        raise IMAPProtocolError(f"{peer} sent a literal that is not message data")
    return match.group(1).upper()


class MessageWriter:
    """Receives `BODY[]` and writes it to the device in POP3 wire form."""

    def __init__(self, sink: IConsumer, peer: str) -> None:
        self.consumer = sink
        self._peer = peer
        self._stuffer = DotStuffer()
        self.size: int | None = None

    def body_start(self, line: bytes, size: int) -> None:
        if self.size is not None or _item(line, self._peer) != b"BODY[]":
            raise IMAPProtocolError(f"{self._peer} sent message data that was not asked for")
        self.size = size

    def body_data(self, data: bytes) -> None:
        self.consumer.write(self._stuffer.feed(data))

    def body_end(self) -> None:
        pass

    def finish(self) -> None:
        tail = self._stuffer.close()
        if tail:
            self.consumer.write(tail)


class TopWriter:
    """Receives prefixes `BODY[]<offset>` and writes the header plus `lines` body lines.

    The header ends at the first empty line; a message without one is all
    header, as in POP3. Line ends are found with `bytes.find`/`count` on
    whole chunks, never byte by byte.
    """

    def __init__(self, sink: IConsumer, lines: int, peer: str) -> None:
        self.consumer = sink
        self._peer = peer
        self._stuffer = DotStuffer()
        self._lines_left = lines
        self._in_header = True
        # The message starts at the beginning of a line: an empty first line
        # ends an empty header, so pretend a CRLF came before it.
        self._tail = b"\r\n"
        self.done = False
        self.offset = 0  # message octets received so far
        self.got: int | None = None  # size of the last literal

    def body_start(self, line: bytes, size: int) -> None:
        if self.got is not None or _item(line, self._peer) != b"BODY[]<%d>" % self.offset:
            raise IMAPProtocolError(f"{self._peer} sent message data that was not asked for")
        self.got = size

    def body_data(self, data: bytes) -> None:
        self.offset += len(data)
        if self.done:
            return
        out = self._cut(data)
        if out:
            self.consumer.write(self._stuffer.feed(out))

    def body_end(self) -> None:
        pass

    def _cut(self, data: bytes) -> bytes:
        if not self._in_header:
            return self._cut_body(data)
        joined = self._tail + data
        at = joined.find(b"\r\n\r\n")
        if at < 0:
            self._tail = joined[-3:]
            return data
        self._in_header = False
        end = at + 4 - len(self._tail)
        return data[:end] + self._cut_body(data[end:])

    def _cut_body(self, data: bytes) -> bytes:
        if self._lines_left == 0:
            self.done = True
            return b""
        count = data.count(b"\n")
        if count < self._lines_left:
            self._lines_left -= count
            return data
        at = -1
        for _ in range(self._lines_left):
            at = data.find(b"\n", at + 1)
        self._lines_left = 0
        self.done = True
        return data[: at + 1]

    def finish(self) -> None:
        tail = self._stuffer.close()
        if tail:
            self.consumer.write(tail)
