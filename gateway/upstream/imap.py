"""Our own IMAP4rev1 client for upstream folders: a pure parser plus Twisted glue.

Twisted's `IMAP4Client` is not used: it buffers every literal whole (a 50 MB
message costs hundreds of MB), base64-encodes SASL responses with embedded
newlines (so OAuth tokens fail), fetches with `RFC822` (which sets `\\Seen`)
and may fall back to unverified STARTTLS (see notes/twisted-mail-traps.md).

Three layers, each testable alone, as in `gateway.upstream.pop3`:

- `ResponseParser` turns bytes into events (`Response`, `Continuation`,
  `LiteralStart`, `LiteralData`). Literals that carry message data
  (`BODY[...]`) are streamed in whatever chunks arrive, so memory stays bounded
  by one network read however large the message is; small literals (a
  Message-ID header, a folder name) are collected into their response, up to
  a limit. The caller says, per event, whether body literals are to be
  streamed, since only the command at the head of the queue knows.
- `IMAPClient` is the Twisted protocol: tagged commands (pipelined where the
  caller allows it), an idle timeout on an injected clock, untagged responses
  routed to the command they answer, and back-pressure: while a body literal
  streams to a consumer (the device), a producer registered there pauses the
  upstream socket.
- `connect()`, `login()` and `open_session()` are the session set-up: TLS
  (implicit or STARTTLS, always verified), capabilities, and login as the
  account, every failure mapped to the `MaildropError` the device should see.

Upstream texts only ever reach `detail` (for the log). No command line is ever
echoed into a message or log: LOGIN and AUTHENTICATE carry secrets.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.maildrop import (
    MailboxInUse,
    MaildropError,
    UpstreamLost,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.model import Account, Provider, Secret
from gateway.upstream.connection import (
    EndpointFactory,
    UpstreamLifecycle,
    hostname_endpoint,
    open_connection,
)
from gateway.upstream.credentials import TokenSource, bearer_login, mechanism_for
from gateway.upstream.sasl import SASLMechanism
from gateway.upstream.streaming import StreamingClient

log = Logger()

# One response line (between literals). `* SEARCH` answers list every match
# on one line: 1 MiB holds about 140,000 UIDs.
MAX_LINE = 1024 * 1024
# A literal that is collected rather than streamed (headers asked for by
# name, folder names). Message bodies are always streamed.
MAX_INLINE_LITERAL = 1024 * 1024
# Everything one response may hold in memory: its lines plus inline literals.
MAX_RESPONSE = 8 * 1024 * 1024
# Untagged responses a command collects (when it has no callback of its own).
MAX_COLLECTED = 8 * 1024 * 1024


# --- The parser ------------------------------------------------------------------------


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


def printable(text: bytes, limit: int = 200) -> str:
    """Upstream words made safe for one log line."""
    shown = text[:limit].decode("utf-8", "replace")
    shown = "".join(c if c.isprintable() else "?" for c in shown)
    return shown + ("..." if len(text) > limit else "")


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


@dataclass(frozen=True, slots=True)
class Status:
    """A status response: tagged, or untagged OK/NO/BAD/BYE/PREAUTH.

    `code` is the response code's name, upper-cased (`UIDVALIDITY`,
    `CAPABILITY`, `AUTHENTICATIONFAILED`...), `code_data` what follows it
    inside the brackets.
    """

    tag: bytes | None
    condition: str
    code: str | None
    code_data: bytes
    text: bytes

    @property
    def ok(self) -> bool:
        return self.condition == "OK"

    def describe(self) -> str:
        """The response as it may appear in a log `detail` (upstream words, bounded)."""
        code = f" [{self.code}]" if self.code else ""
        return f"{self.condition}{code} {printable(self.text)}".rstrip()


_STATUS = re.compile(
    rb"(OK|NO|BAD|BYE|PREAUTH)(?: +\[([^\]]*)\])? ?(.*)\Z", re.IGNORECASE | re.DOTALL
)


def parse_status(response: Response) -> Status | None:
    """The status response in `response`, or None if it is a data response."""
    line = response.first_line
    rest = line.split(b" ", 1)[1] if b" " in line else b""
    match = _STATUS.match(rest)
    if match is None:
        return None
    condition = match.group(1).decode("ascii").upper()
    if response.tag is not None and condition not in ("OK", "NO", "BAD"):
        return None
    code = code_data = None
    if match.group(2) is not None:
        name, _, code_data = match.group(2).partition(b" ")
        code = name.decode("ascii", "replace").upper()
    return Status(response.tag, condition, code, code_data or b"", match.group(3))


def parse_fetch(response: Response) -> tuple[int, dict[str, Value]]:
    """`* n FETCH (ITEM value ...)` as (n, {ITEM: value}); item names upper-cased."""
    values = response.values()
    if len(values) != 3 or not isinstance(values[2], list) or not _is_number(values[0]):
        raise IMAPProtocolError("malformed FETCH response")
    items = values[2]
    if len(items) % 2:
        raise IMAPProtocolError("FETCH response with an odd number of items")
    found: dict[str, Value] = {}
    for name, value in zip(items[::2], items[1::2], strict=True):
        if not isinstance(name, str):
            raise IMAPProtocolError("FETCH item name is not an atom")
        found[name.upper()] = value
    return int(values[0]), found  # type: ignore[arg-type]


def parse_search(response: Response) -> list[int]:
    """The numbers of a `* SEARCH n n ...` response."""
    numbers = response.first_line.split()[2:]
    try:
        return [int(n) for n in numbers]
    except ValueError:
        raise IMAPProtocolError("malformed SEARCH response") from None


def _is_number(value: Value) -> bool:
    return isinstance(value, str) and value.isdigit()


def number(value: Value, what: str) -> int:
    """An IMAP number, or IMAPProtocolError naming what was expected."""
    if not _is_number(value):
        raise IMAPProtocolError(f"{what} is not a number")
    return int(value)  # type: ignore[arg-type]


# --- Writing commands --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Literal:
    """An argument sent as a literal: it cannot travel as a quoted string."""

    data: bytes


Argument: TypeAlias = bytes | Literal

_QUOTABLE = re.compile(rb"[\x01-\x09\x0b\x0c\x0e-\x7f]*\Z")


def astring(value: bytes) -> Argument:
    """`value` as a quoted string, or a literal if quoting cannot carry it."""
    if b"\0" in value:
        raise ValueError("NUL cannot be sent in an IMAP string")
    if _QUOTABLE.match(value):
        return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return Literal(value)


def encode_mailbox(name: str) -> bytes:
    """A folder name in IMAP's modified UTF-7 (RFC 3501 section 5.1.3)."""
    out: list[bytes] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            utf16 = "".join(pending).encode("utf-16-be")
            out.append(b"&" + base64.b64encode(utf16).rstrip(b"=").replace(b"/", b",") + b"-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append(b"&-" if char == "&" else char.encode("ascii"))
        else:
            pending.append(char)
    flush()
    return b"".join(out)


def uid_sets(uids: Iterable[int], max_length: int = 1000) -> list[bytes]:
    """Compact UID sets (`1:5,8,10:12`), cut so no command line grows unbounded."""
    ordered = sorted(set(uids))
    sets: list[bytes] = []
    parts: list[bytes] = []
    length = 0
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        part = b"%d" % ordered[i] if i == j else b"%d:%d" % (ordered[i], ordered[j])
        if parts and length + len(part) + 1 > max_length:
            sets.append(b",".join(parts))
            parts, length = [], 0
        parts.append(part)
        length += len(part) + 1
        i = j + 1
    if parts:
        sets.append(b",".join(parts))
    return sets


def _wire_pieces(
    tag: bytes, verb: bytes, args: Sequence[Argument], capabilities: Capabilities
) -> list[bytes]:
    """The command as pieces: the first is sent at once, each next one after a `+`.

    With LITERAL+ (or LITERAL- for up to 4096 octets, RFC 7888) a literal is
    sent inline as `{n+}`; otherwise it waits for the server's continuation.
    """
    pieces: list[bytes] = []
    current = [tag, b" ", verb]
    for arg in args:
        current.append(b" ")
        if isinstance(arg, Literal):
            if "LITERAL+" in capabilities or ("LITERAL-" in capabilities and len(arg.data) <= 4096):
                current += [b"{%d+}\r\n" % len(arg.data), arg.data]
            else:
                current.append(b"{%d}\r\n" % len(arg.data))
                pieces.append(b"".join(current))
                current = [arg.data]
        else:
            current.append(arg)
    current.append(b"\r\n")
    pieces.append(b"".join(current))
    return pieces


# --- Capabilities ---------------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What the server announced (CAPABILITY response or response code)."""

    names: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, words: bytes) -> Capabilities:
        return cls(frozenset(w.upper() for w in words.decode("ascii", "replace").split()))

    def __contains__(self, name: str) -> bool:
        return name.upper() in self.names

    def __bool__(self) -> bool:
        return bool(self.names)

    @property
    def sasl(self) -> frozenset[str]:
        return frozenset(n[5:] for n in self.names if n.startswith("AUTH="))


