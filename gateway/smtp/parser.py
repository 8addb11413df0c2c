"""Bytes from an SMTP device in, command lines or message data out: no I/O.

Kept pure so that every framing rule is tested without a transport:

- Command lines are capped (RFC 5321 4.5.3.1.4, with room for RFC 4954's
  long AUTH responses); an overlong one is reported once and skipped to its
  end, and the session stays in sync.
- `SMTPInput` hands out one event at a time, so the state machine switches
  framing exactly where the protocol does: after `354` the very next byte is
  message data, whatever arrived in the same packet; after `220` to STARTTLS
  everything already received in clear is thrown away (command injection).
- In data mode the end is only ``CRLF . CRLF``. A line of any length is just
  more data (it can never fall back to command mode), and ``LF . LF`` or
  ``CR . CR`` are ordinary bytes: the relay dot-stuffs after every LF, so
  no upstream can read them as an end either (SMTP smuggling).
- Un-stuffing removes the first "." of every line (RFC 5321 4.5.2) with
  `bytes.replace` on large chunks; only four bytes are held back between
  chunks, so a split terminator is still found with one `bytes.find`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# RFC 5321 4.5.3.1.4: a command line is at most 512 octets with its CRLF.
MAX_COMMAND_LINE = 512
# RFC 4954 4: an AUTH command or response line may be up to 12288 octets.
MAX_LINE = 12288
# RFC 5321 4.5.3.1.6: a text line is at most 998 octets before its CRLF.
MAX_TEXT_LINE = 998
# RFC 5321 4.5.3.1.5 allows 256 octets for a path; 254 for the address in it.
MAX_ADDRESS = 254

_TERMINATOR = b"\r\n.\r\n"
# Held back at the end of each data chunk: one short of a terminator.
_HOLD = len(_TERMINATOR) - 1


@dataclass(frozen=True, slots=True)
class Line:
    """One complete command line, without its line ending."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Overlong:
    """A line longer than the limit; its bytes were thrown away."""


@dataclass(frozen=True, slots=True)
class DataChunk:
    """Message bytes with the dot-stuffing removed; `end` once CRLF.CRLF was seen.

    The chunks of one message concatenate to the message as the client meant
    it, ending with the CRLF of its last line (nothing for an empty message).
    """

    data: bytes
    end: bool


class SMTPInput:
    """Splits what a client sends into command lines or message data."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._max = max_line
        self._buffer = bytearray()
        self._discarding = False
        self._in_data = False
        self._held = b""
        self._virtual = 0
        self._after_crlf = False

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out (what pipelining queued up)."""
        return len(self._buffer)

    @property
    def in_data(self) -> bool:
        return self._in_data

    @property
    def partial_line(self) -> bool:
        """Whether a command line has begun and not ended (its deadline is running)."""
        if self._in_data:
            return False
        return self._discarding or (bool(self._buffer) and self._buffer[-1] != 0x0A)

    def discard(self) -> None:
        """Forget everything buffered: after STARTTLS nothing sent in clear may run."""
        self._buffer.clear()
        self._discarding = False

    def next_line(self) -> Line | Overlong | None:
        """The next command line, or None until more bytes arrive."""
        assert not self._in_data, "next_line() in data mode"
        buffer = self._buffer
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) > self._max:
                    buffer.clear()
                    if not self._discarding:
                        self._discarding = True
                        return Overlong()
                return None
            if self._discarding:
                # The tail of a line already reported as overlong.
                self._discarding = False
                del buffer[: end + 1]
                continue
            if end > self._max:
                del buffer[: end + 1]
                return Overlong()
            stop = end - 1 if end > 0 and buffer[end - 1] == 0x0D else end
            line = bytes(buffer[:stop])
            del buffer[: end + 1]
            return Line(line)

    def start_data(self) -> None:
        """The bytes after the DATA command's line are message content."""
        self._in_data = True
        self._discarding = False
        # The content starts at the beginning of a line: pretend a CRLF came
        # before it, so "." alone right away is the end of an empty message
        # and a first line "..x" is un-stuffed like any other.
        self._held = b"\r\n"
        self._virtual = 2
        self._after_crlf = False

    def next_data(self) -> DataChunk | None:
        """The next piece of message content, or None until more bytes arrive."""
        assert self._in_data, "next_data() outside data mode"
        if not self._buffer:
            return None
        data = self._held + bytes(self._buffer)
        self._buffer.clear()
        at = data.find(_TERMINATOR)
        if at >= 0:
            segment = data[: at + 2]
            self._buffer += data[at + len(_TERMINATOR) :]
            self._held = b""
            self._in_data = False
            return DataChunk(self._unstuff(segment), True)
        cut = len(data) - _HOLD
        # Never cut between CR and LF: the "." after them would be missed.
        if cut > 0 and data[cut - 1] == 0x0D:
            cut -= 1
        if cut <= 0:
            self._held = data
            return None
        self._held = data[cut:]
        out = self._unstuff(data[:cut])
        return DataChunk(out, False) if out else None

    def _unstuff(self, segment: bytes) -> bytes:
        if self._after_crlf and segment[:1] == b".":
            segment = segment[1:]
        self._after_crlf = segment.endswith(b"\r\n")
        out = segment.replace(b"\r\n.", b"\r\n")
        if self._virtual:
            cut = min(self._virtual, len(out))
            out = out[cut:]
            self._virtual -= cut
        return out


