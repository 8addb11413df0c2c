"""IMAP4rev1 responses: bytes in, events out (RFC 3501), and their tokenizer.

Pure: no sockets, clocks or Twisted. Literals that carry message data
(`BODY[...]`) are streamed in whatever chunks arrive, so memory stays bounded
by one network read however large the message is; small literals (a
Message-ID header, a folder name) are collected into their response, up to a
limit. The caller says, per event, whether body literals are to be streamed,
since only the command at the head of its queue knows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeAlias

from gateway.upstream.errors import printable

# One response line (between literals). `* SEARCH` answers list every match
# on one line: 1 MiB holds about 140,000 UIDs.
MAX_LINE = 1024 * 1024
# A literal that is collected rather than streamed (headers asked for by
# name, folder names). Message bodies are always streamed.
MAX_INLINE_LITERAL = 1024 * 1024
# Everything one response may hold in memory: its lines plus inline literals.
MAX_RESPONSE = 8 * 1024 * 1024


class IMAPProtocolError(Exception):
    """The upstream sent something that is not an IMAP response."""


class _StreamedLiteral:
    """Stands in a `Response` for a literal that went to a receiver instead."""

    _instance: _StreamedLiteral | None = None

    def __new__(cls) -> _StreamedLiteral:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "STREAMED"


STREAMED = _StreamedLiteral()


@dataclass(frozen=True, slots=True)
class Continuation:
    """A `+ text` line: the server waits for a literal or a SASL response."""

    text: bytes


@dataclass(frozen=True, slots=True)
class Response:
    """One complete tagged or untagged response.

    `segments` is the response's text cut at its literals: every segment but
    the last ends with the `{n}` that announced `literals[i]`. A literal that
    was streamed is `STREAMED` here. `tag` is None for untagged (`*`) ones.
    """

    tag: bytes | None
    segments: tuple[bytes, ...]
    literals: tuple[bytes | _StreamedLiteral, ...] = ()

    @property
    def first_line(self) -> bytes:
        return self.segments[0]

    def words(self, count: int) -> list[bytes]:
        """The first `count` words after the tag, upper-cased (for dispatch)."""
        rest = self.first_line.split(b" ", count + 1)[1 : count + 1]
        return [w.upper() for w in rest]

    def values(self) -> list[Value]:
        """Everything after the tag, tokenised (see `parse_values`)."""
        return parse_values(self)


@dataclass(frozen=True, slots=True)
class LiteralStart:
    """A body literal of `size` octets starts; `line` is the text announcing it."""

    line: bytes
    size: int


@dataclass(frozen=True, slots=True)
class LiteralData:
    """Bytes of the streaming literal; `last` on its final (possibly empty) chunk."""

    data: bytes
    last: bool


Event: TypeAlias = Response | Continuation | LiteralStart | LiteralData

_LITERAL_MARK = re.compile(rb"~?\{(\d{1,12})\}\Z")
# A literal holding message data: `BODY[section]<origin> {n}` (or BINARY).
_BODY_LITERAL = re.compile(rb"(?:BODY|BINARY)\[[^\]]*\](?:<\d+>)? ~?\{\d+\}\Z", re.IGNORECASE)


class ResponseParser:
    """Bytes in, events out; holds at most one response's text and small literals.

    `feed()` stores data; `next_event()` returns one event at a time, so the
    caller can act on each (start TLS, switch the head command) before the
    bytes after it are interpreted. Received bytes are kept as they came:
    while a body literal streams, each event is a slice of one network read,
    handed on without being copied into a buffer first.
    """

    def __init__(
        self,
        *,
        max_line: int = MAX_LINE,
        max_literal: int = MAX_INLINE_LITERAL,
        max_response: int = MAX_RESPONSE,
    ) -> None:
        self._max_line = max_line
        self._max_literal = max_literal
        self._max_response = max_response
        self._buf = b""
        self._pos = 0
        self._scan = 0  # where the search for the next LF resumes
        self._segments: list[bytes] = []
        self._literals: list[bytes | _StreamedLiteral] = []
        self._held = 0  # octets of the current response kept in memory
        # The literal being read: octets still due, streamed or collected.
        self._literal_left: int | None = None
        self._streaming = False
        self._parts: list[bytes] = []

    def feed(self, data: bytes) -> None:
        if self._pos >= len(self._buf):
            self._buf, self._pos, self._scan = data, 0, 0
        else:
            self._buf = self._buf[self._pos :] + data
            self._scan -= self._pos
            self._pos = 0

    @property
    def buffered(self) -> int:
        """Received octets not yet turned into events."""
        return len(self._buf) - self._pos

    @property
    def in_literal(self) -> bool:
        return self._literal_left is not None

    def next_event(self, stream_bodies: bool = False) -> Event | None:
        """The next event, or None until more data arrives.

        With `stream_bodies`, a `BODY[...]` literal announced from here on is
        streamed as `LiteralStart` + `LiteralData` events. Raises
        IMAPProtocolError; the parser is then unusable.
        """
        while True:
            if self._literal_left is not None:
                if self._streaming:
                    return self._stream_literal()
                if not self._collect_literal():
                    return None
                continue
            line = self._next_line()
            if line is None:
                return None
            event = self._line_event(line, stream_bodies)
            if event is not None:
                return event

    def _next_line(self) -> bytes | None:
        end = self._buf.find(b"\n", max(self._pos, self._scan))
        if end < 0:
            if len(self._buf) - self._pos > self._max_line:
                raise IMAPProtocolError(f"response line longer than {self._max_line} octets")
            self._scan = len(self._buf)
            return None
        line = self._buf[self._pos : end]
        self._pos = self._scan = end + 1
        if len(line) > self._max_line:
            raise IMAPProtocolError(f"response line longer than {self._max_line} octets")
        return line[:-1] if line.endswith(b"\r") else line

    def _line_event(self, line: bytes, stream_bodies: bool) -> Event | None:
        if not self._segments:
            if not line:
                raise IMAPProtocolError("empty response line")
            if line[:1] == b"+":
                return Continuation(line[2:] if line[1:2] == b" " else line[1:])
            if b" " not in line:
                raise IMAPProtocolError(f"not an IMAP response: {printable(line[:80])!r}")
        self._held += len(line)
        self._check_held()
        self._segments.append(line)
        mark = _LITERAL_MARK.search(line)
        if mark is None:
            return self._finish_response()
        size = int(mark.group(1))
        self._literal_left = size
        if stream_bodies and _BODY_LITERAL.search(line):
            self._streaming = True
            return LiteralStart(line, size)
        if size > self._max_literal:
            raise IMAPProtocolError(
                f"literal of {size} octets where at most {self._max_literal} were expected"
            )
        self._held += size
        self._check_held()
        self._streaming = False
        self._parts = []
        return None

    def _check_held(self) -> None:
        if self._held > self._max_response:
            raise IMAPProtocolError(f"response larger than {self._max_response} octets")

    def _take(self, wanted: int) -> bytes:
        available = len(self._buf) - self._pos
        if wanted >= available:
            if self._pos == 0:
                data = self._buf
            else:
                data = self._buf[self._pos :]
            self._buf, self._pos, self._scan = b"", 0, 0
            return data
        data = self._buf[self._pos : self._pos + wanted]
        self._pos += wanted
        self._scan = max(self._scan, self._pos)
        return data

    def _stream_literal(self) -> LiteralData | None:
        assert self._literal_left is not None
        if self._literal_left == 0:
            data = b""
        else:
            if self._pos >= len(self._buf):
                return None
            data = self._take(self._literal_left)
            self._literal_left -= len(data)
        if self._literal_left:
            return LiteralData(data, False)
        self._literal_left = None
        self._streaming = False
        self._literals.append(STREAMED)
        return LiteralData(data, True)

    def _collect_literal(self) -> bool:
        """Gather an inline literal; True once it is complete."""
        assert self._literal_left is not None
        if self._literal_left:
            if self._pos >= len(self._buf):
                return False
            data = self._take(self._literal_left)
            self._parts.append(data)
            self._literal_left -= len(data)
            if self._literal_left:
                return False
        self._literals.append(b"".join(self._parts))
        self._parts = []
        self._literal_left = None
        return True

    def _finish_response(self) -> Response:
        segments, literals = tuple(self._segments), tuple(self._literals)
        self._segments, self._literals, self._held = [], [], 0
        head = segments[0].split(b" ", 1)[0]
        return Response(None if head == b"*" else head, segments, literals)


# --- Reading responses --------------------------------------------------------------------

# Atoms are str (ASCII), strings (quoted or literal) bytes, NIL None,
# parenthesised lists Python lists.
Value: TypeAlias = "str | bytes | list[Value] | _StreamedLiteral | None"

_TOKEN = re.compile(
    rb" *(?:(?P<open>\()|(?P<close>\))"
    rb'|"(?P<quoted>(?:[^"\\]|\\.)*)"'
    rb"|(?P<literal>~?\{\d+\}\Z)"
    # An atom may carry a bracketed section with spaces: BODY[HEADER.FIELDS (A B)]<0>
    rb'|(?P<atom>(?:[^\s()"\[\]{]|\[[^\]]*\])+))',
    re.DOTALL,
)
_UNQUOTE = re.compile(rb"\\(.)", re.DOTALL)


def parse_values(response: Response) -> list[Value]:
    """Tokenise everything after the tag into atoms, strings, NIL and lists."""
    root: list[Value] = []
    stack: list[list[Value]] = [root]
    first = response.segments[0]
    start = first.find(b" ") + 1
    for index, segment in enumerate(response.segments):
        pos = start if index == 0 else 0
        while pos < len(segment):
            match = _TOKEN.match(segment, pos)
            if match is None or match.end() == pos:
                if segment[pos:].strip(b" ") == b"":
                    break
                raise IMAPProtocolError(f"cannot read {printable(segment[pos : pos + 40])!r}")
            pos = match.end()
            kind = match.lastgroup
            if kind == "open":
                new: list[Value] = []
                stack[-1].append(new)
                stack.append(new)
            elif kind == "close":
                if len(stack) == 1:
                    raise IMAPProtocolError("unbalanced ')' in a response")
                stack.pop()
            elif kind == "quoted":
                stack[-1].append(_UNQUOTE.sub(rb"\1", match.group("quoted")))
            elif kind == "literal":
                if index >= len(response.literals):
                    raise IMAPProtocolError("literal marker without a literal")
                stack[-1].append(response.literals[index])
            else:
                atom = match.group("atom").decode("latin-1")
                stack[-1].append(None if atom.upper() == "NIL" else atom)
    if len(stack) != 1:
        raise IMAPProtocolError("unbalanced '(' in a response")
    return root
