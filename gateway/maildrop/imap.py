"""A maildrop backed by one folder of an upstream IMAP account.

The device's POP3 session sees a snapshot taken at login: the folder is
opened read-only (EXAMINE) and one `UID FETCH 1:* (UID RFC822.SIZE FLAGS)`
gives message numbers (UID order), exact sizes (RFC822.SIZE is the CRLF size
POP3 needs) and the messages to hide (`$POP3Deleted`). Messages arriving later
appear at the next session, as RFC 1939 expects. Everything afterwards names
messages by UID, so other clients expunging or adding mail cannot shift what a
POP3 message number means.

- RETR streams `BODY.PEEK[]` (never `\\Seen`) through a `DotStuffer` to the
  device, with the client's back-pressure; TOP fetches growing prefixes
  `BODY.PEEK[]<offset.length>` until the header and n body lines are out,
  so a TOP of a 50 MB message reads kilobytes.
- UIDLs come from `uidl_map`: "UIDVALIDITY.UID", kept across a UIDVALIDITY
  change for messages that match by Message-ID, size and INTERNALDATE.
- Nothing is written upstream before `commit()` (POP3 QUIT). Only then is the
  folder selected read-write and the account's DELE policy applied to exactly
  the UIDs the device deleted: `expunge`, `move` or `keep`. `abort()` drops
  the connection without LOGOUT; the session was read-only, so nothing changes.
- On a kept connection (`gateway.maildrop.imap_keeper`) the session ends by
  handing the connection back instead of LOGOUT or a drop: `release(wrote)`
  after QUIT, or after a dropped session that left no command pending; a
  failed QUIT, or a drop in the middle of a command, still drops it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Collection, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.maildrop import (
    MaildropError,
    NoSuchMessage,
    UpstreamLost,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.maildrop.imap_snapshot import (
    HIDDEN_KEYWORD,
    FolderState,
    Snapshot,
    folder_refused,
    take_snapshot,
)
from gateway.maildrop.imap_writers import MessageWriter, TopWriter
from gateway.maildrop.opening import at_open
from gateway.maildrop.uidl_map import SETTLE_ROUNDS, MailboxState, MessageKey, UIDLMap, natural_uidl
from gateway.state import StateError
from gateway.state.database import StateUnavailable
from gateway.timing import timed_step
from gateway.upstream.connection import EndpointFactory, hostname_endpoint
from gateway.upstream.credentials import note_refused, note_succeeded
from gateway.upstream.imap import (
    IMAPClient,
    IMAPProtocolError,
    Response,
    ServerError,
    astring,
    encode_mailbox,
    number,
    open_session,
    parse_fetch,
    parse_search,
    uid_sets,
)
from gateway.upstream.pipeline import outcomes

if TYPE_CHECKING:
    from twisted.internet.interfaces import IConsumer

    from gateway.model import Account, Provider
    from gateway.upstream.credentials import TokenSource

log = Logger()

# How a session on a kept connection ends: `wrote` says whether QUIT changed
# the folder (it was selected read-write); `None` means the connection is unfit
# to keep (it was aborted).
Release = Callable[[bool | None], None]

# TOP: the first prefix fetched, then each next one this many times larger.
TOP_FIRST_WINDOW = 32 * 1024
TOP_GROWTH = 4
TOP_MAX_WINDOW = 8 * 1024 * 1024

_MESSAGE_ID = re.compile(rb"<[^<>\s]{1,900}>")


# --- The maildrop ---------------------------------------------------------------------------


class IMAPMaildrop:
    """One logged-in IMAP session on one folder, seen through the `Maildrop` interface."""

    def __init__(
        self,
        client: IMAPClient,
        account: Account,
        snapshot: Snapshot,
        *,
        uid_store: UIDLMap | None,
        release: Release | None = None,
    ) -> None:
        self._client = client
        self._release = release
        # A kept connection went back to its keeper: this session touches it no more.
        self._handed_back = False
        self._account = account
        self._snapshot = snapshot
        self._store = uid_store
        self._uidls: tuple[str, ...] | None = None
        self._retrieved: set[int] = set()

    @property
    def sizes(self) -> Sequence[int]:
        return self._snapshot.sizes

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def client(self) -> IMAPClient:
        return self._client

    # -- UIDL

    async def unique_ids(self) -> Sequence[str]:
        if self._uidls is None:
            try:
                self._uidls = await self._resolve_uidls()
            except (StateError, StateUnavailable) as e:
                # The embedded store's errors name it already; the database's do not.
                what = str(e) if isinstance(e, StateError) else f"UIDL map: {e}"
                raise UpstreamUnavailable(
                    f"account {self._account.name}: {what}", "unique ids are unavailable"
                ) from None
        return self._uidls

    async def _resolve_uidls(self) -> tuple[str, ...]:
        """Settle the map for this snapshot; fetch the keys of the messages it
        lacks (new ones, or all after a change) and settle again."""
        snap = self._snapshot
        if self._store is None:
            return tuple(natural_uidl(snap.uidvalidity, uid) for uid in snap.uids)
        name = self._account.name
        here = MailboxState(snap.folder, snap.uidvalidity)
        keys: dict[int, MessageKey] = {}
        for _ in range(SETTLE_ROUNDS):
            settled = await self._store.settle(name, here, snap.uids, keys)
            if not settled.missing:
                break
            keys.update(await self._message_keys(settled.missing))
        else:
            raise StateError(f"UIDL map of {name} kept changing while this session settled it")
        before = settled.remapped_from
        if before is not None:
            log.info(
                "account {account}: folder {folder} changed (UIDVALIDITY {old} -> {new}, "
                "folder {old_folder!r}); {kept} of {count} messages keep their UIDL",
                account=name,
                folder=snap.folder,
                old=before.uidvalidity,
                new=snap.uidvalidity,
                old_folder=before.folder,
                kept=settled.kept,
                count=len(settled.uidls),
            )
        return tuple(settled.uidls[uid] for uid in snap.uids)

    async def _message_keys(self, uids: Sequence[int]) -> dict[int, MessageKey]:
        """Message-ID and INTERNALDATE of `uids` (one pipelined FETCH per UID set)."""
        sizes = dict(zip(self._snapshot.uids, self._snapshot.sizes, strict=True))
        found: dict[int, tuple[str, str]] = {}

        def observe(response: Response) -> None:
            if response.words(2)[1:] != [b"FETCH"]:
                return
            _, items = parse_fetch(response)
            if "UID" not in items:
                return
            uid = number(items["UID"], "UID")
            date = items.get("INTERNALDATE")
            header = next((v for k, v in items.items() if k.startswith("BODY[HEADER.FIELDS")), None)
            found[uid] = (
                message_id(header) if isinstance(header, bytes) else "",
                date.decode("latin-1") if isinstance(date, bytes) else "",
            )

        steps = [
            self._client.command(
                b"UID FETCH",
                uid_set,
                b"(UID INTERNALDATE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])",
                pipelinable=True,
                on_untagged=observe,
            )
            for uid_set in uid_sets(uids)
        ]
        await self._all(steps)
        keys: dict[int, MessageKey] = {}
        for uid in uids:
            # A message expunged meanwhile by another client has no answer:
            # its key is its size alone, which is all that is left of it.
            mid, date = found.get(uid, ("", ""))
            keys[uid] = MessageKey(mid, sizes[uid], date)
        return keys

    # -- RETR / TOP

    async def retrieve(self, msg: int, sink: IConsumer, lines: int | None = None) -> None:
        if not 1 <= msg <= len(self._snapshot.uids):
            raise NoSuchMessage(f"message {msg} is not in the snapshot of {len(self.sizes)}")
        uid = self._snapshot.uids[msg - 1]
        if lines is None:
            retr = self._retr(uid, self._snapshot.sizes[msg - 1], sink)
            await timed_step("imap", self._account.provider, "retrieve", retr)
        else:
            if lines < 0:
                raise ValueError("lines must not be negative")
            await self._top(uid, lines, sink)

    async def _retr(self, uid: int, size: int, sink: IConsumer) -> None:
        writer = MessageWriter(sink, self._client.peer)
        try:
            await self._client.command(b"UID FETCH", b"%d" % uid, b"(BODY.PEEK[])", receiver=writer)
        except ServerError as e:
            raise self._fetch_refused(e, uid, started=writer.size is not None) from None
        if writer.size is None:
            raise NoSuchMessage(f"{self._client.peer} has no message with UID {uid} any more")
        if writer.size != size:
            log.warn(
                "account {account}: UID {uid} is {actual} octets, RFC822.SIZE said {size}",
                account=self._account.name,
                uid=uid,
                actual=writer.size,
                size=size,
            )
        writer.finish()
        self._retrieved.add(uid)

    async def _top(self, uid: int, lines: int, sink: IConsumer) -> None:
        writer = TopWriter(sink, lines, self._client.peer)
        window = TOP_FIRST_WINDOW
        while not writer.done:
            writer.got = None
            item = b"(BODY.PEEK[]<%d.%d>)" % (writer.offset, window)
            try:
                await self._client.command(b"UID FETCH", b"%d" % uid, item, receiver=writer)
            except ServerError as e:
                raise self._fetch_refused(e, uid, started=writer.offset > 0) from None
            if writer.got is None:
                if writer.offset == 0:
                    raise NoSuchMessage(f"{self._client.peer} has no message with UID {uid}")
                break  # a server that answers "" past the end
            if writer.got < window:
                break
            window = min(window * TOP_GROWTH, TOP_MAX_WINDOW)
        writer.finish()

    def _fetch_refused(self, error: ServerError, uid: int, *, started: bool) -> MaildropError:
        detail = f"{self._client.peer} refused FETCH of UID {uid}: {error.status.describe()}"
        if started:
            # Part of the message may be on the wire already: the front end
            # must drop the device rather than end the message with ".".
            return UpstreamLost(detail)
        if error.status.code in ("EXPUNGEISSUED", "NONEXISTENT") or error.status.condition == "NO":
            return NoSuchMessage(detail)
        return UpstreamUnavailable(detail)

    # -- QUIT

    async def commit(self, deleted: Collection[int]) -> None:
        """Apply the DELE policy to exactly the deleted messages, then LOGOUT.

        The session was read-only until now: the folder is selected
        read-write only here, and only if there is something to write.
        A failure leaves whatever did not happen undone and raises, which the
        device sees as -ERR to its QUIT ("some deleted messages not removed").
        """
        numbers = sorted(set(deleted))
        for n in numbers:
            if not 1 <= n <= len(self._snapshot.uids):
                self._drop()
                raise NoSuchMessage(f"cannot delete message {n}: not in the snapshot")
        uids = [self._snapshot.uids[n - 1] for n in numbers]
        seen = sorted(self._retrieved) if self._account.mark_seen else []
        try:
            if uids or seen:
                folder = await self._select_for_update()
                if seen:
                    await self._store_flags(seen, b"(\\Seen)")
                if uids:
                    await self._apply_policy(uids, folder)
        except ServerError as e:
            self._drop()
            raise UpstreamUnavailable(
                f"{self._client.peer} refused {e.verb} at QUIT: {e.status.describe()}",
                "some deleted messages were not removed",
            ) from None
        except IMAPProtocolError as e:
            self._drop()
            raise UpstreamLost(f"{self._client.peer}: {e}") from None
        except BaseException:
            self._drop()
            raise
        if self._release is not None:
            self._hand_back(bool(uids or seen))
        else:
            await self._logout()

    async def _select_for_update(self) -> FolderState:
        state = FolderState()
        steps: list[Deferred[Any]] = []
        if self._client.capabilities_stale:
            # The login answer did not say what the server offers once logged
            # in (UIDPLUS, MOVE): ask, in the same round trip as SELECT.
            steps.append(self._client.command(b"CAPABILITY", pipelinable=True))
        folder = self._snapshot.folder
        steps.append(
            self._client.command(
                b"SELECT",
                astring(encode_mailbox(folder)),
                pipelinable=True,
                on_untagged=state.observe,
            )
        )
        try:
            await self._all(steps)
        except ServerError as e:
            if e.verb == "SELECT":
                raise folder_refused(e, self._client.peer, folder) from None
            raise
        if state.uidvalidity != self._snapshot.uidvalidity:
            raise UpstreamUnavailable(
                f"{self._client.peer}: UIDVALIDITY of {folder!r} changed during the session "
                f"({self._snapshot.uidvalidity} -> {state.uidvalidity}); nothing was deleted",
                "some deleted messages were not removed",
            )
        return state

    async def _apply_policy(self, uids: list[int], folder: FolderState) -> None:
        policy = self._account.on_delete
        if policy == "keep":
            if not folder.keywords_allowed:
                raise UpstreamUnavailable(
                    f"{self._client.peer}: folder {self._snapshot.folder!r} does not accept "
                    f'the keyword {HIDDEN_KEYWORD} needed by on_delete = "keep"',
                    "some deleted messages were not removed",
                )
            await self._store_flags(uids, f"({HIDDEN_KEYWORD})".encode())
        elif policy == "move":
            await self._move(uids, folder)
        else:
            await self._expunge(uids, folder)

    async def _move(self, uids: list[int], folder: FolderState) -> None:
        target = self._account.move_to
        if not target:
            raise UpstreamRejected(
                f'account {self._account.name}: on_delete = "move" without move_to'
            )
        mailbox = astring(encode_mailbox(target))
        verb = b"UID MOVE" if "MOVE" in self._client.capabilities else b"UID COPY"
        for uid_set in uid_sets(uids):
            await self._creating(mailbox, partial(self._client.command, verb, uid_set, mailbox))
        if verb == b"UID COPY":
            await self._expunge(uids, folder)

    async def _creating(self, mailbox: Any, step: Callable[[], Awaitable[Any]]) -> None:
        """Run `step`; if the server says the target folder is missing, create it once."""
        try:
            await step()
        except ServerError as e:
            if e.status.code != "TRYCREATE":
                raise
            try:
                await self._client.command(b"CREATE", mailbox)
            except ServerError as created:
                if created.status.code != "ALREADYEXISTS":
                    raise
            await step()

    async def _expunge(self, uids: list[int], folder: FolderState) -> None:
        """Remove exactly `uids`, never another client's `\\Deleted` messages.

        With UIDPLUS, UID EXPUNGE does exactly that. Without it, EXPUNGE
        would remove every `\\Deleted` message of the folder, so it is sent
        only when a search finds no `\\Deleted` message the gateway did not
        mark itself. Otherwise our messages stay marked `\\Deleted` and
        hidden by `$POP3Deleted`, and go with the next expunge (by anyone,
        or by a later session once the others are gone). A client marking a
        message between the search and EXPUNGE asked for it to be expunged.
        """
        keywords = folder.keywords_allowed
        flags = f"(\\Deleted {HIDDEN_KEYWORD})" if keywords else "(\\Deleted)"
        await self._store_flags(uids, flags.encode())
        if "UIDPLUS" in self._client.capabilities:
            for uid_set in uid_sets(uids):
                await self._client.command(b"UID EXPUNGE", uid_set)
            return
        query = (
            [b"DELETED", b"NOT", b"KEYWORD", HIDDEN_KEYWORD.encode()] if keywords else [b"DELETED"]
        )
        foreign = set(await self._search(query)) - set(uids)
        if not foreign:
            await self._client.command(b"EXPUNGE")
            return
        log.warn(
            "account {account}: {peer} has no UIDPLUS and {count} other message(s) of "
            "{folder!r} are marked \\Deleted; not expunging them",
            account=self._account.name,
            peer=self._client.peer,
            count=len(foreign),
            folder=self._snapshot.folder,
        )
        if not keywords:
            raise UpstreamUnavailable(
                f"{self._client.peer}: cannot expunge only the deleted messages "
                "(no UIDPLUS, no keywords, other \\Deleted messages present)",
                "some deleted messages were not removed",
            )

    async def _store_flags(self, uids: Sequence[int], flags: bytes) -> None:
        for uid_set in uid_sets(uids):
            await self._client.command(
                b"UID STORE", uid_set, b"+FLAGS.SILENT", flags, on_untagged=_ignore
            )

    async def _search(self, query: list[bytes]) -> list[int]:
        found: list[int] = []

        def observe(response: Response) -> None:
            if response.words(1) == [b"SEARCH"]:
                found.extend(parse_search(response))

        await self._client.command(b"UID SEARCH", *query, on_untagged=observe)
        return found

    async def _logout(self) -> None:
        """LOGOUT after the work is done; its failure changes nothing that matters."""
        try:
            await self._client.logout()
        except (MaildropError, ServerError) as e:
            log.debug("LOGOUT at {peer} failed: {e}", peer=self._client.peer, e=e)
            self._client.abort("LOGOUT failed")

    async def _all(self, steps: list[Deferred[Any]]) -> None:
        """Wait for pipelined steps; raise the first failure, consuming the others."""
        for result in await outcomes(steps):
            if isinstance(result, Failure):
                result.raiseException()

    def abort(self) -> None:
        """The device went away: nothing was written. A kept connection at rest
        between commands goes back to its keeper; one mid-command is dropped."""
        if self._release is not None and not self._client.busy and not self._client.ended:
            self._hand_back(False)
        else:
            self._drop()

    def _drop(self) -> None:
        if not self._handed_back:
            self._client.abort()
            self._hand_back(None)

    def _hand_back(self, wrote: bool | None) -> None:
        release, self._release = self._release, None
        if release is not None:
            self._handed_back = True
            release(wrote)


def _ignore(response: Response) -> None:
    """For commands whose untagged answers (FLAGS, PERMANENTFLAGS) are not needed."""


def message_id(header: bytes) -> str:
    """The Message-ID in a `Message-ID:` header field (folded or not), or ""."""
    match = _MESSAGE_ID.search(header.replace(b"\r\n", b"").replace(b"\n", b""))
    return match.group(0).decode("latin-1") if match else ""


async def open_imap_maildrop(
    account: Account,
    provider: Provider,
    *,
    reactor: Any,
    uid_store: UIDLMap | None,
    tokens: TokenSource | None = None,
    endpoint_factory: EndpointFactory = hostname_endpoint,
) -> IMAPMaildrop:
    """Connect, log in as `account` and take the snapshot of its folder.

    `reactor` provides IReactorTime and, for the default endpoint, TCP and
    name resolution; `endpoint_factory(reactor, host, port, timeout)` lets
    tests connect in memory. Raises a `MaildropError`.
    """
    client = await open_session(
        account, provider, reactor=reactor, endpoint_factory=endpoint_factory, tokens=tokens
    )
    try:
        opening = timed_step("imap", provider.name, "open", take_snapshot(client, account.folder))
        snapshot = await at_open(client, opening, "snapshot at login failed")
    except MaildropError as e:
        # Microsoft refuses a token without mailbox rights here, not at login.
        note_refused(tokens, account, e)
        raise
    note_succeeded(tokens, account)
    return IMAPMaildrop(client, account, snapshot, uid_store=uid_store)