# --- Errors ---------------------------------------------------------------------------------


class ServerError(Exception):
    """The upstream answered a command with NO or BAD; callers map it by context."""

    def __init__(self, verb: str, status: Status) -> None:
        super().__init__(f"{verb}: {status.describe()}")
        self.verb = verb
        self.status = status


# --- The protocol -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tagged:
    """A completed command: its tagged OK and the untagged responses it collected."""

    status: Status
    untagged: tuple[Response, ...]


class BodyReceiver(TypingProtocol):
    """Takes the body literals of one streaming command (RETR, TOP)."""

    @property
    def consumer(self) -> IConsumer:
        """Where the data ends up: a producer is registered here while it streams."""
        ...

    def body_start(self, line: bytes, size: int) -> None:
        """A literal starts; `line` is the text announcing it. Raise to refuse it."""
        ...

    def body_data(self, data: bytes) -> None: ...

    def body_end(self) -> None: ...


@dataclass(eq=False)
class _Command:
    verb: str  # for messages only: never the arguments
    pieces: list[bytes]  # empty for the greeting, which is not asked for
    deferred: Deferred[Any]
    tag: bytes | None = None
    pipelinable: bool = False
    on_untagged: Callable[[Response], None] | None = None
    receiver: BodyReceiver | None = None
    # SASL: the decoded answer to each challenge, None to cancel.
    on_challenge: Callable[[bytes], bytes | None] | None = None
    # Runs synchronously at the tagged OK, before any byte after it is parsed.
    on_ok: Callable[[], None] | None = None
    untagged: list[Response] = field(default_factory=list)
    collected: int = 0