class LineMeter:
    """The longest line seen in a stream of chunks, without a loop per byte.

    Lengths count the octets before LF, a CR included, so a text line of
    MAX_TEXT_LINE octets plus CRLF measures MAX_TEXT_LINE + 1.
    """

    def __init__(self) -> None:
        self.longest = 0
        self._current = 0

    def feed(self, chunk: bytes) -> int:
        first = chunk.find(b"\n")
        if first < 0:
            self._current += len(chunk)
            self.longest = max(self.longest, self._current)
            return self.longest
        self.longest = max(self.longest, self._current + first)
        last = chunk.rfind(b"\n")
        # Only a stretch longer than the longest line so far can hold a longer one.
        if last - first - 1 > self.longest:
            middle = chunk[first + 1 : last]
            self.longest = max(self.longest, max(map(len, middle.split(b"\n"))))
        self._current = len(chunk) - last - 1
        self.longest = max(self.longest, self._current)
        return self.longest


# --- Commands ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    verb: str
    # Everything after the verb and one space, unsplit.
    arg: str


@dataclass(frozen=True, slots=True)
class BadCommand:
    reason: str


def parse_command(line: bytes) -> Command | BadCommand:
    """Turn one command line into a verb and its argument text.

    Only AUTH may be longer than 512 octets: RFC 4954 section 4 allows 12288
    for it, so that an initial response fits on the command line.
    """
    limit = MAX_LINE if line[:5].upper() == b"AUTH " else MAX_COMMAND_LINE
    if len(line) + 2 > limit:
        return BadCommand("line too long")
    if not line.isascii():
        return BadCommand("8-bit characters in a command (SMTPUTF8 is not offered)")
    text = line.decode("ascii")
    if not text.isprintable():
        return BadCommand("control character in a command")
    verb, _, arg = text.strip().partition(" ")
    if not verb:
        return BadCommand("empty command")
    return Command(verb.upper(), arg.strip())


@dataclass(frozen=True, slots=True)
class PathCommand:
    """MAIL FROM or RCPT TO: the address (\"\" for the null sender) and parameters."""

    address: str
    params: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class PathError:
    code: int
    enhanced: str
    reason: str


