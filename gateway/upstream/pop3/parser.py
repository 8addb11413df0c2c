"""POP3 responses: bytes in, events out (RFC 1939, RFC 2449 codes, RFC 5034 SASL).

Pure: no sockets, clocks or Twisted. The caller tells the parser what the
response at the head of its queue may be (`Expect`), since only the command
decides whether a `+OK` starts a multi-line body.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TypeAlias

from gateway.upstream.errors import printable

# A status or continuation line longer than this is not POP3 (RFC 2449 allows
# 512 octets; SASL challenges are longer but nowhere near this).
MAX_LINE = 64 * 1024

TERMINATOR = b"\r\n.\r\n"
# The most bytes held back at the end of a chunk: one short of a whole
# terminator. Only bytes that may begin one are held (usually none), so a
# chunk usually goes on as the very object that was received.
_HOLD = len(TERMINATOR) - 1


class Expect(enum.Enum):
    """What the response to the command at the head of the queue may be."""

    SINGLE = "single"  # one status line
    MULTI = "multi"  # a status line; after +OK, a dot-terminated body
    SASL = "sasl"  # "+ challenge" continuations, then one status line


@dataclass(frozen=True, slots=True)
class Status:
    """A `+OK`/`-ERR` line; `code` is the RFC 2449 response code, upper-cased."""

    ok: bool
    code: str | None
    text: bytes

    def describe(self) -> str:
        """The line as it may appear in a log `detail` (upstream words, bounded)."""
        word = "+OK" if self.ok else "-ERR"
        code = f" [{self.code}]" if self.code else ""
        text = printable(self.text)
        return f"{word}{code} {text}".rstrip()


@dataclass(frozen=True, slots=True)
class Continuation:
    """A SASL `+ <base64>` line; `payload` is still base64."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class BodyChunk:
    """Bytes of a multi-line body in wire form; `last` when the terminator was seen.

    The concatenated chunks of one body are exactly the dot-stuffed lines with
    their CRLFs, without the final ".CRLF".
    """

    data: bytes
    last: bool


Event: TypeAlias = Status | Continuation | BodyChunk


class POP3ProtocolError(Exception):
    """The upstream sent something that is not a POP3 response."""


_CODE_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-/")


def parse_status(line: bytes) -> Status | None:
    """Parse one status line (without CRLF); None if it is not one."""
    if line.startswith(b"+OK") and (len(line) == 3 or line[3:4] == b" "):
        ok, rest = True, line[4:]
    elif line.startswith(b"-ERR") and (len(line) == 4 or line[4:5] == b" "):
        ok, rest = False, line[5:]
    else:
        return None
    code = None
    if rest.startswith(b"["):
        end = rest.find(b"]")
        if end > 1 and all(c in _CODE_CHARS for c in rest[1:end]):
            code = rest[1:end].decode("ascii").upper()
            rest = rest[end + 1 :].lstrip(b" ")
    return Status(ok, code, rest)