class IMAPClient(UpstreamLifecycle, StreamingClient, Protocol):
    """One upstream IMAP connection; commands return Deferreds.

    Commands are sent one at a time, except that a `pipelinable` command
    goes out while only pipelinable ones are in flight. Every command has an
    idle timeout: it fails if the upstream sends nothing for `timeout` seconds
    while an answer is due (not while the consumer holds the upstream paused).

    When the connection breaks, times out, or `abort()` is called, every
    pending and later command fails with `UpstreamLost` (after login) or
    `UpstreamUnavailable` (before), so no Deferred is left unfired.
    """

    def __init__(self, clock: IReactorTime, timeout: float, *, peer: str = "upstream") -> None:
        self._clock = clock
        self._timeout = timeout
        self.peer = peer
        self.capabilities = Capabilities()
        self.logged_in = False
        # True when the server has not said what it offers since login.
        self.capabilities_stale = False
        self._parser = ResponseParser()
        self._queue: deque[_Command] = deque()
        self._inflight: deque[_Command] = deque()
        self._next_tag = 1
        self._processing = False
        self._ended: tuple[type[MaildropError], str] | None = None
        self._logging_out = False
        self._bye: Status | None = None
        self._connected = False
        self._lost = False
        self._closed_waiters: list[Deferred[None]] = []
        greeting = _Command("greeting", [], self._new_deferred())
        self._inflight.append(greeting)
        self._greeting = greeting.deferred

    # -- public API

    def greeting(self) -> Deferred[Status]:
        """Fires with the server's untagged OK greeting."""
        return self._greeting

    @property
    def ended(self) -> bool:
        return self._ended is not None

    def command(
        self,
        verb: bytes,
        *args: Argument,
        pipelinable: bool = False,
        on_untagged: Callable[[Response], None] | None = None,
        receiver: BodyReceiver | None = None,
    ) -> Deferred[Tagged]:
        """Send one command; fires with `Tagged` on OK.

        Untagged responses that arrive while this command is at the head go
        to `on_untagged`, or are collected in `Tagged.untagged`. Body
        literals stream to `receiver`. Fails with `ServerError` on NO/BAD and
        with a `MaildropError` if the connection ends first.
        """
        cmd = _Command(
            verb.decode("ascii").upper(),
            [],
            self._new_deferred(),
            pipelinable=pipelinable and not any(isinstance(a, Literal) for a in args),
            on_untagged=on_untagged,
            receiver=receiver,
        )
        return self._enqueue(cmd, verb, args)

    async def capability(self) -> Capabilities:
        """CAPABILITY; the answer replaces what was known."""
        await self.command(b"CAPABILITY")
        return self.capabilities

    def starttls(self, options: IOpenSSLClientConnectionCreator) -> Deferred[Tagged]:
        """STARTTLS, then TLS on this connection (RFC 3501 6.2.1).

        TLS starts synchronously at the OK: any byte that arrived with or
        after that answer in clear could only be injected by a man in the
        middle, so it ends the session instead of being read as a response.
        """

        def start() -> None:
            if self._parser.buffered:
                self._end(UpstreamUnavailable, f"{self.peer} sent data after the STARTTLS answer")
                return
            self.capabilities = Capabilities()
            self.transport.startTLS(options)  # type: ignore[union-attr]

        cmd = _Command("STARTTLS", [], self._new_deferred(), on_ok=start)
        return self._enqueue(cmd, b"STARTTLS", ())

    def authenticate(self, mechanism: SASLMechanism) -> Deferred[Tagged]:
        """AUTHENTICATE with a SASL mechanism, answering its challenges.

        The initial response rides on the command with SASL-IR (RFC 4959),
        else it answers the server's first, empty challenge. Responses are
        base64 without line breaks, whatever their length.
        """
        args: list[Argument] = [mechanism.name.encode("ascii")]
        pending: list[bytes] = []
        initial = mechanism.initial_response()
        if initial is not None:
            if "SASL-IR" in self.capabilities:
                args.append(base64.b64encode(initial) or b"=")
            else:
                pending.append(initial)

        def answer(challenge: bytes) -> bytes | None:
            if pending and challenge == b"":
                return pending.pop()
            pending.clear()
            return mechanism.respond(challenge)

        cmd = _Command("AUTHENTICATE", [], self._new_deferred(), on_challenge=answer)
        return self._enqueue(cmd, b"AUTHENTICATE", args)

    def login(self, username: str, password: Secret) -> Deferred[Tagged]:
        """LOGIN (RFC 3501 6.2.3); the password travels only in this command."""
        try:
            args = [astring(username.encode()), astring(password.reveal().encode())]
        except ValueError:
            return fail(ValueError("the user name or password cannot be sent with LOGIN"))
        return self.command(b"LOGIN", *args)

    def logout(self) -> Deferred[Tagged]:
        """LOGOUT; the server's BYE and the close that follow are expected.

        Nothing can be queued after it. LOGOUT never expunges (CLOSE would).
        """

        def close() -> None:
            if self.transport is not None:
                self.transport.loseConnection()

        cmd = _Command("LOGOUT", [], self._new_deferred(), pipelinable=True, on_ok=close)
        d = self._enqueue(cmd, b"LOGOUT", ())
        self._logging_out = True
        return d

    def abort(self, detail: str = "aborted by the gateway") -> None:
        """Drop the connection now, without LOGOUT; fail whatever is pending. Idempotent."""
        self._end(UpstreamLost if self.logged_in else UpstreamUnavailable, detail)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        what = self._connection_gone(reason, quiet_close=not self._inflight and not self._queue)
        if self._ended is None:
            if self._bye is not None and not reason.check(SSL.Error, VerificationError):
                what = f"{self.peer} said {self._bye.describe()} and closed the connection"
            self._end(
                UpstreamLost if self.logged_in else UpstreamUnavailable,
                f"{what}{self._waiting_for()}",
                abort_transport=False,
            )
        self._notify_closed()

    # -- internals

    def _new_deferred(self) -> Deferred[Any]:
        # Cancelling any pending command abandons the whole session: the
        # server will still answer it, and nothing can be read after that.
        return Deferred(lambda d: self.abort("a pending command was cancelled"))

    def _enqueue(self, cmd: _Command, verb: bytes, args: Sequence[Argument]) -> Deferred[Any]:
        if self._ended is not None:
            cls, detail = self._ended
            return fail(cls(detail))
        if self._logging_out:
            return fail(UpstreamLost(f"the session with {self.peer} is ending (LOGOUT sent)"))
        cmd.tag = b"g%d" % self._next_tag
        self._next_tag += 1
        cmd.pieces = _wire_pieces(cmd.tag, verb, args, self.capabilities)
        self._queue.append(cmd)
        self._send_queued()
        return cmd.deferred

    def _send_queued(self) -> None:
        while self._queue and self._connected and self._ended is None:
            nxt = self._queue[0]
            if self._inflight and not (
                nxt.pipelinable and all(c.pipelinable for c in self._inflight)
            ):
                return
            self._queue.popleft()
            self._inflight.append(nxt)
            self._send(nxt.pieces.pop(0))
            self._arm_timer()

    def _send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while self._ended is None:
                head = self._inflight[0] if self._inflight else None
                stream = head is not None and head.receiver is not None
                try:
                    event = self._parser.next_event(stream)
                    if event is None:
                        return
                    self._handle(event)
                except IMAPProtocolError as e:
                    self._end(
                        UpstreamLost if self.logged_in else UpstreamUnavailable,
                        f"{self.peer}: {e}{self._waiting_for()}",
                    )
                    return
        finally:
            self._processing = False

    def _handle(self, event: Event) -> None:
        head = self._inflight[0] if self._inflight else None
        if isinstance(event, LiteralData):
            assert head is not None and head.receiver is not None
            if event.data:
                head.receiver.body_data(event.data)
            if event.last:
                head.receiver.body_end()
                self._stop_stream(resume=True)
        elif isinstance(event, LiteralStart):
            assert head is not None and head.receiver is not None
            self._start_stream(head.receiver.consumer)
            head.receiver.body_start(event.line, event.size)
        elif isinstance(event, Continuation):
            self._continue(head, event)
        elif head is not None and head.verb == "greeting":
            self._greeted(head, event)
        elif event.tag is None:
            self._untagged(head, event)
        else:
            self._tagged(event)

    def _greeted(self, head: _Command, response: Response) -> None:
        status = parse_status(response)
        if status is None or response.tag is not None or status.condition not in ("OK", "BYE"):
            raise IMAPProtocolError(f"not an IMAP greeting: {printable(response.first_line)!r}")
        self._inflight.popleft()
        if status.code == "CAPABILITY":
            self.capabilities = Capabilities.parse(status.code_data)
        if status.condition == "OK":
            head.deferred.callback(status)
        else:
            self._bye = status
            head.deferred.errback(Failure(ServerError("greeting", status)))
        self._send_queued()
        self._arm_timer()

    def _continue(self, head: _Command | None, event: Continuation) -> None:
        if head is None or head.tag is None:
            raise IMAPProtocolError("continuation request while no command waits for one")
        if head.pieces:
            self._send(head.pieces.pop(0))
            return
        if head.on_challenge is None:
            raise IMAPProtocolError(f"unexpected continuation request during {head.verb}")
        try:
            challenge = base64.b64decode(event.text, validate=True)
        except (binascii.Error, ValueError):
            response = None
        else:
            response = head.on_challenge(challenge)
        self._send(b"*\r\n" if response is None else base64.b64encode(response) + b"\r\n")

    def _untagged(self, head: _Command | None, response: Response) -> None:
        words = response.words(1)
        kind = words[0] if words else b""
        if kind == b"BYE":
            self._bye = parse_status(response)
            return
        if kind == b"CAPABILITY":
            parts = response.first_line.split(b" ", 2)
            self.capabilities = Capabilities.parse(parts[2] if len(parts) > 2 else b"")
        elif kind == b"OK":
            status = parse_status(response)
            if status is not None and status.code == "CAPABILITY":
                self.capabilities = Capabilities.parse(status.code_data)
        if head is None or head.tag is None:
            return  # unsolicited (EXISTS, EXPUNGE, FETCH FLAGS): nothing here needs it
        if head.on_untagged is not None:
            head.on_untagged(response)
            return
        head.collected += sum(map(len, response.segments)) + sum(
            len(x) for x in response.literals if isinstance(x, bytes)
        )
        if head.collected > MAX_COLLECTED:
            raise IMAPProtocolError(f"{head.verb} answer larger than {MAX_COLLECTED} octets")
        head.untagged.append(response)

    def _tagged(self, response: Response) -> None:
        cmd = next((c for c in self._inflight if c.tag == response.tag), None)
        if cmd is None:
            raise IMAPProtocolError(
                f"tagged response for an unknown tag {printable(response.tag or b'')!r}"
            )
        status = parse_status(response)
        if status is None:
            raise IMAPProtocolError(f"malformed tagged response to {cmd.verb}")
        if status.code == "CAPABILITY":
            self.capabilities = Capabilities.parse(status.code_data)
        if status.ok and cmd.on_ok is not None:
            cmd.on_ok()
            if self._ended is not None:
                return
        self._inflight.remove(cmd)
        self._send_queued()
        self._arm_timer()
        if status.ok:
            cmd.deferred.callback(Tagged(status, tuple(cmd.untagged)))
        else:
            cmd.deferred.errback(Failure(ServerError(cmd.verb, status)))

    def _end(self, cls: type[MaildropError], detail: str, *, abort_transport: bool = True) -> None:
        """End the session once: fail everything pending, drop the connection."""
        if self._ended is not None:
            if abort_transport and self._connected and self.transport is not None:
                self.transport.abortConnection()
            return
        self._ended = (cls, detail)
        self._cancel_timer()
        self._stop_stream(resume=False)
        pending = list(self._inflight) + list(self._queue)
        self._inflight.clear()
        self._queue.clear()
        if abort_transport and self._connected and self.transport is not None:
            self.transport.abortConnection()
        for cmd in pending:
            if not cmd.deferred.called:
                if cmd.verb == "LOGOUT" and not abort_transport:
                    # The server closed after (or instead of) answering LOGOUT:
                    # the session is over either way, which is all LOGOUT asks.
                    cmd.deferred.callback(None)
                    continue
                cmd.deferred.errback(Failure(cls(detail)))

    def _waiting_for(self) -> str:
        if self._inflight:
            head = self._inflight[0]
            if self._parser.in_literal:
                return f" in the middle of the {head.verb} answer"
            return f" while waiting for the {head.verb} answer"
        return ""

    # -- idle timeout (StreamingClient hooks)

    def _answer_due(self) -> bool:
        return self._ended is None and bool(self._inflight)

    def _idle_expired(self, limit: float) -> None:
        self._end(
            UpstreamLost if self.logged_in else UpstreamUnavailable,
            f"{self.peer} sent nothing for {limit:g} s{self._waiting_for()}",
        )


