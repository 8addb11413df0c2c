"""The token manager: the gateway's `TokenSource`, and the service that keeps tokens fresh.

Device logins must never wait for an authorization server when it can be
avoided, and must never cause a second refresh while one is running, so:

- `access_token()` is a dictionary lookup plus one `stat` of the account's
  store file (to notice tokens a `gateway oauth authorize` in another process
  just wrote). Only when no usable token is left does a login wait for a
  refresh, and then it joins the one in flight.
- Refreshes are single-flight per account: logins, a forced refresh after an
  upstream 401, and the background timer all wait on the same request.
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

The clock and the HTTP client (`FormPoster`) are injected, so the unit tests
run all of this on a `MemoryReactorClock` with requests answered by hand.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.model import APP_ONLY_GRANTS, Account, Config
from gateway.oauth.endpoint import NoOAuthClient, TokenEndpoint
from gateway.oauth.errors import (
    InsecureEndpoint,
    OAuthEndpointError,
    OAuthUnavailable,
    refusal_of,
)
from gateway.oauth.http import FormPoster, TreqPoster
from gateway.oauth.keys import GatewayKey, GatewayKeyError, load_key
from gateway.oauth.refusal import Refusal, RefusalKind, network_refusal
from gateway.oauth.startup_log import log_loaded
from gateway.oauth.status import TokenStatus, token_status
from gateway.oauth.store import (
    Signature,
    State,
    StoreUnreadable,
    TokenRecord,
    TokenStore,
    TokenStoreError,
)
from gateway.oauth.tokens import Tokens
from gateway.state import StateError
from gateway.upstream.errors import UpstreamRejected, UpstreamUnavailable

log = Logger(namespace="gateway.oauth")

# A token must have this long left (or a quarter of its lifetime, if shorter)
# to be handed to a login, so it does not expire between SASL steps.
EXPIRY_SKEW = 30.0
# A forced refresh right after a refresh would only repeat it: a login whose
# token was refused while another login's refresh ran takes the new token.
FORCED_REFRESH_MIN_AGE = 10.0
BACKOFF_FIRST = 5.0
BACKOFF_MAX = 300.0
# The background timer looks at the store at least this often, so a token
# written by `gateway oauth authorize` is seen even with no device activity.
MAX_SLEEP = 60.0

DEVICE_TEXT_REAUTH = "mailbox authorisation expired, ask the administrator"
DEVICE_TEXT_UNAUTHORISED = "mailbox not authorised yet, ask the administrator"
DEVICE_TEXT_BROKEN = "gateway cannot use its stored authorisation, ask the administrator"
DEVICE_TEXT_MISCONFIGURED = "mailbox access misconfigured, ask the administrator"


class _PermanentFailure(Exception):
    """A refresh the provider refused; only an admin can help."""


@dataclass(eq=False)
class _AccountState:
    """What the manager keeps in memory for one OAuth2 account."""

    account: Account
    endpoint: TokenEndpoint | None
    setup_error: str | None = None
    record: TokenRecord | None = None
    signature: Signature | None = None
    loaded: bool = False
    unreadable: str | None = None
    # The lineage whose refresh the provider refused in this process.
    blocked_lineage: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    waiters: list[Deferred[Tokens]] | None = None
    # When this process last completed a refresh for the account.
    refreshed_at: float | None = None
    refresh_requests: int = 0
    # Refreshes finished by this process, by outcome ("ok", "failed", "refused").
    refresh_outcomes: Counter[str] = field(default_factory=Counter)


class TokenManager(Service):
    """`TokenSource` for every OAuth2 account of one configuration."""

    name = "oauth-tokens"

    def __init__(
        self,
        config: Config,
        *,
        clock: IReactorTime,
        poster: FormPoster | None = None,
        reactor: Any = None,
        store: TokenStore | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self._config = config
        self._clock = clock
        self._poster = poster or TreqPoster(reactor or clock, clock=clock)
        self._store = store
        self._environ = environ
        self._broken: str | None = None
        self._timer: IDelayedCall | None = None
        self._states: dict[str, _AccountState] = {}
        for account in config.accounts.values():
            if account.auth == "oauth2":
                self._states[account.name] = self._new_state(account)

    def _new_state(self, account: Account) -> _AccountState:
        provider = self._config.providers.get(account.provider)
        if provider is None:
            return _AccountState(account, None, f"unknown provider {account.provider}")
        try:
            return _AccountState(account, TokenEndpoint(provider, self._poster, self._clock))
        except NoOAuthClient as e:
            return _AccountState(account, None, str(e))

    def reconfigure(self, config: Config) -> None:
        """A reloaded configuration (gateway.reload; same state_dir and key file):
        OAuth2 accounts added get a state, removed ones lose theirs, and an
        account whose entry or provider changed starts afresh from the store."""
        old, self._config = self._config, config
        states: dict[str, _AccountState] = {}
        now = self._clock.seconds()
        for account in config.accounts.values():
            if account.auth != "oauth2":
                continue
            state = self._states.get(account.name)
            provider = config.providers.get(account.provider)
            if state is None or state.account != account or (
                old.providers.get(account.provider) != provider
            ):
                state = self._new_state(account)
                if self.running:
                    self._sync(state)
                    self._log_start(state, now)
                    if state.record is not None and state.record.state == "needs_reauth":
                        state.blocked_lineage = state.record.lineage
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
            self._store = TokenStore.open(self._config.state_dir, key)
        except (GatewayKeyError, TokenStoreError, StateError) as e:
            self._broken = str(e)
            log.error(
                "oauth: token store unusable, OAuth2 accounts cannot log in: {reason}",
                reason=self._broken,
            )

    @property
    def store(self) -> TokenStore | None:
        return self._store

    def startService(self) -> None:
        self.open()
        now = self._clock.seconds()
        for state in self._states.values():
            self._sync(state)
            self._log_start(state, now)
            record = state.record
            # App-only accounts retry after a restart: their fix (consent, a
            # new secret) is made at the provider or in the configuration.
            if (
                record is not None
                and record.state == "needs_reauth"
                and state.account.grant not in APP_ONLY_GRANTS
            ):
                state.blocked_lineage = record.lineage
        super().startService()
        self._reschedule()

    def stopService(self) -> Deferred[None] | None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        # Service.stopService only clears `running`; nothing to wait for.
        super().stopService()
        return None

    # -- TokenSource -------------------------------------------------------------

    async def access_token(self, account: Account, *, force_refresh: bool = False) -> str:
        state = self._state_for(account)
        now = self._clock.seconds()
        record = state.record
        tokens = record.tokens if record is not None else None
        usable = tokens is not None and tokens.valid_at(now, skew=_skew(record))
        if usable and not force_refresh:
            assert tokens is not None
            if self._due(state, now):
                self._background_refresh(state)
            return tokens.access_token.reveal()
        if usable and force_refresh and state.waiters is None:
            assert tokens is not None
            # Only a refresh done here counts: a token an admin just stored
            # may well be the one the provider refused.
            if state.refreshed_at is not None and now - state.refreshed_at < FORCED_REFRESH_MIN_AGE:
                return tokens.access_token.reveal()
        if state.waiters is None:
            self._check_refreshable(state, now, usable)
        try:
            fresh = await self._refresh(state)
        except _PermanentFailure:
            raise self._rejected(state) from None
        except OAuthUnavailable as e:
            what = "a fresh token is needed" if usable else "no valid access token is left"
            raise UpstreamUnavailable(
                f"account {account.name}: {what} and the refresh failed: {e}"
            ) from None
        return fresh.access_token.reveal()

    def _state_for(self, account: Account) -> _AccountState:
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
        self._sync(state)
        if state.unreadable is not None:
            raise UpstreamRejected(
                f"account {account.name}: {state.unreadable}; fix the key or run "
                f"`gateway oauth authorize {account.name}`",
                DEVICE_TEXT_BROKEN,
            )
        record = state.record
        if record is None and account.grant in APP_ONLY_GRANTS:
            record = self._first_app_only_record(state)
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

    def _first_app_only_record(self, state: _AccountState) -> TokenRecord | None:
        """Start an app-only account's record, so its first token is fetched
        like any refresh (single flight, backoff, refusals recorded)."""
        account, store = state.account, self._store
        assert account.grant is not None and store is not None
        fresh = TokenRecord.app_only(account.name, account.grant)
        try:
            state.record = store.update(account.name, lambda current: current or fresh)
            state.signature = store.signature(account.name)
        except (StoreUnreadable, TokenStoreError) as e:
            log.error(
                "oauth account {account}: cannot save to the token store ({reason}); "
                "keeping the result in memory only",
                account=account.name,
                reason=str(e),
            )
            state.record = fresh
        return state.record

    def _check_refreshable(self, state: _AccountState, now: float, usable: bool) -> None:
        """Raise what the device should see when no refresh may be started now."""
        record = state.record
        assert record is not None
        if state.blocked_lineage == record.lineage:
            raise self._rejected(state)
        if now < state.retry_at:
            raise UpstreamUnavailable(
                f"account {state.account.name}: "
                + ("the upstream refused the token and " if usable else "no valid access token; ")
                + f"refresh is backing off after: {record.last_error or 'a failure'}"
            )

    def _rejected(self, state: _AccountState) -> UpstreamRejected:
        record = state.record
        reason = record.last_error if record is not None else None
        name = state.account.name
        if record is not None and record.error_kind == RefusalKind.MISCONFIGURED.value:
            return UpstreamRejected(
                f"account {name}: the provider refused the gateway's set-up "
                f"({record.error_code or reason}): {record.error_advice or 'check the provider'}",
                DEVICE_TEXT_MISCONFIGURED,
            )
        advice = (
            record.error_advice
            if record is not None and record.error_advice
            else f"run `gateway oauth authorize {name}`"
        )
        return UpstreamRejected(
            f"account {name} needs re-authorisation ({reason or 'refresh refused'}): {advice}",
            DEVICE_TEXT_REAUTH,
        )

    # -- the store, as other processes change it --------------------------------

    def _sync(self, state: _AccountState) -> None:
        """Reload the account's record if its file changed since we last read it."""
        store = self._store
        if store is None:
            return
        name = state.account.name
        signature = store.signature(name)
        if state.loaded and signature == state.signature:
            return
        state.loaded = True
        state.signature = signature
        previous = state.record
        try:
            state.record = store.load(name)
            state.unreadable = None
        except StoreUnreadable as e:
            if state.unreadable != e.reason:
                log.error("oauth account {account}: {reason}", account=name, reason=e.reason)
            state.record = None
            state.unreadable = e.reason
            return
        record = state.record
        if record is not None and (previous is None or previous.lineage != record.lineage):
            # A new authorisation (or a revocation) from `gateway oauth`.
            state.failures = 0
            state.retry_at = 0.0
            state.refreshed_at = None
            if previous is not None or self.running:
                log.info(
                    "oauth account {account}: new tokens from the store (state {state})",
                    account=name,
                    state=record.state,
                )
            if self.running:
                self._reschedule()

    # -- refreshing --------------------------------------------------------------

    def _refresh(self, state: _AccountState) -> Deferred[Tokens]:
        """Join the account's refresh in flight, or start one (single flight)."""
        waiter: Deferred[Tokens] = Deferred()
        if state.waiters is not None:
            state.waiters.append(waiter)
            return waiter
        state.waiters = [waiter]
        ensureDeferred(self._do_refresh(state)).addBoth(self._flight_done, state)
        return waiter

    def _flight_done(self, result: Tokens | Failure, state: _AccountState) -> None:
        waiters, state.waiters = state.waiters or [], None
        for waiter in waiters:
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        if self.running:
            self._reschedule()

    def _background_refresh(self, state: _AccountState) -> None:
        d = self._refresh(state)
        # The refresh logs its own outcome; nobody else waits on this one.
        d.addErrback(lambda _f: None)

    async def _do_refresh(self, state: _AccountState) -> Tokens:
        store, record, endpoint = self._store, state.record, state.endpoint
        assert store is not None and record is not None and endpoint is not None
        name = state.account.name
        lineage = record.lineage
        state.refresh_requests += 1
        try:
            tokens = await self._request(endpoint, record, state.account)
        except (OAuthEndpointError, NoOAuthClient, InsecureEndpoint) as e:
            state.refresh_outcomes["refused"] += 1
            self._permanent_failure(state, lineage, e)
            raise _PermanentFailure() from None
        except OAuthUnavailable as e:
            state.refresh_outcomes["failed"] += 1
            self._transient_failure(state, lineage, e)
            raise
        except Exception as e:
            state.refresh_outcomes["failed"] += 1
            # A bug must cost a retry, not the device session or the timer.
            log.failure("oauth account {account}: unexpected error while refreshing", account=name)
            failure = OAuthUnavailable(f"unexpected {type(e).__name__}")
            self._transient_failure(state, lineage, failure)
            raise failure from None
        now = self._clock.seconds()
        rotated = (
            tokens.refresh_token is not None
            and record.tokens is not None
            and tokens.refresh_token != record.tokens.refresh_token
        )
        saved = self._save(state, lineage, lambda current: current.refreshed(tokens, now), now=now)
        state.failures = 0
        state.retry_at = 0.0
        state.refreshed_at = now
        state.refresh_outcomes["ok"] += 1
        if saved is not None and saved.lineage != lineage:
            # An admin re-authorised while this refresh ran: theirs wins.
            log.info(
                "oauth account {account}: re-authorised meanwhile; refresh discarded", account=name
            )
            if saved.tokens is not None:
                return saved.tokens
        log.info(
            "oauth account {account}: access token {how}, valid for {lifetime:.0f} s{rotated}",
            account=name,
            how="fetched (app-only)" if record.grant in APP_ONLY_GRANTS else "refreshed",
            lifetime=tokens.expires_at - now,
            rotated=", refresh token rotated and saved" if rotated else "",
        )
        return tokens

    async def _request(
        self, endpoint: TokenEndpoint, record: TokenRecord, account: Account
    ) -> Tokens:
        if record.grant == "client_credentials":
            return await endpoint.client_credentials()
        if record.grant == "service_account":
            return await endpoint.service_account(account.username)
        refresh = record.tokens.refresh_token if record.tokens is not None else None
        if refresh is None:
            raise OAuthEndpointError(
                "no_refresh_token",
                "the provider issued no refresh token (offline_access scope missing?)",
                refusal=Refusal(
                    RefusalKind.MISCONFIGURED,
                    "no_refresh_token",
                    "the provider issued no refresh token: add offline_access to the "
                    "scopes (Google: access_type=offline) and authorize ACCOUNT again",
                ),
            )
        return await endpoint.refresh(refresh, record.grant)

    def _permanent_failure(self, state: _AccountState, lineage: str, error: Exception) -> None:
        name = state.account.name
        now = self._clock.seconds()
        refusal = refusal_of(error)
        text = str(error)
        refusal = refusal.for_account(name)
        kind: State = "needs_reauth" if refusal.kind is RefusalKind.REAUTHORIZE else "failed"
        state.blocked_lineage = lineage
        log.error(
            "oauth account {account}: provider {provider} refused the token "
            "{request} ({code}): {label}; {action}. Detail: {detail}",
            account=name,
            provider=state.account.provider,
            request="request" if state.account.grant in APP_ONLY_GRANTS else "refresh",
            code=refusal.code,
            label=refusal.kind.label,
            action=refusal.advice,
            detail=text,
        )
        self._save(
            state, lineage, lambda current: current.failed(kind, text, now, refusal), now=now
        )

    def _transient_failure(self, state: _AccountState, lineage: str, error: Exception) -> None:
        now = self._clock.seconds()
        state.failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (state.failures - 1))
        state.retry_at = now + delay
        log.warn(
            "oauth account {account}: token refresh failed ({detail}); attempt {n}, "
            "retrying in {delay:.0f} s",
            account=state.account.name,
            detail=str(error),
            n=state.failures,
            delay=delay,
        )
        text = f"temporary: {error}"
        refusal = getattr(error, "refusal", None) or network_refusal()
        self._save(
            state,
            lineage,
            lambda current: current.failed(current.state, text, now, refusal),
            now=now,
        )

    def _save(
        self, state: _AccountState, lineage: str, change: Any, *, now: float
    ) -> TokenRecord | None:
        """Apply `change` to the stored record if it still has `lineage`; keep memory in step."""
        store = self._store
        assert store is not None

        def guarded(current: TokenRecord | None) -> TokenRecord | None:
            if current is None or current.lineage != lineage:
                return current
            result: TokenRecord = change(current)
            return result

        try:
            saved = store.update(state.account.name, guarded)
        except (StoreUnreadable, TokenStoreError) as e:
            log.error(
                "oauth account {account}: cannot save to the token store ({reason}); "
                "keeping the result in memory only",
                account=state.account.name,
                reason=str(e),
            )
            if state.record is not None and state.record.lineage == lineage:
                state.record = change(state.record)
            return state.record
        state.record = saved
        state.signature = store.signature(state.account.name)
        state.unreadable = None
        return saved

    # -- the background timer -------------------------------------------------------

    def _due(self, state: _AccountState, now: float) -> bool:
        when = self._next_refresh(state)
        return when is not None and when <= now

    def _next_refresh(self, state: _AccountState) -> float | None:
        """When the account's next background refresh is due; None: never by itself."""
        record = state.record
        if (
            record is None
            or state.unreadable is not None
            or state.setup_error is not None
            or state.waiters is not None
            or record.state == "revoked"
            or record.tokens is None
            or state.blocked_lineage == record.lineage
        ):
            return None
        tokens = record.tokens
        lifetime = tokens.expires_at - (record.last_refresh or tokens.expires_at)
        # Never closer to expiry than half the lifetime: a provider issuing
        # tokens shorter than the margin must not cause a refresh loop.
        margin = min(self._config.oauth.refresh_margin, max(lifetime, 0.0) / 2)
        when = tokens.expires_at - margin
        if record.grant not in APP_ONLY_GRANTS and record.last_refresh is not None:
            when = min(when, record.last_refresh + self._config.oauth.idle_refresh_interval)
        return max(when, state.retry_at)

    def _reschedule(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        now = self._clock.seconds()
        dues = [d for d in (self._next_refresh(s) for s in self._states.values()) if d is not None]
        delay = MAX_SLEEP if not dues else min(MAX_SLEEP, max(0.0, min(dues) - now))
        self._timer = self._clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        for state in self._states.values():
            self._sync(state)
            if self._due(state, now):
                self._background_refresh(state)
        if self.running and self._timer is None:
            self._reschedule()

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

    def _log_start(self, state: _AccountState, now: float) -> None:
        if state.setup_error is None and (self._broken is not None or state.unreadable):
            return  # already logged, with the reason
        log_loaded(log, state.account, state.record, state.setup_error, now)


def _skew(record: TokenRecord | None) -> float:
    if record is None or record.tokens is None:
        return EXPIRY_SKEW
    lifetime = record.tokens.expires_at - (record.last_refresh or record.tokens.expires_at)
    return min(EXPIRY_SKEW, max(lifetime, 0.0) / 4)
