"""SMTP replies: bytes in, `Reply` objects out (RFC 5321 4.2, multi-line joined).

Pure: no sockets, clocks or Twisted.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.upstream.errors import printable

# RFC 5321 4.5.3.1.5 allows 512 octets per reply line; EHLO lists and SASL
# challenges are longer in practice but nowhere near this.
MAX_LINE = 64 * 1024
MAX_REPLY_LINES = 1000


@dataclass(frozen=True, slots=True)
class Reply:
    """One (possibly multi-line) server reply; `lines` are the texts after the code."""

    code: int
    lines: tuple[bytes, ...]

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 status code at the start of the text, if there is one."""
        first = self.lines[0].split(b" ", 1)[0] if self.lines else b""
        parts = first.split(b".")
        if len(parts) == 3 and all(p.isdigit() and 0 < len(p) <= 3 for p in parts):
            if parts[0] in (b"2", b"4", b"5"):
                return first.decode()
        return None

    def describe(self, limit: int = 300) -> str:
        """The reply as it may appear in a log line or a bounce (bounded, printable)."""
        text = b" ".join(self.lines)[:limit].decode("utf-8", "replace")
        text = "".join(c if c.isprintable() else "?" for c in text)
        return f"{self.code} {text}".rstrip()

    def keywords(self) -> dict[str, str]:
        """EHLO extensions: keyword (upper case) -> parameters."""
        found: dict[str, str] = {}
        for line in self.lines[1:]:
            word, _, params = line.decode("ascii", "replace").strip().partition(" ")
            if word:
                found[word.upper()] = params.strip()
        return found


class SMTPProtocolError(Exception):
    """The server sent something that is not an SMTP reply."""


class ReplyParser:
    """Bytes in, replies out; holds at most one partial reply."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buffer = b""
        self._lines: list[bytes] = []
        self._code: bytes | None = None
        self._max = max_line

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_reply(self) -> Reply | None:
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self._max:
                    raise SMTPProtocolError(f"reply line longer than {self._max} octets")
                return None
            line = self._buffer[:end].rstrip(b"\r")
            self._buffer = self._buffer[end + 1 :]
            code, sep, text = line[:3], line[3:4], line[4:]
            if len(code) != 3 or not code.isdigit() or sep not in (b" ", b"-", b""):
                raise SMTPProtocolError(f"not an SMTP reply: {printable(line[:80], None)!r}")
            if self._code is not None and code != self._code:
                raise SMTPProtocolError("reply code changed inside a multi-line reply")
            self._code = code
            self._lines.append(text)
            if len(self._lines) > MAX_REPLY_LINES:
                raise SMTPProtocolError("multi-line reply too long")
            if sep != b"-":
                reply = Reply(int(code), tuple(self._lines))
                self._lines = []
                self._code = None
                return reply