# --- Session set-up ------------------------------------------------------------------------


async def connect(
    provider: Provider,
    *,
    reactor: Any,
    endpoint_factory: EndpointFactory = hostname_endpoint,
) -> IMAPClient:
    """Connect, read the greeting, secure the connection and learn capabilities.

    Returns a client ready to log in, always over verified TLS: for STARTTLS
    providers a missing or refused STARTTLS ends here, before any credential.
    `reactor` must provide IReactorTime (and whatever the endpoint needs).
    """
    server = provider.imap
    if server is None:
        raise UpstreamRejected(f"provider {provider.name} has no imap endpoint")
    client, tls = await open_connection(
        provider,
        server,
        IMAPClient,
        reactor=reactor,
        endpoint_factory=endpoint_factory,
        error=UpstreamUnavailable,
        passthrough=MaildropError,
    )
    peer = client.peer
    try:
        try:
            await client.greeting()
        except ServerError as e:
            raise UpstreamUnavailable(f"{peer} greeted with {e.status.describe()}") from None
        if server.tls == "starttls":
            if not client.capabilities:
                await client.capability()
            if "STARTTLS" not in client.capabilities:
                raise UpstreamUnavailable(
                    f"{peer} does not offer STARTTLS; not logging in in clear"
                )
            try:
                await client.starttls(tls)
            except ServerError as e:
                raise UpstreamUnavailable(
                    f"{peer} refused STARTTLS: {e.status.describe()}"
                ) from None
            # RFC 3501 6.2.1: forget what was learnt in clear.
            await client.capability()
        elif not client.capabilities:
            await client.capability()
    except ServerError as e:
        client.abort("connection set-up failed")
        raise UpstreamUnavailable(f"{peer} refused {e.verb}: {e.status.describe()}") from None
    except BaseException:
        client.abort("connection set-up failed")
        raise
    return client