class ResponseParser:
    """Bytes in, events out; holds at most a partial line or 4 body bytes.

    `feed()` stores data; `next_event()` returns one event at a time so the
    caller can act on each response (send the next command, start TLS, queue
    a new expectation) before the bytes after it are interpreted. Bytes that
    follow a complete response wait here for the next expectation.

    Multi-line bodies are not split into lines: each `next_event()` in a body
    looks for the terminator in the new chunk (`_find_terminator`, and
    across the seam with the few held bytes) and passes everything on but a
    tail that may begin a terminator, so throughput does not depend on line
    lengths and a line of megabytes passes like any other. A chunk is not
    copied unless bytes were held before it or are held after it.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._max_line = max_line
        self._buf = b""
        self._in_body = False
        self._held = b""
        # Bytes of `_held` that were never received: the body starts at the
        # beginning of a line, so the parser pretends a CRLF preceded it and
        # the empty body "+OK\r\n.\r\n" is the terminator like any other.
        self._virtual = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Received bytes not yet turned into events (excluding held body bytes)."""
        return len(self._buf)

    @property
    def in_body(self) -> bool:
        return self._in_body

    def next_event(self, expect: Expect | None) -> Event | None:
        """The next event, or None until more data (or an expectation) arrives.

        Raises POP3ProtocolError; the parser is then unusable.
        """
        if self._in_body:
            return self._body_event()
        if expect is None:
            if len(self._buf) > self._max_line:
                raise POP3ProtocolError("unsolicited data from the server")
            return None
        end = self._buf.find(b"\n")
        if end < 0:
            if len(self._buf) > self._max_line:
                raise POP3ProtocolError(f"response line longer than {self._max_line} octets")
            return None
        line = self._buf[:end]
        self._buf = self._buf[end + 1 :]
        if line.endswith(b"\r"):
            line = line[:-1]
        status = parse_status(line)
        if status is not None:
            if status.ok and expect is Expect.MULTI:
                self._in_body = True
                self._held = b"\r\n"
                self._virtual = 2
            return status
        if expect is Expect.SASL and (line == b"+" or line.startswith(b"+ ")):
            return Continuation(line[2:])
        raise POP3ProtocolError(f"not a POP3 response: {printable(line[:80])!r}")

    def _body_event(self) -> BodyChunk | None:
        buf = self._buf
        if not buf:
            return None
        self._buf = b""
        held = self._held
        h = len(held)
        # Positions below are in (held + buf), which is never built: a
        # terminator that starts in the held bytes ends in the first 4 new ones.
        at = (held + buf[:_HOLD]).find(TERMINATOR) if h else -1
        if at < 0:
            at = _find_terminator(buf)
            if at >= 0:
                at += h
        if at >= 0:
            end = at + 2
            self._buf = buf[at + len(TERMINATOR) - h :]
            self._held = b""
            self._in_body = False
            last = True
        else:
            keep = _partial_terminator(held[-_HOLD:] + buf[-_HOLD:] if h else buf[-_HOLD:])
            end = h + len(buf) - keep
            self._held = _span(held, buf, end, h + len(buf))
            last = False
        start = min(self._virtual, end)
        self._virtual -= start
        if start == end and not last:
            return None
        return BodyChunk(_span(held, buf, start, end), last)


# Dots `_find_terminator` checks one by one before it counts how dense they are.
_DOTS_FREE = 32


def _find_terminator(buf: bytes) -> int:
    """`buf.find(TERMINATOR)`, about five times faster where dots are sparse.

    `bytes.find` of a five-byte needle scans at about 2 GB/s, the largest
    cost of relaying a body once TLS is paid. A terminator has a dot in the
    middle, and a single byte is found with `memchr` at many times that
    speed; base64 (most of a large message) has no dots at all. Each dot
    found costs a Python loop turn, so once dots come more often than one
    per KiB (text; a few dozen are let through first, as stuffed lines
    come in pairs of dots), the rest of `buf` goes to `bytes.find`.
    """
    seen = 0
    dot = buf.find(b".")
    while dot >= 0:
        if dot >= 2 and buf.startswith(TERMINATOR, dot - 2):
            return dot - 2
        seen += 1
        if seen > _DOTS_FREE + (dot >> 10):
            # Every dot up to here was checked: a terminator still to find
            # has its dot further on, so it starts after dot - 2.
            return buf.find(TERMINATOR, max(dot - 1, 0))
        dot = buf.find(b".", dot + 1)
    return -1


def _partial_terminator(tail: bytes) -> int:
    """How many bytes at the end of `tail` may begin a terminator (0 to 4)."""
    for n in range(_HOLD, 0, -1):
        if tail.endswith(TERMINATOR[:n]):
            return n
    return 0


def _span(held: bytes, buf: bytes, start: int, end: int) -> bytes:
    """(held + buf)[start:end], copying only when it spans both; usually `buf` itself."""
    h = len(held)
    if start >= h:
        return buf[start - h : end - h]
    if end <= h:
        return held[start:end]
    return held[start:] + buf[: end - h]


@dataclass(frozen=True)
class Capabilities:
    """The server's CAPA answer (RFC 2449); empty if it does not know CAPA."""

    names: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def parse(cls, body: bytes) -> Capabilities:
        names: dict[str, tuple[str, ...]] = {}
        for raw in body.split(b"\r\n"):
            words = raw.decode("ascii", "replace").split()
            if words:
                names[words[0].upper()] = tuple(words[1:])
        return cls(names)

    def __contains__(self, name: str) -> bool:
        return name.upper() in self.names

    @property
    def sasl(self) -> frozenset[str]:
        return frozenset(m.upper() for m in self.names.get("SASL", ()))


class ServerError(Exception):
    """The upstream answered a command with -ERR; callers map it by context."""

    def __init__(self, verb: str, status: Status) -> None:
        super().__init__(f"{verb}: {status.describe()}")
        self.verb = verb
        self.status = status
