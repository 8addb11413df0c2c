"""Bytes from a POP3 device in, lines and commands out: no I/O, no state machine.

Kept pure so that every framing rule (line limits, NUL bytes, STLS discarding
pipelined plaintext) is tested without a transport.
"""

from __future__ import annotations

from dataclasses import dataclass

# RFC 2449: a command line is at most 255 octets including the CRLF.
MAX_COMMAND = 255
# SASL responses (RFC 5034) may be longer than a command; beyond this, a line
# is junk and is discarded rather than buffered.
MAX_LINE = 8192


@dataclass(frozen=True)
class Line:
    """One complete line, without its line ending."""

    data: bytes


@dataclass(frozen=True)
class Overlong:
    """A line that exceeded MAX_LINE; its bytes were thrown away."""


@dataclass(frozen=True)
class Command:
    verb: str
    args: tuple[str, ...]
    # Everything after the verb and one space, unsplit: PASS takes it whole,
    # since RFC 1939 lets a password contain spaces.
    rest: str = ""


@dataclass(frozen=True)
class BadCommand:
    reason: str


class LineReader:
    """Splits a byte stream into lines (CRLF or bare LF), with a hard size cap.

    A line longer than MAX_LINE is reported once as `Overlong` and the rest of
    it, up to the next LF, is discarded, so a hostile peer cannot make the
    gateway buffer without bound and the session stays in sync.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buffer = bytearray()
        self._discarding = False
        self._max = max_line

    def feed(self, data: bytes) -> list[Line | Overlong]:
        self._buffer += data
        events: list[Line | Overlong] = []
        buffer = self._buffer
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            if self._discarding:
                self._discarding = False
            elif end - start > self._max:
                events.append(Overlong())
            else:
                stop = end - 1 if end > start and buffer[end - 1] == 0x0D else end
                events.append(Line(bytes(buffer[start:stop])))
            start = end + 1
        del buffer[:start]
        if len(buffer) > self._max:
            if not self._discarding:
                events.append(Overlong())
                self._discarding = True
            buffer.clear()
        return events

    @property
    def partial(self) -> bool:
        """Whether a line has begun and not ended (its deadline is running)."""
        return bool(self._buffer) or self._discarding

    def discard(self) -> None:
        """Forget buffered input: after STLS nothing sent in clear may be executed."""
        self._buffer.clear()
        self._discarding = False


def parse_command(line: bytes) -> Command | BadCommand:
    """Turn one line into a command, or say what is wrong with it."""
    if len(line) + 2 > MAX_COMMAND:
        return BadCommand("command line too long")
    if b"\x00" in line:
        return BadCommand("NUL byte in command")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return BadCommand("command is not valid UTF-8")
    if not text.isprintable():
        return BadCommand("control character in command")
    parts = text.split()
    if not parts:
        return BadCommand("empty command")
    verb = parts[0].upper()
    if len(verb) > 4 or not verb.isascii() or not verb.isalpha():
        return BadCommand("unknown command")
    rest = text.lstrip()[len(parts[0]) :]
    return Command(verb, tuple(parts[1:]), rest[1:] if rest.startswith(" ") else rest)


def parse_message_number(arg: str, count: int) -> int | str:
    """A 1-based message number within the snapshot, or the -ERR reason."""
    if not arg.isdigit() or not arg.isascii():
        return "invalid message number"
    digits = arg.lstrip("0") or "0"
    # Compare lengths first so a 10 000 digit number is never turned into an int.
    if len(digits) > len(str(count)) or not 1 <= int(digits) <= count:
        return "no such message"
    return int(digits)


def parse_line_count(arg: str) -> int | str:
    if not arg.isdigit() or not arg.isascii() or len(arg) > 9:
        return "invalid line count"
    return int(arg)