# RFC 5530 response codes that say "not now" rather than "never with these credentials".
_TEMPORARY_CODES = frozenset({"UNAVAILABLE", "LIMIT", "SERVERBUG", "OVERQUOTA"})


def login_refused(error: ServerError, peer: str) -> MaildropError:
    """Map a refused LOGIN/AUTHENTICATE to what the device should be told."""
    code = error.status.code or ""
    detail = f"{peer} refused the login ({error.verb}): {error.status.describe()}"
    if code == "INUSE":
        return MailboxInUse(detail)
    if code in _TEMPORARY_CODES:
        return UpstreamUnavailable(detail)
    return UpstreamRejected(detail)


async def login(
    client: IMAPClient,
    account: Account,
    provider: Provider,
    *,
    tokens: TokenSource | None = None,
) -> None:
    """Log in as the account; raise the MaildropError the device should see.

    Password accounts use AUTHENTICATE PLAIN when offered, else LOGIN (never
    both: a wrong password would count twice against the upstream's penalty).
    OAuth2 accounts use XOAUTH2/OAUTHBEARER with one forced token refresh
    after a refused token, as `gateway.upstream.credentials` rules.
    """
    announced = client.capabilities
    if account.auth == "oauth2":
        await bearer_login(
            client, account, provider, tokens, server_error=ServerError, refusal=login_refused
        )
    else:
        await _password_login(client, account, provider)
    client.logged_in = True
    # Servers may offer more once logged in (RFC 3501 6.2.3); most say so in
    # the login answer. If this one did not, ask later, when it matters.
    client.capabilities_stale = client.capabilities is announced


