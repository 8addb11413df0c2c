"""What the spool stores about a message: its envelope, its delivery progress,
and the ids that name both on disk.

Both records are JSON on disk and are decoded with `gateway.state`'s typed
converter, so a damaged or hand-edited file (a wrong type, a missing key,
extra junk) is refused with the field it concerns instead of becoming an
object that fails later, in the middle of a delivery.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, Literal

from gateway.state import StateError, decode_record, encode_record, json_records

_ID: Final = re.compile(r"[0-9]{14}-[0-9a-f]{8}")
_JSON: Final = json_records()

Status = Literal["queued", "dead"]


class SpoolError(StateError):
    """A spool file or directory that cannot be used; the text says which."""


@dataclass(frozen=True)
class Envelope:
    """Everything about a message except its bytes; never changes once spooled."""

    id: str
    account: str
    device: str
    peer: str
    # "password" (AUTH), "network" (relay_without_auth) or "bounce" (a DSN
    # the gateway wrote itself; a failed bounce is never bounced again).
    identified_by: str
    original_sender: str
    sender: str
    recipients: tuple[str, ...]
    received: float
    size: int
    eight_bit: bool
    body: str | None = None
    bounce_of: str | None = None
    from_rewritten: bool = False

    def to_json(self) -> bytes:
        return encode_record(_JSON, self)

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        """Raises `ValueError` naming what is wrong with a damaged record."""
        return decode_record(_JSON, data, cls)


@dataclass
class DeliveryState:
    """What the relay learnt so far; rewritten after every attempt."""

    attempts: int = 0
    next_attempt: float = 0.0
    # Lifetime is counted from here: arrival, or the admin's last `queue retry`.
    retry_base: float | None = None
    delivered: list[str] = field(default_factory=list)
    # Recipient -> the upstream's permanent refusal (or "expired").
    failed: dict[str, str] = field(default_factory=dict)
    last_error: str = ""
    dead_reason: str | None = None

    def to_json(self) -> bytes:
        return encode_record(_JSON, self)

    @classmethod
    def from_json(cls, data: bytes) -> DeliveryState:
        """Raises `ValueError` naming what is wrong with a damaged record."""
        return decode_record(_JSON, data, cls)


@dataclass
class QueueEntry:
    envelope: Envelope
    state: DeliveryState
    status: Status = "queued"

    @property
    def id(self) -> str:
        return self.envelope.id

    @property
    def pending(self) -> list[str]:
        """Recipients still to deliver to."""
        done = set(self.state.delivered) | set(self.state.failed)
        return [r for r in self.envelope.recipients if r not in done]

    @property
    def expires(self) -> float:
        return self.state.retry_base or self.envelope.received


def valid_id(text: str) -> bool:
    return _ID.fullmatch(text) is not None


def new_id(now: float) -> str:
    """Sortable by arrival, unique without coordination, safe as a file name."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(4)


class QueueIndex:
    """The spool's in-memory index, the same for both backends: every entry
    by id, and each account's queued entries oldest first (a dict keeps the
    order they were tracked in), which the relay walks without a copy."""

    def __init__(self) -> None:
        self.entries: dict[str, QueueEntry] = {}
        self._queued: dict[str, dict[str, QueueEntry]] = {}

    def track(self, entry: QueueEntry) -> None:
        """Put an entry (new, or changed status) into the index."""
        self.entries[entry.id] = entry
        account = self._queued.setdefault(entry.envelope.account, {})
        if entry.status == "queued":
            account[entry.id] = entry
        else:
            account.pop(entry.id, None)

    def forget(self, entry: QueueEntry) -> None:
        """Drop an entry from the index (delivered, deleted, or gone)."""
        self.entries.pop(entry.id, None)
        self._queued.get(entry.envelope.account, {}).pop(entry.id, None)

    def queued(self, account: str) -> list[QueueEntry]:
        """The account's queued entries, oldest first."""
        return list(self._queued.get(account, {}).values())

    def iter_queued(self, account: str) -> Iterator[QueueEntry]:
        """The same without a copy: only for loops that do not wait."""
        return iter(self._queued.get(account, {}).values())
