"""Rewriting the From: header field to the account address, on a streamed message.

Microsoft 365 and Gmail refuse a From: that is not the mailbox (or one it may
send as); a printer configured years ago with "scanner@old-domain" cannot be
changed. With `rewrite_from_header` the gateway keeps the display name and
replaces the address, so the recipient still sees "Scanner 3rd floor".

Only the header section is buffered (up to MAX_HEADER bytes); the body passes
through untouched. A message whose header section is larger than that, or that
has no header/body separator, is passed on unchanged: rewriting is a courtesy
to the upstream's policy, and a message is never broken to apply it.
"""

from __future__ import annotations

import email.utils
import re

MAX_HEADER = 256 * 1024

_FROM = re.compile(rb"^from[ \t]*:", re.IGNORECASE)


class FromRewriter:
    """A stream stage: message bytes in, bytes with the From: field rewritten out."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._buffer = bytearray()
        self._done = False
        self.rewritten = False

    def feed(self, chunk: bytes) -> bytes:
        if self._done:
            return chunk
        self._buffer += chunk
        end = _header_end(self._buffer)
        if end > MAX_HEADER or (end < 0 and len(self._buffer) > MAX_HEADER):
            return self._give_up()
        if end < 0:
            return b""
        self._done = True
        data = bytes(self._buffer)
        self._buffer.clear()
        header, body = data[:end], data[end:]
        new_header = rewrite_from(header, self._address)
        self.rewritten = new_header != header
        return new_header + body

    def close(self) -> bytes:
        """The rest, at the end of the message (a message with no body)."""
        if self._done:
            return b""
        self._done = True
        data = bytes(self._buffer)
        self._buffer.clear()
        if data and _header_end(data + b"\r\n") == len(data):
            # A header section that ends the message without a blank line.
            new = rewrite_from(data, self._address)
            self.rewritten = new != data
            return new
        return data

    def _give_up(self) -> bytes:
        self._done = True
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def _header_end(data: bytes | bytearray) -> int:
    """Offset just after the header section's last line (before the blank line)."""
    if data.startswith(b"\r\n") or data.startswith(b"\n"):
        return 0
    crlf = data.find(b"\r\n\r\n")
    lf = data.find(b"\n\n")
    found = [i + 2 for i in (crlf,) if i >= 0] + [i + 1 for i in (lf,) if i >= 0]
    return min(found) if found else -1


def rewrite_from(header: bytes, address: str) -> bytes:
    """`header` (complete lines) with the From: field's address set to `address`.

    The first From: field is replaced (folded continuation lines included),
    keeping its display name; a header without one gets one at the top.
    """
    lines = header.splitlines(keepends=True)
    newline = b"\r\n" if (lines and lines[0].endswith(b"\r\n")) or not lines else b"\n"
    for i, line in enumerate(lines):
        if not _FROM.match(line):
            continue
        end = i + 1
        while end < len(lines) and lines[end][:1] in (b" ", b"\t"):
            end += 1
        field = b"".join(lines[i:end])
        value = field.split(b":", 1)[1].decode("utf-8", "replace")
        unfolded = " ".join(value.split())
        addresses = email.utils.getaddresses([unfolded])
        name = addresses[0][0] if addresses else ""
        if len(addresses) == 1 and addresses[0][1].lower() == address.lower():
            return header
        new = f"From: {email.utils.formataddr((name, address))}".encode() + newline
        return b"".join([*lines[:i], new, *lines[end:]])
    return f"From: <{address}>".encode() + newline + header