async def _password_login(client: IMAPClient, account: Account, provider: Provider) -> None:
    if account.password is None:
        raise UpstreamRejected(f"account {account.name} has no password configured")
    caps = client.capabilities
    try:
        if "PLAIN" in caps.sasl:
            mechanism = await mechanism_for(account, provider, caps.sasl, None)
            await client.authenticate(mechanism)
        elif "LOGINDISABLED" in caps:
            raise UpstreamRejected(
                f"{client.peer} offers neither AUTH=PLAIN nor LOGIN "
                f"(capabilities: {' '.join(sorted(caps.names))})"
            )
        else:
            try:
                await client.login(account.username, account.password)
            except ValueError as e:
                raise UpstreamRejected(f"account {account.name}: {e}") from None
    except ServerError as e:
        raise login_refused(e, client.peer) from None


async def open_session(
    account: Account,
    provider: Provider,
    *,
    reactor: Any,
    endpoint_factory: EndpointFactory = hostname_endpoint,
    tokens: TokenSource | None = None,
) -> IMAPClient:
    """Connect and log in as `account`; the client is in the authenticated state."""
    client = await connect(provider, reactor=reactor, endpoint_factory=endpoint_factory)
    try:
        await login(client, account, provider, tokens=tokens)
    except BaseException:
        client.abort("login failed")
        raise
    return client
