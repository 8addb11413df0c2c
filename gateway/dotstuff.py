"""Dot-stuffing of a message streamed in chunks of any size.

POP3 (RFC 1939 RETR/TOP answers) and SMTP (RFC 5321 DATA) frame a message
the same way: a line that starts with "." gets a second "." in front, and a
line holding only "." ends it. The POP3 maildrops, the IMAP maildrop and the
SMTP relay client all send messages through this one `DotStuffer`. The rule must hold
at every byte offset, including a "." that is the first byte of a chunk
right after a chunk that ended a line (the place Twisted's own POP3 server
and SMTP sender get wrong). Work is done with bytes.replace, never a Python
loop per byte, so a gigabit of mail costs little CPU.
"""

from __future__ import annotations


class DotStuffer:
    """Turns message bytes into dot-stuffed wire form (POP3, SMTP), chunk by chunk."""

    def __init__(self) -> None:
        self._at_line_start = True
        self._last = b""

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        out = chunk.replace(b"\n.", b"\n..")
        if self._at_line_start and out[:1] == b".":
            out = b"." + out
        self._at_line_start = chunk[-1:] == b"\n"
        self._last = chunk[-2:] if len(chunk) >= 2 else (self._last + chunk)[-2:]
        return out

    def close(self) -> bytes:
        """What must follow so that the terminating "." starts its own line."""
        if self._last == b"" or self._last.endswith(b"\r\n"):
            return b""
        return b"\n" if self._last.endswith(b"\r") else b"\r\n"


def stuff(message: bytes) -> bytes:
    stuffer = DotStuffer()
    return stuffer.feed(message) + stuffer.close()


def unstuff(wire: bytes) -> bytes:
    """Reverse of `stuff` for a body without its ".CRLF" terminator (tests, tools)."""
    lines = wire.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
