"""The token manager: the gateway's `TokenSource`, and the service that keeps tokens fresh.

Device logins must never wait for an authorization server when it can be
avoided, and must never cause a second refresh while one is running, so:

- `access_token()` is a dictionary lookup plus a look at the store's stamp
  of the account (one `stat` of its file; with PostgreSQL a small query at
  most every couple of seconds) to notice tokens another process just wrote.
  Only when no usable token is left does a login wait for a refresh, and
  then it joins the one in flight.
- Refreshes are single-flight per account: logins, a forced refresh after an
  upstream 401, and the background timer all wait on the same request; and
  across processes, a refresh runs only under the account's refresh claim
  (`gateway.oauth.claims`), after re-reading the store: a process that waited
  for another's refresh uses the tokens it stored instead of refreshing, and
  always refreshes with the latest (rotated) refresh token.
- A background timer refreshes each account `refresh_margin` before its
  token expires, and at least every `idle_refresh_interval` for accounts with
  a refresh token (Microsoft expires refresh tokens unused for 90 days), and
  looks at the store at least once a minute.

Client-credentials and service-account accounts (app-only) need no admin at
a browser: their first login fetches a token, and the timer fetches the
next one before it expires, exactly like a refresh.

Failures are sorted once, here, into what devices see, by the classified
refusal (`gateway.oauth.refusal`) the token endpoint's answer carries:

- the provider refused the grant (``invalid_grant``, AADSTS700082 and
  friends: REAUTHORIZE) or the set-up (bad or expired secret, app not in the
  tenant, public/confidential mismatch: MISCONFIGURED): the account is marked
  ``needs_reauth`` or ``failed`` in the store with the provider's code and one
  sentence on what to do (visible in `gateway oauth status`), the same is
  logged, and devices get SYS/PERM with a short reason once no valid access
  token is left. No further refresh is tried for that authorisation until an
  admin re-authorises (app-only accounts: until `authorize` or a restart).
- network, timeouts, 5xx, 429: retried with exponential backoff (5 s up to
  5 min); devices get SYS/TEMP only if no valid access token is left.

Microsoft Graph is a second resource per account (`graph_token`): the same
refresh token mints it with Graph's scopes (one token request cannot mix
Graph and outlook.office.com scopes, AADSTS700022), app-only accounts get
Graph's `.default`. Each resource has its own single flight, and the two
take turns at the token endpoint (`AccountState.lock`), since each refresh
rotates the refresh token they share.

Helpers: `outcomes` (record-keeping), `schedule` (the timer's rules),
`account_state` (per-account memory), `store_sync`, `claims`.

The store is a `TokenBackend` (`gateway.oauth.backend`): the encrypted files
of the embedded state backend, or PostgreSQL's `gateway_oauth_tokens`. A
store that cannot be reached costs the logins that need a new token a
temporary failure (SYS/TEMP), like an unreachable token endpoint.

The clock and the HTTP client (`FormPoster`) are injected, so the unit tests
run all of this on a `MemoryReactorClock` with requests answered by hand.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.model import APP_ONLY_GRANTS, Account, Config
from gateway.oauth import outcomes
from gateway.oauth.account_state import (
    BACKOFF_FIRST,
    FORCED_REFRESH_MIN_AGE,
    GRAPH,
    MAIL,
    MAX_SLEEP,
    UNSAVED_RETRY,
    AccountState,
    Resource,
    skew,
    tokens_of,
)
from gateway.oauth.backend import TokenBackend, open_token_backend
from gateway.oauth.claims import claim_for, refreshed_elsewhere, settle
from gateway.oauth.endpoint import NoOAuthClient, TokenEndpoint
from gateway.oauth.errors import InsecureEndpoint, OAuthEndpointError, OAuthUnavailable
from gateway.oauth.grants import graph_scopes, request_tokens
from gateway.oauth.http import FormPoster, TreqPoster
from gateway.oauth.keys import GatewayKey, GatewayKeyError, load_key
from gateway.oauth.outcomes import (
    DEVICE_TEXT_BROKEN,
    DEVICE_TEXT_UNAUTHORISED,
    PermanentFailure,
)
from gateway.oauth.record import TokenRecord, TokenStoreError
from gateway.oauth.refusal import Refusal
from gateway.oauth.schedule import due, sleep_for
from gateway.oauth.startup_log import log_loaded
from gateway.oauth.status import TokenStatus, token_status
from gateway.oauth.store_sync import apply_loaded, reachable, sync_failed
from gateway.oauth.tokens import Tokens
from gateway.state import StateError
from gateway.state.backend import StateBackend, open_state_backend
from gateway.state.database import StateUnavailable
from gateway.upstream.errors import UpstreamRejected, UpstreamUnavailable

__all__ = ["BACKOFF_FIRST", "MAX_SLEEP", "TokenManager", "graph_scopes"]

log = Logger(namespace="gateway.oauth")


class TokenManager(Service):
    """`TokenSource` (and `GraphTokens`, `LoginOutcomes`) for every OAuth2
    account of one configuration."""

    name = "oauth-tokens"

    def __init__(
        self,
        config: Config,
        *,
        clock: IReactorTime,
        poster: FormPoster | None = None,
        reactor: Any = None,
        store: TokenBackend | None = None,
        environ: Mapping[str, str] = os.environ,
        state: StateBackend | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._reactor = reactor or clock
        self._poster = poster or TreqPoster(reactor or clock, clock=clock)
        self._store = store
        # Which state backend holds the tokens (`runtime.state`); None: built
        # from the configuration when the store is opened.
        self._state_backend = state
        self._environ = environ
        self._broken: str | None = None
        self._timer: IDelayedCall | None = None
        self._states: dict[str, AccountState] = {}
        for account in config.accounts.values():
            if account.auth == "oauth2":
                self._states[account.name] = self._new_state(account)

    def _new_state(self, account: Account) -> AccountState:
        provider = self._config.providers.get(account.provider)
        if provider is None:
            return AccountState(account, None, f"unknown provider {account.provider}")
        try:
            return AccountState(account, TokenEndpoint(provider, self._poster, self._clock))
        except NoOAuthClient as e:
            return AccountState(account, None, str(e))

    def reconfigure(self, config: Config) -> None:
        """A reloaded configuration (gateway.reload; same state_dir and key file):
        OAuth2 accounts added get a state, removed ones lose theirs, and an
        account whose entry or provider changed starts afresh from the store."""
        old, self._config = self._config, config
        states: dict[str, AccountState] = {}
        now = self._clock.seconds()
        for account in config.accounts.values():
            if account.auth != "oauth2":
                continue
            state = self._states.get(account.name)
            provider = config.providers.get(account.provider)
            if (
                state is None
                or state.account != account
                or (old.providers.get(account.provider) != provider)
            ):
                state = self._new_state(account)
                if self.running:
                    self._sync(state).addCallbacks(
                        self._started,
                        sync_failed,
                        callbackArgs=(state, now, False),
                        errbackArgs=(state,),
                    )
            states[account.name] = state
        self._states = states
        if self.running:
            self._reschedule()

    # -- opening the store (after twistd dropped privileges) -----------------

    def open(self) -> None:
        """Load the gateway key and open the store; idempotent, never raises.

        A problem is logged once and makes every OAuth2 login fail with
        SYS/PERM and the reason in the log; password accounts are unaffected.
        """
        if self._store is not None or self._broken is not None:
            return
        try:
            key: GatewayKey = load_key(
                self._config.oauth, self._config.state_dir, environ=self._environ
            )
            state = self._state_backend
            if state is None:
                state = self._state_backend = open_state_backend(self._config.state, self._reactor)
            self._store = open_token_backend(self._config, key, state, self._clock)
        except (GatewayKeyError, TokenStoreError, StateError) as e:
            self._broken = str(e)
            log.error(
                "oauth: token store unusable, OAuth2 accounts cannot log in: {reason}",
                reason=self._broken,
            )

    @property
    def store(self) -> TokenBackend | None:
        return self._store

    def _opened(self) -> TokenBackend:
        assert self._store is not None
        return self._store

    def startService(self) -> None:
        self.open()
        now = self._clock.seconds()
        for state in self._states.values():
            self._sync(state, quiet=True).addCallbacks(
                self._started,
                sync_failed,
                callbackArgs=(state, now, True),
                errbackArgs=(state,),
            )
        super().startService()
        self._reschedule()

    def _started(self, _: object, state: AccountState, now: float, app_only_retry: bool) -> None:
        """An account's record, first read: log it, block a refused lineage."""
        self._log_start(state, now)
        record = state.record
        # App-only accounts retry after a restart: their fix (consent, a
        # new secret) is made at the provider or in the configuration.
        if (
            record is not None
            and record.state == "needs_reauth"
            and not (app_only_retry and state.account.grant in APP_ONLY_GRANTS)
        ):
            state.blocked_lineage = record.lineage

    def stopService(self) -> Deferred[None] | None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        # Service.stopService only clears `running`; nothing to wait for.
        super().stopService()
        return None

    # -- TokenSource, GraphTokens -------------------------------------------------

    async def access_token(self, account: Account, *, force_refresh: bool = False) -> str:
        return await self._token(account, MAIL, force_refresh)

    async def graph_token(self, account: Account, *, force_refresh: bool = False) -> str:
        """A valid access token for Microsoft Graph (the Graph maildrop and relay)."""
        if account.grant == "service_account":
            raise UpstreamRejected(
                f"account {account.name}: Microsoft Graph needs a Microsoft provider; "
                "a Google service account has no Graph token"
            )
        return await self._token(account, GRAPH, force_refresh)

    async def _token(self, account: Account, resource: Resource, force_refresh: bool) -> str:
        state = await self._state_for(account)
        now = self._clock.seconds()
        record = state.record
        tokens = tokens_of(record, resource)
        usable = tokens is not None and tokens.valid_at(now, skew=skew(record, resource))
        if usable and not force_refresh:
            assert tokens is not None
            if due(state, self._config.oauth, now, resource):
                self._background_refresh(state, resource)
            return tokens.access_token.reveal()
        if usable and force_refresh and resource not in state.flights:
            assert tokens is not None
            # Only a refresh done here counts: a token an admin just stored
            # may well be the one the provider refused.
            refreshed = state.refreshed_at.get(resource)
            if refreshed is not None and now - refreshed < FORCED_REFRESH_MIN_AGE:
                return tokens.access_token.reveal()
        if resource not in state.flights:
            outcomes.check_refreshable(state, now, usable)
        try:
            fresh = await self._refresh(state, resource)
        except PermanentFailure:
            raise outcomes.rejected(state) from None
        except OAuthUnavailable as e:
            what = "a fresh token is needed" if usable else "no valid access token is left"
            raise UpstreamUnavailable(
                f"account {account.name}: {what} and the refresh failed: {e}"
            ) from None
        except (StateUnavailable, TokenStoreError) as e:
            what = "a fresh token is needed" if usable else "no valid access token is left"
            raise UpstreamUnavailable(
                f"account {account.name}: {what} and the token store is unavailable: {e}"
            ) from None
        return fresh.access_token.reveal()

    async def _state_for(self, account: Account) -> AccountState:
        state = self._states.get(account.name)
        if state is None:
            raise UpstreamRejected(f"account {account.name} is not an OAuth2 account")
        if state.setup_error is not None:
            raise UpstreamRejected(f"account {account.name}: {state.setup_error}")
        self.open()
        if self._broken is not None:
            raise UpstreamRejected(
                f"account {account.name}: token store unusable: {self._broken}",
                DEVICE_TEXT_BROKEN,
            )
        # A shared store's stamp may be a few seconds old; not when memory has
        # no usable token to offer (an authorisation just stored elsewhere).
        record = state.record
        stale = (
            record is None
            or record.state != "ok"
            or record.tokens is None
            or not record.tokens.valid_at(self._clock.seconds())
        )
        try:
            await self._sync(state, fresh=stale)
        except StateUnavailable as e:
            # The tokens in memory serve while they are valid; a login that
            # needs a new one fails as temporary (`_token`).
            sync_failed(Failure(), state)
            if not state.loaded:
                raise UpstreamUnavailable(
                    f"account {account.name}: the token store is unavailable: {e}"
                ) from None
        if state.unreadable is not None:
            raise UpstreamRejected(
                f"account {account.name}: {state.unreadable}; fix the key or run "
                f"`gateway oauth authorize {account.name}`",
                DEVICE_TEXT_BROKEN,
            )
        record = state.record
        if record is None and account.grant in APP_ONLY_GRANTS:
            record = await outcomes.first_app_only_record(self._opened(), state)
        if record is None:
            raise UpstreamRejected(
                f"account {account.name} is not authorised yet: run "
                f"`gateway oauth authorize {account.name}`",
                DEVICE_TEXT_UNAUTHORISED,
            )
        if record.state == "revoked":
            raise UpstreamRejected(
                f"account {account.name}: tokens revoked by the administrator; run "
                f"`gateway oauth authorize {account.name}` to authorise it again",
                DEVICE_TEXT_UNAUTHORISED,
            )
        return state

    # -- LoginOutcomes: what mail servers said to a login -------------------------

    def login_refused(self, account: Account, refusal: Refusal) -> None:
        """Record a mail server's refusal where `gateway oauth status` shows it
        (written only when the code changes)."""
        state = self._states.get(account.name)
        if state is None or self._store is None:
            return
        d = ensureDeferred(
            outcomes.login_refused(self._store, state, refusal, self._clock.seconds())
        )
        d.addErrback(sync_failed, state)

    def login_succeeded(self, account: Account) -> None:
        """Clear a refusal a login recorded; a memory check at every login."""
        state = self._states.get(account.name)
        if state is None or self._store is None:
            return
        ensureDeferred(outcomes.login_succeeded(self._store, state)).addErrback(sync_failed, state)

    # -- the store, as other processes change it --------------------------------

    def _sync(
        self, state: AccountState, *, fresh: bool = False, quiet: bool = False
    ) -> Deferred[None]:
        """Reload the account's record if the store's copy changed since we
        last read it. Fails with `StateUnavailable` if the store cannot be
        reached (memory is left as it was)."""
        store = self._store
        if store is None:
            return succeed(None)

        def compare(signature: object) -> Deferred[None] | None:
            reachable(state)
            if state.loaded and signature == state.signature:
                return None
            if state.unsaved is not None:
                # Our newer result is not stored yet: write it rather than
                # read the older one over it.
                return ensureDeferred(outcomes.save_unsaved(store, state))
            d = store.fetch(state.account.name)
            return d.addBoth(self._loaded, state, signature, quiet)

        return store.stamp(state.account.name, fresh=fresh).addCallback(compare)

    def _loaded(
        self,
        result: TokenRecord | Failure | None,
        state: AccountState,
        signature: object,
        quiet: bool,
    ) -> Failure | None:
        previous = apply_loaded(result, state, signature)
        if isinstance(previous, Failure):
            return previous
        record = state.record
        if record is None or previous is record:
            return None
        if previous is not None or (self.running and not quiet):
            log.info(
                "oauth account {account}: new tokens from the store (state {state})",
                account=state.account.name,
                state=record.state,
            )
        if self.running:
            self._reschedule()
        return None

    # -- refreshing --------------------------------------------------------------

    def _refresh(self, state: AccountState, resource: Resource) -> Deferred[Tokens]:
        """Join the resource's refresh in flight, or start one (single flight)."""
        waiter: Deferred[Tokens] = Deferred()
        flight = state.flights.get(resource)
        if flight is not None:
            flight.append(waiter)
            return waiter
        state.flights[resource] = [waiter]
        ensureDeferred(self._locked_refresh(state, resource)).addBoth(
            self._flight_done, state, resource
        )
        return waiter

    async def _locked_refresh(self, state: AccountState, resource: Resource) -> Tokens:
        # The other resource's refresh may be rotating the refresh token: wait
        # for it, then use the one it saved.
        await state.lock.acquire()
        try:
            before = tokens_of(state.record, resource)
            # Other processes: one refresh at a time per account, each
            # starting from what the last one stored.
            claim = await claim_for(state, self._opened(), self._clock)
            try:
                if state.unsaved is not None:
                    await outcomes.save_unsaved(self._opened(), state)
                await self._sync(state, fresh=True)
                theirs = refreshed_elsewhere(state, resource, before, self._clock.seconds())
                if theirs is not None:
                    state.refreshed_at[resource] = self._clock.seconds()
                    return theirs
                return await self._do_refresh(state, resource)
            finally:
                await settle(state, claim)
        finally:
            state.lock.release()

    def _flight_done(
        self, result: Tokens | Failure, state: AccountState, resource: Resource
    ) -> None:
        waiters = state.flights.pop(resource, [])
        for waiter in waiters:
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        if self.running:
            self._reschedule()

    def _background_refresh(self, state: AccountState, resource: Resource = MAIL) -> None:
        d = self._refresh(state, resource)
        # The refresh logs its own outcome; nobody else waits on this one.
        d.addErrback(lambda _f: None)

    async def _do_refresh(self, state: AccountState, resource: Resource) -> Tokens:
        store, record, endpoint = self._opened(), state.record, state.endpoint
        assert record is not None and endpoint is not None
        if state.blocked_lineage == record.lineage:
            # The other resource's refresh, just before, was refused.
            raise PermanentFailure()
        name = state.account.name
        lineage = record.lineage
        state.refresh_requests += 1
        try:
            tokens = await request_tokens(endpoint, record, state.account, resource)
        except (OAuthEndpointError, NoOAuthClient, InsecureEndpoint) as e:
            state.refresh_outcomes["refused"] += 1
            await outcomes.permanent_failure(store, state, lineage, e, self._clock.seconds())
            raise PermanentFailure() from None
        except OAuthUnavailable as e:
            state.refresh_outcomes["failed"] += 1
            await outcomes.transient_failure(store, state, lineage, e, self._clock.seconds())
            raise
        except Exception as e:
            state.refresh_outcomes["failed"] += 1
            # A bug must cost a retry, not the device session or the timer.
            log.failure("oauth account {account}: unexpected error while refreshing", account=name)
            failure = OAuthUnavailable(f"unexpected {type(e).__name__}")
            await outcomes.transient_failure(store, state, lineage, failure, self._clock.seconds())
            raise failure from None
        now = self._clock.seconds()
        previous = record.tokens.refresh_token if record.tokens is not None else None
        rotated = previous is not None and tokens.refresh_token not in (None, previous)
        # Stored (a rotated refresh token committed) before anyone uses it.
        if resource == GRAPH:
            saved = await outcomes.save(
                store, state, lineage, lambda c: c.graph_refreshed(tokens, now)
            )
        else:
            saved = await outcomes.save(store, state, lineage, lambda c: c.refreshed(tokens, now))
        state.failures = 0
        state.retry_at = 0.0
        state.refreshed_at[resource] = now
        state.refresh_outcomes["ok"] += 1
        if saved is not None and saved.lineage != lineage:
            # An admin re-authorised while this refresh ran: theirs wins.
            log.info(
                "oauth account {account}: re-authorised meanwhile; refresh discarded", account=name
            )
            mine = tokens_of(saved, resource)
            if mine is not None:
                return mine
        log.info(
            "oauth account {account}: {what} {how}, valid for {lifetime:.0f} s{rotated}",
            account=name,
            what="Graph access token" if resource == GRAPH else "access token",
            how="fetched (app-only)" if record.grant in APP_ONLY_GRANTS else "refreshed",
            lifetime=tokens.expires_at - now,
            rotated=", refresh token rotated and saved" if rotated else "",
        )
        return tokens

    # -- the background timer -------------------------------------------------------

    def _reschedule(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        delay = sleep_for(self._states.values(), self._config.oauth, self._clock.seconds())
        if any(state.unsaved is not None for state in self._states.values()):
            delay = min(delay, UNSAVED_RETRY)
        self._timer = self._clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        for state in self._states.values():
            self._sync(state).addCallbacks(
                self._tick_account, sync_failed, callbackArgs=(state,), errbackArgs=(state,)
            )
        if self.running and self._timer is None:
            self._reschedule()

    def _tick_account(self, _: object, state: AccountState) -> None:
        if state.unsaved is not None and self._store is not None:
            ensureDeferred(outcomes.save_unsaved(self._store, state))
        if due(state, self._config.oauth, self._clock.seconds(), MAIL):
            self._background_refresh(state)

    # -- reporting ----------------------------------------------------------------------

    @property
    def store_problem(self) -> str | None:
        """Why the token store cannot be used, None if it can (or is not open yet)."""
        return self._broken

    def statuses(self) -> list[TokenStatus]:
        """Every OAuth2 account's state, from memory only (a metrics scrape)."""
        return [
            token_status(
                name,
                state.record,
                state.refresh_outcomes,
                unusable=state.setup_error is not None or self._broken is not None,
                unreadable=state.unreadable is not None,
            )
            for name, state in self._states.items()
        ]

    def refresh_requests(self, account: str) -> int:
        """Refresh requests sent for `account` by this process (tests, benchmarks)."""
        return self._states[account].refresh_requests

    def _log_start(self, state: AccountState, now: float) -> None:
        if state.setup_error is None and (self._broken is not None or state.unreadable):
            return  # already logged, with the reason
        log_loaded(log, state.account, state.record, state.setup_error, now)
