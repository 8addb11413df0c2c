"""A Graph message's MIME content (`$value`) in POP3 wire form, chunk by chunk.

POP3 sends lines ending in CRLF (RFC 1939 3). The content Graph returns is
expected to use CRLF already (it is what Exchange would send over SMTP), but
that is not documented, so a bare LF is turned into CRLF here, in RETR, TOP
and the size count alike: the count is of exactly what RETR sends, before
dot-stuffing, including the CRLF the stuffer adds to a message that does not
end with one (`DotStuffer.close`).
"""

from __future__ import annotations

from gateway.dotstuff import DotStuffer


class CRLFLines:
    """Turns bare LF into CRLF across chunk boundaries; CRLF and lone CR stay."""

    def __init__(self) -> None:
        self._after_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        out = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if self._after_cr and chunk[:1] == b"\n":
            out = out[1:]  # the CR came at the end of the previous chunk
        self._after_cr = chunk[-1:] == b"\r"
        return out


class WireCounter:
    """Counts the octets RETR will send for a message (its exact POP3 size)."""

    def __init__(self) -> None:
        self._lines = CRLFLines()
        self.octets = 0
        self._last = b""

    def feed(self, chunk: bytes) -> bool:
        out = self._lines.feed(chunk)
        if out:
            self.octets += len(out)
            self._last = (self._last + out)[-2:]
        return True

    def total(self) -> int:
        # What DotStuffer.close() adds depends on the last two octets only.
        stuffer = DotStuffer()
        stuffer.feed(self._last)
        return self.octets + len(stuffer.close())
