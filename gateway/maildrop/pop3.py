"""A maildrop backed by an upstream POP3 account.

The device's session maps one-to-one onto an upstream POP3 session: the
snapshot is the upstream's LIST at login, message numbers are the upstream's,
and RETR/TOP bodies stream through untouched (the upstream already speaks the
wire form the device needs). Deletions are only sent in `commit()`, right
before QUIT, so a device that drops mid-session deletes nothing: `abort()`
closes the upstream without QUIT and the upstream server rolls back.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.maildrop import NoSuchMessage, UpstreamUnavailable
from gateway.maildrop.opening import at_open
from gateway.timing import timed_step
from gateway.upstream.connection import EndpointFactory, hostname_endpoint
from gateway.upstream.credentials import note_succeeded
from gateway.upstream.pipeline import outcome, outcomes
from gateway.upstream.pop3 import (
    Expect,
    Listing,
    POP3Client,
    ServerError,
    open_session_then,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IConsumer

    from gateway.model import Account, Provider
    from gateway.upstream.credentials import TokenSource

log = Logger()


class POP3Maildrop:
    """One logged-in upstream POP3 session, seen through the `Maildrop` interface."""

    def __init__(
        self,
        client: POP3Client,
        sizes: Sequence[int],
        *,
        account: str = "",
        provider: str = "",
        uidl: Deferred[Listing | Failure] | None = None,
    ) -> None:
        self._provider = provider
        self._client = client
        self._sizes = tuple(sizes)
        self._account = account
        self._uids: tuple[str, ...] | None = None
        # The answer to a UIDL sent with the LIST at login (`open_pop3_maildrop`).
        self._uidl = uidl
        self._asked_uidl = False

    @property
    def sizes(self) -> Sequence[int]:
        return self._sizes

    @property
    def client(self) -> POP3Client:
        """The underlying connection, for a front end that splices after login."""
        return self._client

    async def unique_ids(self) -> Sequence[str]:
        if self._uids is None:
            if not self._asked_uidl:
                self._asked_uidl = True
                _wants_uidl.add(self._account)
            sent, self._uidl = self._uidl, None
            try:
                if sent is None:
                    listing: Listing = await self._client.command(b"UIDL", expect=Expect.MULTI)
                else:
                    answer = await sent
                    if isinstance(answer, Failure):
                        answer.raiseException()
                    listing = answer
            except ServerError as e:
                raise UpstreamUnavailable(
                    f"{self._client.peer} refused UIDL: {e.status.describe()}",
                    "the mailbox does not support unique ids",
                ) from None
            self._uids = parse_uidl(listing.body, len(self._sizes), self._client.peer)
        return self._uids

    async def retrieve(self, msg: int, sink: IConsumer, lines: int | None = None) -> None:
        if not 1 <= msg <= len(self._sizes):
            raise NoSuchMessage(f"message {msg} is not in the snapshot of {len(self._sizes)}")
        if lines is None:
            line = b"RETR %d" % msg
        else:
            if lines < 0:
                raise ValueError("lines must not be negative")
            line = b"TOP %d %d" % (msg, lines)
        try:
            await timed_step("pop3", self._provider, "retrieve", self._client.retrieve(line, sink))
        except ServerError as e:
            raise NoSuchMessage(f"{self._client.peer}: {e}") from None

    async def commit(self, deleted: Collection[int]) -> None:
        """DELE each marked message, then QUIT; raise unless QUIT answered +OK.

        A refused DELE (say, another session already expunged the message)
        does not stop the others: QUIT still commits them, and the device
        then gets an -ERR to its QUIT, which RFC 1939 reserves for "some
        deleted messages not removed". The DELEs and QUIT are pipelined when
        the server offers PIPELINING.
        """
        if not self._asked_uidl:
            _wants_uidl.discard(self._account)
        numbers = sorted(set(deleted))
        for n in numbers:
            if not 1 <= n <= len(self._sizes):
                self.abort()
                raise NoSuchMessage(f"cannot delete message {n}: not in the snapshot")
        steps: list[Deferred[Any]] = [
            self._client.command(b"DELE %d" % n, pipelinable=True) for n in numbers
        ]
        steps.append(self._client.quit())
        *dele_results, quit_result = await outcomes(steps)
        refused: list[str] = []
        for result, n in zip(dele_results, numbers, strict=True):
            if isinstance(result, Failure):
                if not isinstance(result.value, ServerError):
                    result.raiseException()
                refused.append(f"{n} ({result.value.status.describe()})")
        if isinstance(quit_result, Failure):
            if not isinstance(quit_result.value, ServerError):
                quit_result.raiseException()
            raise UpstreamUnavailable(
                f"{self._client.peer} answered QUIT with {quit_result.value.status.describe()}",
                "some deleted messages were not removed",
            )
        if refused:
            raise UpstreamUnavailable(
                f"{self._client.peer} refused DELE of {', '.join(refused)}",
                "some deleted messages were not removed",
            )

    def abort(self) -> None:
        self._client.abort()


def parse_list(body: bytes, peer: str) -> tuple[int, ...]:
    """Sizes from a LIST answer; messages must be numbered 1..n at login."""
    sizes: list[int] = []
    for raw in body.split(b"\r\n"):
        if not raw:
            continue
        words = raw.split()
        try:
            number, size = int(words[0]), int(words[1])
        except (IndexError, ValueError):
            raise UpstreamUnavailable(f"{peer} sent a malformed LIST line") from None
        if number != len(sizes) + 1 or size < 0:
            raise UpstreamUnavailable(f"{peer} sent LIST out of order at message {number}")
        sizes.append(size)
    return tuple(sizes)


def parse_uidl(body: bytes, count: int, peer: str) -> tuple[str, ...]:
    """UIDs from a UIDL answer, which must cover exactly messages 1..count."""
    uids: dict[int, str] = {}
    for raw in body.split(b"\r\n"):
        if not raw:
            continue
        words = raw.split()
        try:
            number, uid = int(words[0]), words[1].decode("ascii")
        except (IndexError, ValueError, UnicodeDecodeError):
            raise UpstreamUnavailable(f"{peer} sent a malformed UIDL line") from None
        uids[number] = uid
    if sorted(uids) != list(range(1, count + 1)):
        raise UpstreamUnavailable(f"{peer} sent UIDL for {len(uids)} messages, LIST had {count}")
    return tuple(uids[n] for n in range(1, count + 1))


async def open_pop3_maildrop(
    account: Account,
    provider: Provider,
    *,
    reactor: Any,
    endpoint_factory: EndpointFactory = hostname_endpoint,
    tokens: TokenSource | None = None,
) -> POP3Maildrop:
    """Connect, log in as `account` and take the LIST snapshot.

    `reactor` provides IReactorTime and, for the default endpoint, TCP and
    name resolution; `endpoint_factory(reactor, host, port, timeout)` lets
    tests connect in memory. Raises a `MaildropError`.
    """
    prefetch = account.name in _wants_uidl
    sent: list[Deferred[Any]] = []

    def take_snapshot(client: POP3Client) -> Deferred[Listing]:
        listing: Deferred[Listing] = client.command(b"LIST", expect=Expect.MULTI, pipelinable=True)
        if prefetch and "PIPELINING" in client.capabilities and "UIDL" in client.capabilities:
            uidl: Deferred[Listing] = client.command(b"UIDL", expect=Expect.MULTI, pipelinable=True)
            sent.append(Deferred.fromCoroutine(outcome(uidl)))
        return listing

    client, listed = await open_session_then(
        account,
        provider,
        reactor=reactor,
        endpoint_factory=endpoint_factory,
        tokens=tokens,
        then=take_snapshot,
    )
    assert listed is not None
    listing = timed_step("pop3", provider.name, "open", _list(client, listed))
    sizes = await at_open(client, listing, "LIST at login failed")
    note_succeeded(tokens, account)
    return POP3Maildrop(
        client,
        sizes,
        account=account.name,
        provider=provider.name,
        uidl=sent[0] if sent else None,
    )


# Accounts whose last session asked for UIDL: their next session sends it
# with the LIST at login (PIPELINING), which saves the device's UIDL a round
# trip upstream; an account whose session ends without UIDL leaves the set.
_wants_uidl: set[str] = set()


async def _list(client: POP3Client, sent: Deferred[Listing]) -> tuple[int, ...]:
    """LIST: the sizes of the snapshot, fixed for the session (RFC 1939)."""
    try:
        listing = await sent
    except ServerError as e:
        raise UpstreamUnavailable(f"{client.peer} refused LIST: {e.status.describe()}") from None
    return parse_list(listing.body, client.peer)
