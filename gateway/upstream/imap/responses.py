"""Reading IMAP responses: status responses, FETCH and SEARCH data, capabilities.

Pure: works on the parser's `Response` objects, no Twisted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.upstream.errors import printable
from gateway.upstream.imap.parser import IMAPProtocolError, Response, Value


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


class ServerError(Exception):
    """The upstream answered a command with NO or BAD; callers map it by context."""

    def __init__(self, verb: str, status: Status) -> None:
        super().__init__(f"{verb}: {status.describe()}")
        self.verb = verb
        self.status = status
