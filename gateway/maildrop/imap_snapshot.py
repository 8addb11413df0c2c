"""The snapshot an IMAP maildrop takes at login, and what SELECT/EXAMINE tell.

RFC 1939 fixes the maildrop for the whole session: one pipelined EXAMINE +
`UID FETCH 1:* (UID RFC822.SIZE FLAGS)` gives message numbers (UID order),
exact sizes and the messages to hide (`$POP3Deleted`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from twisted.python.failure import Failure

from gateway.maildrop import MaildropError, UpstreamRejected, UpstreamUnavailable
from gateway.upstream.imap import (
    IMAPClient,
    Response,
    ServerError,
    astring,
    encode_mailbox,
    number,
    parse_fetch,
    parse_status,
)
from gateway.upstream.pipeline import outcome

# The keyword that hides a message from later POP3 sessions (policy "keep",
# and messages the expunge fallback could not remove yet).
HIDDEN_KEYWORD = "$POP3Deleted"

_TEMPORARY_CODES = frozenset({"UNAVAILABLE", "INUSE", "LIMIT", "SERVERBUG", "EXPUNGEISSUED"})
# The snapshot answer in the order asked for, as Dovecot, Gmail and Exchange
# send it: one regex instead of the general tokenizer (a 100,000-message
# folder parses in a fraction of the time). Any other shape takes the general path.
_SNAPSHOT_LINE = re.compile(
    rb"\* \d+ FETCH \(UID (\d+) RFC822\.SIZE (\d+) FLAGS \(([^()]*)\)\)\Z", re.IGNORECASE
)
_HIDDEN = HIDDEN_KEYWORD.lower().encode()


@dataclass
class FolderState:
    """What SELECT/EXAMINE told about the folder."""

    uidvalidity: int | None = None
    exists: int | None = None
    permanent_flags: frozenset[str] = frozenset()

    def observe(self, response: Response) -> None:
        words = response.words(2)
        if len(words) == 2 and words[1] == b"EXISTS":
            self.exists = int(words[0]) if words[0].isdigit() else None
            return
        status = parse_status(response)
        if status is None or status.condition != "OK":
            return
        if status.code == "UIDVALIDITY" and status.code_data.strip().isdigit():
            self.uidvalidity = int(status.code_data)
        elif status.code == "PERMANENTFLAGS":
            flags = status.code_data.strip(b"() ").decode("ascii", "replace").split()
            self.permanent_flags = frozenset(f.upper() for f in flags)

    @property
    def keywords_allowed(self) -> bool:
        flags = self.permanent_flags
        return "\\*" in flags or HIDDEN_KEYWORD.upper() in flags


@dataclass
class _SnapshotCollector:
    """Gathers the answers to `UID FETCH 1:* (UID RFC822.SIZE FLAGS)`."""

    found: dict[int, list[Any]] = field(default_factory=dict)

    def observe(self, response: Response) -> None:
        if len(response.segments) == 1:
            fast = _SNAPSHOT_LINE.match(response.first_line)
            if fast is not None:
                entry = self.found.setdefault(int(fast.group(1)), [None, False])
                entry[0] = int(fast.group(2))
                entry[1] = _HIDDEN in fast.group(3).lower().split()
                return
        if response.words(2)[1:] != [b"FETCH"]:
            return
        _, items = parse_fetch(response)
        if "UID" not in items:
            return  # an unsolicited flag update without UID: not ours
        uid = number(items["UID"], "UID")
        entry = self.found.setdefault(uid, [None, False])
        if "RFC822.SIZE" in items:
            entry[0] = number(items["RFC822.SIZE"], "RFC822.SIZE")
        flags = items.get("FLAGS")
        if isinstance(flags, list):
            entry[1] = any(
                isinstance(f, str) and f.upper() == HIDDEN_KEYWORD.upper() for f in flags
            )

    def messages(self, peer: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        uids: list[int] = []
        sizes: list[int] = []
        for uid in sorted(self.found):
            size, hidden = self.found[uid]
            if size is None:
                raise UpstreamUnavailable(f"{peer} sent no RFC822.SIZE for UID {uid}")
            if not hidden:
                uids.append(uid)
                sizes.append(size)
        return tuple(uids), tuple(sizes)


@dataclass(frozen=True)
class Snapshot:
    """The maildrop as the device sees it for the whole session."""

    folder: str
    uidvalidity: int
    uids: tuple[int, ...]
    sizes: tuple[int, ...]


async def take_snapshot(client: IMAPClient, folder: str) -> Snapshot:
    """EXAMINE the folder and list it, pipelined: one round trip after login."""
    mailbox = astring(encode_mailbox(folder))
    state = FolderState()
    collector = _SnapshotCollector()
    examine = client.command(b"EXAMINE", mailbox, pipelinable=True, on_untagged=state.observe)
    fetch = client.command(
        b"UID FETCH",
        b"1:*",
        b"(UID RFC822.SIZE FLAGS)",
        pipelinable=True,
        on_untagged=collector.observe,
    )
    examine_result = await outcome(examine)
    fetch_result = await outcome(fetch)
    if isinstance(examine_result, Failure):
        if isinstance(examine_result.value, ServerError):
            raise folder_refused(examine_result.value, client.peer, folder)
        examine_result.raiseException()
    if isinstance(fetch_result, Failure):
        refusal = fetch_result.value
        # Some servers refuse "1:*" in an empty folder instead of answering nothing.
        if not isinstance(refusal, ServerError):
            fetch_result.raiseException()
        elif state.exists != 0:
            raise UpstreamUnavailable(
                f"{client.peer} refused to list {folder}: {refusal.status.describe()}"
            )
    if state.uidvalidity is None:
        raise UpstreamUnavailable(
            f"{client.peer} sent no UIDVALIDITY for {folder}: UIDLs could not be stable"
        )
    uids, sizes = collector.messages(client.peer)
    return Snapshot(folder, state.uidvalidity, uids, sizes)


def folder_refused(error: ServerError, peer: str, folder: str) -> MaildropError:
    """SELECT/EXAMINE refused: a missing folder is the admin's to fix, the rest is temporary."""
    detail = f"{peer} refused to open folder {folder!r}: {error.status.describe()}"
    if (error.status.code or "") in _TEMPORARY_CODES:
        return UpstreamUnavailable(detail)
    return UpstreamRejected(detail)
