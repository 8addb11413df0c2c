"""Writing IMAP commands: strings, literals, folder names and UID sets (RFC 3501).

Pure: builds the bytes a command is sent as, no Twisted.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from gateway.upstream.imap.responses import Capabilities


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


def wire_pieces(
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
