"""The maildrop seam between the POP3 front end and the upstreams.

The front end speaks RFC 1939 to the device; a maildrop is what it reads the
messages from. An upstream POP3 account and an upstream IMAP folder both
implement `Maildrop`; the front end knows nothing of their inside. The
implementations live next to this seam: `pop3`, `imap` (with `imap_snapshot`
and `imap_writers`), the UIDL map for IMAP folders (`uidl_map`) and an
in-memory fake for tests (`memory`).

Contract, shared by every implementation:

- `open_maildrop(account)` (a `MaildropOpener`) connects and logs in upstream,
  and takes a snapshot: `sizes` is fixed for the whole session, as RFC 1939
  requires. Message numbers are 1-based, as on the wire.
- `retrieve()` writes the message (or, with `lines`, its header and first
  `lines` body lines) to `sink` already in POP3 wire form: CRLF line ends,
  dot-stuffed, ending with CRLF, *without* the terminating ".CRLF", which the
  front end adds after the Deferred fires. It registers a streaming producer on
  `sink` while it writes, so a slow device slows the upstream down instead of
  filling memory, and unregisters it before returning. If it fails before the
  first `sink.write`, the device gets an -ERR; after it, the front end drops the
  device connection so no truncated message is ever terminated.
- Deletions are only marks in the front end until `commit()` (RFC 1939 UPDATE
  state, after QUIT). `abort()` drops the upstream without committing anything:
  for an upstream POP3 server that means closing without QUIT.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Protocol

from gateway.upstream.errors import (
    MailboxInUse,
    UpstreamError,
    UpstreamLost,
    UpstreamRejected,
    UpstreamUnavailable,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IConsumer

    from gateway.model import Account


# Every upstream error is one the device can be told: the family is shared
# with the upstream clients and the OAuth code (`gateway.upstream.errors`).
MaildropError = UpstreamError


class NoSuchMessage(MaildropError):
    """The upstream no longer has a message the snapshot listed."""

    code = None
    device_text = "no such message"


class Maildrop(Protocol):
    """One open, logged-in upstream mailbox for the length of a POP3 session."""

    @property
    def sizes(self) -> Sequence[int]:
        """Octet sizes (CRLF wire form) of messages 1..n, fixed at open."""
        ...

    async def unique_ids(self) -> Sequence[str]:
        """UIDL values of messages 1..n (fetched once, then cached)."""
        ...

    async def retrieve(self, msg: int, sink: IConsumer, lines: int | None = None) -> None:
        """Stream message `msg` (1-based) to `sink` in wire form; see the module doc."""
        ...

    async def commit(self, deleted: Collection[int]) -> None:
        """Delete exactly `deleted` upstream and end the session (UPDATE state)."""
        ...

    def abort(self) -> None:
        """Drop the upstream session now; nothing is deleted. Idempotent."""
        ...


__all__ = [
    "MailboxInUse",
    "Maildrop",
    "MaildropError",
    "MaildropOpener",
    "NoSuchMessage",
    "UpstreamLost",
    "UpstreamRejected",
    "UpstreamUnavailable",
]


class MaildropOpener(Protocol):
    async def __call__(self, account: Account) -> Maildrop:
        """Connect and log in upstream as `account`; raise a MaildropError."""
        ...
