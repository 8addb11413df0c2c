"""One logged-in upstream IMAP connection kept per account between device sessions.

A printer polling each minute would otherwise cost its provider a TLS
handshake and a login every minute (1,440 a day; Microsoft and Google throttle
logins, Gmail caps an account at 15 connections). The keeper logs in once,
EXAMINEs the folder (read-only), keeps the last snapshot and watches the
folder between sessions: IDLE (RFC 2177) where offered, else a NOOP now and
then, which also finds a dead connection early.

Freshness (RFC 1939: the maildrop is the folder at the device's login). A
change notice (EXISTS, EXPUNGE, VANISHED, a flag update) says the folder
changed, but its absence proves nothing: a server pushes IDLE news when it
notices the change (Dovecot: inotify, or a 30 s fallback), not when the
delivery is committed, so a message delivered a moment before the device's
login may not have been announced yet. Each device login therefore costs one
round trip, DONE + NOOP pipelined, sent after the device's PASS: NOOP makes
the server sync the folder (RFC 3501 6.1.2; Dovecot syncs the index, maildir
included) and report every change committed before it as untagged responses
before its tagged OK. The cached snapshot is used only when no change notice
arrived since it was taken (counted by the client outside SELECT/EXAMINE,
including during the session's own commands) and none came with that NOOP;
otherwise it is taken again (EXAMINE + UID FETCH 1:*, pipelined, one more
round trip). A delivery after the NOOP belongs to the next session, as a
delivery after today's UID FETCH does. A change notice that arrives while a
snapshot is being taken makes the next login take it again.

Sessions: [IN-USE] lets one device session at a time use an account, so the
kept connection serves one session at a time (a second open while one is in
use gets a connection of its own, as before). A session that QUITs hands the
connection back (`IMAPMaildrop.commit` without LOGOUT; if it wrote, the folder
is EXAMINEd again and the next login takes a new snapshot); a session dropped
at rest hands it back unchanged; a failed QUIT or a drop mid-command drops it.

Reconnecting: a kept connection that broke (a kick, a BYE, a timeout) is
found at the next login (its NOOP fails or it is already gone) and replaced by
a new login in the same device login, so the device notices nothing. OAuth2
logins are redone after `OAUTH_RELOGIN_AFTER` seconds (Microsoft ends an IMAP
session whose token expired and wants a new AUTHENTICATE), with a fresh token
from the token source; a changed account or provider (SIGHUP) logs in again.
The connection is logged out `keep_idle` seconds after the last session ended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.maildrop import MaildropError
from gateway.maildrop.imap import IMAPMaildrop, open_imap_maildrop
from gateway.maildrop.imap_snapshot import Snapshot, take_snapshot
from gateway.maildrop.opening import at_open
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
    open_session,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

    from gateway.maildrop.uidl_map import UIDLMap
    from gateway.model import Account, Provider
    from gateway.upstream.credentials import TokenSource

log = Logger(namespace="gateway.maildrop.imap_keeper")

# OAuth2: log in again with a fresh token after this long. Access tokens of
# Microsoft and Google live 60-90 minutes; the token source hands out one
# with time left, and a kept login older than this is redone at the next poll.
OAUTH_RELOGIN_AFTER = 40 * 60.0
# RFC 2177: a client should end IDLE and start it again within 29 minutes.
IDLE_RENEW = 25 * 60.0
# Without IDLE: a NOOP this often while no session runs (keeps the connection
# alive and finds a broken one before the next device waits for it).
NOOP_INTERVAL = 120.0


@dataclass(eq=False)
class _Kept:
    account: Account
    provider: Provider
    client: IMAPClient
    logged_in_at: float
    snapshot: Snapshot | None = None
    # `client.changes` when `snapshot` was taken.
    seen_changes: int = 0
    in_use: bool = False
    close_call: IDelayedCall | None = None
    watch_call: IDelayedCall | None = None
    idle: Deferred[Any] | None = field(default=None, repr=False)


class IMAPKeeper:
    """The kept connections of one gateway process, by account name."""

    def __init__(
        self,
        reactor: Any,
        *,
        endpoint_factory: EndpointFactory = hostname_endpoint,
        oauth_relogin_after: float = OAUTH_RELOGIN_AFTER,
    ) -> None:
        self._reactor = reactor
        self._endpoint_factory = endpoint_factory
        self._relogin_after = oauth_relogin_after
        self._kept: dict[str, _Kept] = {}
        # Upstream logins made through the keeper, by account name.
        self.logins: dict[str, int] = {}

    def kept(self, account: str) -> IMAPClient | None:
        """The connection kept for `account`, if any (for tests and the admin)."""
        kept = self._kept.get(account)
        return kept.client if kept is not None else None

    async def open(
        self,
        account: Account,
        provider: Provider,
        *,
        uid_store: UIDLMap | None,
        tokens: TokenSource | None = None,
    ) -> IMAPMaildrop:
        """A maildrop for a device session: on the kept connection when it is
        fit, else on a new login that is kept afterwards. Raises a `MaildropError`."""
        kept = self._kept.get(account.name)
        if kept is not None and kept.in_use:
            return await open_imap_maildrop(
                account,
                provider,
                reactor=self._reactor,
                uid_store=uid_store,
                tokens=tokens,
                endpoint_factory=self._endpoint_factory,
            )
        snapshot: Snapshot | None = None
        why = "first session"
        if kept is not None:
            why = self._unfit(kept, account, provider)
            if why:
                self._discard(kept, logout=True)
            else:
                kept.in_use = True
                try:
                    snapshot = await self._refresh(kept)
                except (MaildropError, ServerError, IMAPProtocolError) as e:
                    why = f"the kept connection failed: {e}"
                    log.info(
                        "account {account}: {why}; logging in again", account=account.name, why=why
                    )
                    self._discard(kept, logout=False)
        if snapshot is None or kept is None or kept.client.ended:
            kept, snapshot = await self._login(account, provider, why, tokens)
        return IMAPMaildrop(
            kept.client,
            account,
            snapshot,
            uid_store=uid_store,
            release=partial(self._released, kept),
        )

    def close_all(self, grace: float = 2.0) -> Deferred[None]:
        """LOGOUT every kept connection not in use (the gateway stops). Fires
        once they have closed, or after `grace` seconds: the reactor drops
        every socket when it stops, so LOGOUT must be sent before that."""
        closing = [
            self._discard(kept, logout=True)
            for kept in list(self._kept.values())
            if not kept.in_use
        ]
        done: Deferred[Any] = DeferredList(
            [d for d in closing if d is not None], consumeErrors=True
        )
        done.addTimeout(grace, self._reactor)
        return done.addBoth(lambda _: None)

    # -- logging in and looking

    def _unfit(self, kept: _Kept, account: Account, provider: Provider) -> str:
        """Why the kept connection cannot serve this login ("" if it can)."""
        if kept.client.ended:
            return "the kept connection was closed"
        if kept.account != account or kept.provider != provider:
            return "the account's configuration changed"
        age = self._reactor.seconds() - kept.logged_in_at
        if account.auth == "oauth2" and age >= self._relogin_after:
            return f"the kept login is {age:.0f} s old; its token expires soon"
        return ""

    async def _login(
        self, account: Account, provider: Provider, why: str, tokens: TokenSource | None
    ) -> tuple[_Kept, Snapshot]:
        client = await open_session(
            account,
            provider,
            reactor=self._reactor,
            endpoint_factory=self._endpoint_factory,
            tokens=tokens,
            why=why,
        )
        self.logins[account.name] = self.logins.get(account.name, 0) + 1
        kept = _Kept(account, provider, client, self._reactor.seconds(), in_use=True)
        try:
            opening = timed_step("imap", provider.name, "open", self._snapshot(kept))
            snapshot = await at_open(client, opening, "snapshot at login failed")
        except MaildropError as e:
            note_refused(tokens, account, e)
            raise
        note_succeeded(tokens, account)
        old = self._kept.get(account.name)
        if old is not None and old is not kept:
            self._discard(old, logout=True)
        self._kept[account.name] = kept
        return kept, snapshot

    async def _snapshot(self, kept: _Kept) -> Snapshot:
        before = kept.client.changes
        snapshot = await take_snapshot(kept.client, kept.account.folder)
        # A change notice during the snapshot may or may not be in it: the
        # next login takes it again (client.changes is past `before` then).
        kept.snapshot, kept.seen_changes = snapshot, before
        return snapshot

    async def _refresh(self, kept: _Kept) -> Snapshot:
        """The folder now: DONE + NOOP in one round trip, and the cached
        snapshot unless something changed (see the module doc)."""
        self._cancel_timers(kept)
        client = kept.client
        client.done()
        noop = client.command(b"NOOP", pipelinable=True, on_untagged=_ignore)
        await noop
        if kept.snapshot is not None and client.changes == kept.seen_changes:
            return kept.snapshot
        return await timed_step("imap", kept.provider.name, "open", self._snapshot(kept))

    # -- between sessions

    def _released(self, kept: _Kept, wrote: bool | None) -> None:
        kept.in_use = False
        if wrote is None or kept.client.ended or self._kept.get(kept.account.name) is not kept:
            self._discard(kept, logout=False)
            return
        if wrote:
            # QUIT selected the folder read-write and changed it: back to
            # read-only, and the next login takes a new snapshot.
            kept.snapshot = None
            mailbox = astring(encode_mailbox(kept.account.folder))
            examine = kept.client.command(b"EXAMINE", mailbox, on_untagged=_ignore)
            examine.addErrback(self._watch_failed, kept)
        self._watch(kept)
        kept.close_call = self._reactor.callLater(kept.account.keep_idle, self._expire, kept)

    def _watch(self, kept: _Kept) -> None:
        client = kept.client
        if client.ended:
            return
        if "IDLE" in client.capabilities:
            kept.idle = client.idle(_ignore)
            kept.idle.addErrback(self._watch_failed, kept)
            kept.watch_call = self._reactor.callLater(IDLE_RENEW, self._renew_idle, kept)
        else:
            kept.watch_call = self._reactor.callLater(NOOP_INTERVAL, self._poll, kept)

    def _renew_idle(self, kept: _Kept) -> None:
        kept.watch_call = None
        kept.client.done()
        self._watch(kept)

    def _poll(self, kept: _Kept) -> None:
        kept.watch_call = None
        noop = kept.client.command(b"NOOP", on_untagged=_ignore)
        noop.addErrback(self._watch_failed, kept)
        self._watch(kept)

    def _watch_failed(self, failure: Failure, kept: _Kept) -> None:
        """A command while no session ran failed: the connection is not worth keeping."""
        if kept.in_use:
            return None  # the session's own command fails too, and says why
        log.info(
            "account {account}: kept upstream connection lost while idle: {error}",
            account=kept.account.name,
            error=failure.getErrorMessage(),
        )
        self._discard(kept, logout=False)
        return None

    def _expire(self, kept: _Kept) -> None:
        kept.close_call = None
        if not kept.in_use:
            log.info(
                "account {account}: no device session for {idle:g} s; "
                "logging out of the kept upstream connection",
                account=kept.account.name,
                idle=kept.account.keep_idle,
            )
            self._discard(kept, logout=True)

    def _cancel_timers(self, kept: _Kept) -> None:
        for call in (kept.close_call, kept.watch_call):
            if call is not None and call.active():
                call.cancel()
        kept.close_call = kept.watch_call = None

    def _discard(self, kept: _Kept, *, logout: bool) -> Deferred[None] | None:
        """Forget `kept` and end its connection; with `logout`, politely, and
        return when it has closed."""
        self._cancel_timers(kept)
        if self._kept.get(kept.account.name) is kept:
            del self._kept[kept.account.name]
        client = kept.client
        if client.ended:
            return None
        if not logout or kept.in_use:
            client.abort("the kept connection was discarded")
            return None
        client.done()
        bye = client.logout()
        bye.addErrback(lambda _: client.abort("LOGOUT failed"))
        return client.when_closed()


def _ignore(response: Response) -> None:
    """Untagged answers to NOOP/IDLE/EXAMINE: the client counts the changes."""