def parse_path_command(arg: str, keyword: str) -> PathCommand | PathError:
    """Parse `FROM:<a@b> SIZE=1` (keyword "FROM") or `TO:<a@b>` (keyword "TO").

    Lenient where devices are sloppy and it is harmless: a space after the
    colon, a missing pair of angle brackets around a bare address.
    """
    head, colon, rest = arg.partition(":")
    if not colon or head.strip().upper() != keyword:
        return PathError(501, "5.5.4", f"syntax: {_usage(keyword)}")
    rest = rest.lstrip()
    if rest.startswith("<"):
        end = _closing_bracket(rest)
        if end < 0:
            return PathError(501, "5.1.7" if keyword == "FROM" else "5.1.3", "missing '>'")
        path, tail = rest[1:end], rest[end + 1 :]
        if tail and not tail.startswith(" "):
            return PathError(501, "5.5.4", f"syntax: {_usage(keyword)}")
    else:
        path, _, tail = rest.partition(" ")
    address = _strip_source_route(path)
    bad = address_problem(address, null_ok=keyword == "FROM")
    if bad is not None:
        code, enhanced = (553, "5.6.7") if not address.isascii() else (553, "5.1.7")
        if keyword == "TO":
            enhanced = "5.6.7" if not address.isascii() else "5.1.3"
        return PathError(code, enhanced, bad)
    params: dict[str, str | None] = {}
    for word in tail.split():
        name, eq, value = word.partition("=")
        if not name or not name.replace("-", "").isalnum() or (eq and not value):
            return PathError(501, "5.5.4", f"malformed parameter {word[:40]!r}")
        params[name.upper()] = value if eq else None
    return PathCommand(address, params)


def mail_params_problem(params: Mapping[str, str | None], max_size: int) -> PathError | None:
    """Why MAIL's parameters (RFC 1870 SIZE, RFC 6152 BODY) are refused, or None."""
    for name, value in params.items():
        if name == "SIZE":
            if value is None or not value.isdigit() or len(value) > 15:
                return PathError(501, "5.5.4", "SIZE needs a number")
            if int(value) > max_size:
                return PathError(
                    552, "5.3.4", f"message larger than the limit of {max_size} octets"
                )
        elif name == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                return PathError(501, "5.5.4", "BODY must be 7BIT or 8BITMIME")
        elif name != "AUTH":
            # AUTH= (RFC 4954 section 5) is accepted and ignored.
            return PathError(555, "5.5.4", f"MAIL parameter {name} not supported")
    return None


def _usage(keyword: str) -> str:
    return "MAIL FROM:<address>" if keyword == "FROM" else "RCPT TO:<address>"


def _closing_bracket(text: str) -> int:
    """Index of the '>' closing the path, skipping quoted local parts."""
    if '"' not in text:
        return text.find(">")
    quoted = False
    escaped = False
    for i, c in enumerate(text[1 : MAX_ADDRESS + 80], 1):
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return i
    return -1


def _strip_source_route(path: str) -> str:
    """RFC 5321 4.1.2: "@a,@b:user@c" means user@c; routes are ignored."""
    if path.startswith("@") and ":" in path:
        return path.split(":", 1)[1]
    return path


def address_problem(address: str, *, null_ok: bool) -> str | None:
    """Why `address` cannot be used as a mailbox, or None if it can."""
    if address == "":
        return None if null_ok else "an empty address is not a recipient"
    if not address.isascii():
        return "non-ASCII addresses need SMTPUTF8, which is not offered"
    if len(address) > MAX_ADDRESS:
        return "address too long"
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return "address must be local-part@domain"
    if local.startswith('"'):
        if not (local.endswith('"') and len(local) >= 2):
            return "malformed quoted local part"
    elif any(c in local for c in ' \t"(),:;<>[\\]') or not local.isprintable():
        return "invalid character in the local part"
    if domain.startswith("["):
        if not domain.endswith("]"):
            return "malformed address literal"
    else:
        labels = domain.split(".")
        if any(not label or not label.replace("-", "").isalnum() for label in labels):
            return "invalid domain"
    return None
