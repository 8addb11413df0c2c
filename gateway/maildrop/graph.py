"""A maildrop backed by one folder of a Microsoft 365 mailbox, through Microsoft Graph.

For tenants that switched POP and IMAP off: the device still speaks POP3 to
the gateway, the gateway speaks Graph (`gateway.upstream.graph`).

- Login takes a snapshot: every message of the folder (well-known name such as
  `inbox`, or a path `Inbox/Scans`), oldest first, listed with `$select` and
  `$top=1000` through `@odata.nextLink`. Messages carrying the category
  `POP3Deleted` (on_delete = "keep") are left out.
- The UIDL is the SHA-256 of the message's immutable id (40 hex digits): ids
  are requested as immutable on every call, so the UIDL stays the same across
  sessions and folder moves within the mailbox (graph/outlook-immutable-id),
  and it fits RFC 1939's 1-70 printable characters, which the id itself
  (case-sensitive base64 up to ~150 characters) does not.
- Sizes are exact: measured once per message from `$value` and kept in the
  state directory (`graph_sizes`). A login measures at most
  `MEASURE_PER_LOGIN` new messages (oldest first); newer unmeasured ones wait
  for the next session, like mail that arrived after the login, so the first
  login on a folder of thousands stays within the device's patience.
- RETR streams `$value` through the shared `DotStuffer` with back-pressure;
  TOP stops reading `$value` after the n-th body line.
- Nothing is written to Graph before `commit()` (QUIT): then `mark_seen`
  (`isRead`), and the DELE policy for exactly the deleted messages: "move"
  (to `move_to`, a well-known name such as `deleteditems` or a path),
  "expunge" (`permanentDelete`), "keep" (category `POP3Deleted`). `abort()`
  cancels what is in flight and writes nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from gateway.dotstuff import DotStuffer
from gateway.maildrop import (
    MaildropError,
    NoSuchMessage,
    UpstreamLost,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.maildrop.graph_sizes import SizeMap
from gateway.maildrop.graph_wire import CRLFLines, WireCounter
from gateway.maildrop.imap_writers import TopWriter
from gateway.state import StateError
from gateway.state.database import StateUnavailable
from gateway.timing import timed_step
from gateway.tls import TLSSetupError, load_trust_root
from gateway.upstream.graph import (
    SHARED_SLOTS,
    BodyPump,
    GraphHTTP,
    GraphMailbox,
    GraphNotFound,
    GraphTokens,
    MailboxSlots,
)
from gateway.upstream.graph.client import WELL_KNOWN_FOLDERS
from gateway.upstream.pipeline import outcomes

if TYPE_CHECKING:
    from treq.client import HTTPClient
    from twisted.internet.interfaces import IConsumer

    from gateway.model import Account, Provider

log = Logger()

HIDDEN_CATEGORY = "POP3Deleted"
MEASURE_PER_LOGIN = 200
LIST_FIELDS = ("id", "receivedDateTime", "categories")
NOT_REMOVED = "some deleted messages were not removed"


def graph_uidl(message_id: str) -> str:
    return hashlib.sha256(message_id.encode("utf-8")).hexdigest()[:40]


@dataclass(frozen=True, slots=True)
class GraphMessage:
    id: str
    size: int
    categories: tuple[str, ...]

    @property
    def uidl(self) -> str:
        return graph_uidl(self.id)


class GraphMaildrop:
    """One device session on one Graph folder, seen through the `Maildrop` interface."""

    def __init__(
        self,
        mailbox: GraphMailbox,
        account: Account,
        messages: Sequence[GraphMessage],
        *,
        sizes: SizeMap | None,
        pool: HTTPConnectionPool | None = None,
    ) -> None:
        self.mailbox = mailbox
        self._account = account
        self.messages = tuple(messages)
        self._sizes = tuple(m.size for m in self.messages)
        self._store = sizes
        self._pool = pool
        self._retrieved: set[str] = set()
        self._closed = False

    @property
    def sizes(self) -> Sequence[int]:
        return self._sizes

    async def unique_ids(self) -> Sequence[str]:
        return [m.uidl for m in self.messages]

    # -- RETR / TOP

    async def retrieve(self, msg: int, sink: IConsumer, lines: int | None = None) -> None:
        if not 1 <= msg <= len(self.messages):
            raise NoSuchMessage(f"message {msg} is not in the snapshot of {len(self.messages)}")
        if lines is not None and lines < 0:
            raise ValueError("lines must not be negative")
        message = self.messages[msg - 1]
        crlf = CRLFLines()
        counter = WireCounter()
        started = False
        if lines is None:
            stuffer = DotStuffer()

            def on_data(chunk: bytes) -> bool:
                nonlocal started
                counter.feed(chunk)
                out = stuffer.feed(crlf.feed(chunk))
                if out:
                    started = True
                    sink.write(out)
                return True

        else:
            top = TopWriter(sink, lines, "Graph")

            def on_data(chunk: bytes) -> bool:
                nonlocal started
                started = True
                top.body_data(crlf.feed(chunk))
                return not top.done

        pump = BodyPump(on_data, sink)
        try:
            fetching = self.mailbox.message_value(message.id, pump)
            await timed_step("graph", self._account.provider, "retrieve", fetching)
        except GraphNotFound as e:
            if started:
                raise UpstreamLost(e.detail) from None
            raise NoSuchMessage(e.detail) from None
        except MaildropError as e:
            if started and not isinstance(e, UpstreamLost):
                raise UpstreamLost(e.detail) from None
            raise
        if lines is None:
            tail = stuffer.close()
            if tail:
                sink.write(tail)
            self._retrieved.add(message.id)
            self._check_size(message, counter.total())
        else:
            top.finish()

    def _check_size(self, message: GraphMessage, actual: int) -> None:
        if actual == message.size:
            return
        log.warn(
            "account {account}: Graph message {uidl} is {actual} octets, its measured "
            "size was {size}; the size is corrected for the next session",
            account=self._account.name,
            uidl=message.uidl,
            actual=actual,
            size=message.size,
        )
        if self._store is not None:
            recorded = self._store.record_sizes(self._account.name, {message.id: actual}, ())
            recorded.addErrback(_warn_store_failure)

    # -- QUIT

    async def commit(self, deleted: Collection[int]) -> None:
        numbers = sorted(set(deleted))
        for n in numbers:
            if not 1 <= n <= len(self.messages):
                self.abort()
                raise NoSuchMessage(f"cannot delete message {n}: not in the snapshot")
        doomed = [self.messages[n - 1] for n in numbers]
        policy = self._account.on_delete
        try:
            if self._account.mark_seen:
                gone = {m.id for m in doomed} if policy == "expunge" else set()
                await self._all(
                    self.mailbox.update(mid, {"isRead": True})
                    for mid in sorted(self._retrieved - gone)
                )
            if doomed:
                await self._apply_policy(doomed)
        except MaildropError as e:
            self.abort()
            raise UpstreamUnavailable(e.detail, NOT_REMOVED) from None
        self._close()

    async def _apply_policy(self, doomed: list[GraphMessage]) -> None:
        policy = self._account.on_delete
        if policy == "keep":
            await self._all(
                self.mailbox.update(m.id, {"categories": [*m.categories, HIDDEN_CATEGORY]})
                for m in doomed
            )
        elif policy == "move":
            target = self._account.move_to or "deleteditems"
            destination = (
                target.lower()
                if target.lower() in WELL_KNOWN_FOLDERS
                else await self.mailbox.folder_id(target)
            )
            await self._all(self.mailbox.move(m.id, destination) for m in doomed)
        else:
            await self._all(self._delete(m.id) for m in doomed)

    async def _delete(self, message: str) -> None:
        try:
            await self.mailbox.permanent_delete(message)
        except GraphNotFound:
            pass  # already gone: what the device asked for

    async def _all(self, steps: Any) -> None:
        """Run the steps side by side (the mailbox's four slots pace them);
        raise the first failure once all have ended."""
        running: list[Deferred[Any]] = [ensureDeferred(step) for step in steps]
        for result in await outcomes(running):
            if isinstance(result, Failure):
                result.raiseException()

    def abort(self) -> None:
        self.mailbox.cancel_all()
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        stats = self.mailbox.stats
        log.debug(
            "account {account}: {requests} Graph requests this session ({kinds})",
            account=self._account.name,
            requests=stats.requests,
            kinds=stats.by_kind,
        )
        if self._pool is not None:
            self._pool.closeCachedConnections()


# -- opening ---------------------------------------------------------------------------------


def graph_http_client(reactor: Any, provider: Provider) -> tuple[HTTPClient, HTTPConnectionPool]:
    """treq over an Agent that verifies TLS against the provider's trust roots,
    keeping up to four connections (the mailbox's concurrency) alive."""
    from treq.client import HTTPClient

    try:
        trust = load_trust_root(provider.ca_file)
    except TLSSetupError as e:
        raise UpstreamUnavailable(f"provider {provider.name}: {e}") from None
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 4
    agent = Agent(
        reactor,
        contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust),
        connectTimeout=provider.timeout,
        pool=pool,
    )
    return HTTPClient(agent), pool


async def open_graph_maildrop(
    account: Account,
    provider: Provider,
    *,
    reactor: Any,
    tokens: GraphTokens | None,
    sizes: SizeMap | None,
    http: HTTPClient | None = None,
    slots: MailboxSlots = SHARED_SLOTS,
    measure_limit: int = MEASURE_PER_LOGIN,
) -> GraphMaildrop:
    """Resolve the folder, list it and take the snapshot; raise a MaildropError.

    `http` lets tests pass their own treq client; by default one is built
    for the provider (and its connections are closed with the session).
    """
    if account.auth != "oauth2":
        raise UpstreamRejected(f'account {account.name}: Graph accounts need auth = "oauth2"')
    if tokens is None:
        raise UpstreamUnavailable(
            f"account {account.name} uses Graph but this process has no token manager"
        )
    graph_tokens = tokens

    async def token(force: bool) -> str:
        return await graph_tokens.graph_token(account, force_refresh=force)

    pool = None
    if http is None:
        http, pool = graph_http_client(reactor, provider)
    mailbox = GraphMailbox(
        GraphHTTP(
            base_url=provider.graph_url,
            mailbox=account.username,
            token=token,
            http=http,
            clock=reactor,
            timeout=provider.timeout,
            retry_budget=provider.timeout,
            slots=slots,
        )
    )
    try:
        listing = _snapshot(mailbox, account, sizes, measure_limit)
        messages = await timed_step("graph", provider.name, "open", listing)
    except BaseException:
        mailbox.cancel_all()
        if pool is not None:
            pool.closeCachedConnections()
        raise
    return GraphMaildrop(mailbox, account, messages, sizes=sizes, pool=pool)


async def _snapshot(
    mailbox: GraphMailbox, account: Account, store: SizeMap | None, limit: int
) -> list[GraphMessage]:
    folder = await mailbox.folder_id(account.folder)
    listed = await mailbox.list_messages(folder, LIST_FIELDS)
    # (receivedDateTime, listing position, id, categories): oldest first, and
    # messages received in the same second keep Graph's order.
    visible: list[tuple[str, int, str, tuple[str, ...]]] = []
    for index, item in enumerate(listed):
        mid = item.get("id")
        categories = tuple(str(c) for c in item.get("categories") or ())
        if isinstance(mid, str) and mid and HIDDEN_CATEGORY not in categories:
            visible.append((str(item.get("receivedDateTime") or ""), index, mid, categories))
    visible.sort()
    ids = [mid for _, _, mid, _ in visible]
    known = await _known(store, account, ids)
    measured = await _measure(mailbox, [mid for mid in ids if mid not in known][:limit])
    known.update(measured)
    if store is not None:
        try:
            await store.record_sizes(account.name, measured, ids)
        except (StateError, StateUnavailable) as e:
            log.warn("{error}", error=_store_error(e))
    held = sum(1 for mid in ids if mid not in known)
    if held:
        log.info(
            "account {account}: {held} Graph messages not measured yet; they appear "
            "in a later session",
            account=account.name,
            held=held,
        )
    return [GraphMessage(mid, known[mid], cats) for _, _, mid, cats in visible if mid in known]


async def _known(store: SizeMap | None, account: Account, ids: list[str]) -> dict[str, int]:
    if store is None:
        return {}
    try:
        return await store.known_sizes(account.name, ids)
    except (StateError, StateUnavailable) as e:
        log.warn("{error}; measuring again", error=_store_error(e))
        return {}


def _warn_store_failure(failure: Failure) -> None:
    error = failure.trap(StateError, StateUnavailable) and failure.value
    if isinstance(error, StateError | StateUnavailable):
        log.warn("{error}", error=_store_error(error))


def _store_error(error: StateError | StateUnavailable) -> str:
    """The embedded store's errors name it already; the database's do not."""
    return str(error) if isinstance(error, StateError) else f"Graph size store: {error}"


async def _measure(mailbox: GraphMailbox, ids: list[str]) -> dict[str, int]:
    """Exact wire sizes of `ids`, by streaming each `$value` once (four at a time)."""
    sizes: dict[str, int] = {}

    async def one(mid: str) -> None:
        counter = WireCounter()
        try:
            await mailbox.message_value(mid, BodyPump(counter.feed, None))
        except GraphNotFound:
            return  # deleted meanwhile: not in this snapshot
        sizes[mid] = counter.total()

    running: list[Deferred[Any]] = [ensureDeferred(one(mid)) for mid in ids]
    for result in await outcomes(running):
        if isinstance(result, Failure):
            result.raiseException()
    return sizes
