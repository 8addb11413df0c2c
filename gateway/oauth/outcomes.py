"""What a refresh's outcome (and a mail server's verdict on a login) does to
an account: the record in the store, the log, and what devices are told.

Every write goes through `save`, under the store's lineage guard: a result
is saved only if the authorisation it belongs to is still the one on disk,
so nothing here can overwrite tokens an admin has just (re-)authorised.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from gateway.model import APP_ONLY_GRANTS
from gateway.oauth.account_state import BACKOFF_FIRST, BACKOFF_MAX, AccountState
from gateway.oauth.errors import refusal_of
from gateway.oauth.refusal import Refusal, RefusalKind, network_refusal
from gateway.oauth.store import State, StoreUnreadable, TokenRecord, TokenStore, TokenStoreError
from gateway.upstream.errors import UpstreamRejected, UpstreamUnavailable

log = Logger(namespace="gateway.oauth")

DEVICE_TEXT_REAUTH = "mailbox authorisation expired, ask the administrator"
DEVICE_TEXT_UNAUTHORISED = "mailbox not authorised yet, ask the administrator"
DEVICE_TEXT_BROKEN = "gateway cannot use its stored authorisation, ask the administrator"
DEVICE_TEXT_MISCONFIGURED = "mailbox access misconfigured, ask the administrator"

Change = Callable[[TokenRecord], TokenRecord]


class PermanentFailure(Exception):
    """A refresh the provider refused; only an admin can help."""


def save(
    store: TokenStore, state: AccountState, lineage: str, change: Change
) -> TokenRecord | None:
    """Apply `change` to the stored record if it still has `lineage`; keep memory in step."""

    def guarded(current: TokenRecord | None) -> TokenRecord | None:
        if current is None or current.lineage != lineage:
            return current
        return change(current)

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


def first_app_only_record(store: TokenStore, state: AccountState) -> TokenRecord | None:
    """Start an app-only account's record, so its first token is fetched
    like any refresh (single flight, backoff, refusals recorded)."""
    account = state.account
    assert account.grant is not None
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


def permanent_failure(
    store: TokenStore, state: AccountState, lineage: str, error: Exception, now: float
) -> None:
    """The provider refused the grant or the set-up: block this lineage, record why."""
    name = state.account.name
    text = str(error)
    refusal = refusal_of(error).for_account(name)
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
    save(store, state, lineage, lambda current: current.failed(kind, text, now, refusal))


def transient_failure(
    store: TokenStore, state: AccountState, lineage: str, error: Exception, now: float
) -> None:
    """Network, timeout, 5xx, 429: back off exponentially and record the error."""
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
    save(
        store,
        state,
        lineage,
        lambda current: current.failed(current.state, text, now, refusal),
    )


def check_refreshable(state: AccountState, now: float, usable: bool) -> None:
    """Raise what the device should see when no refresh may be started now."""
    record = state.record
    assert record is not None
    if state.blocked_lineage == record.lineage:
        raise rejected(state)
    if now < state.retry_at:
        raise UpstreamUnavailable(
            f"account {state.account.name}: "
            + ("the upstream refused the token and " if usable else "no valid access token; ")
            + f"refresh is backing off after: {record.last_error or 'a failure'}"
        )


def rejected(state: AccountState) -> UpstreamRejected:
    """What a device's login gets once the account's authorisation is refused."""
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


def login_refused(store: TokenStore, state: AccountState, refusal: Refusal, now: float) -> None:
    """Record a mail server's refusal, once per code: logins must not write
    the store at every attempt."""
    record = state.record
    if record is None:
        return
    if (
        record.error_from_login
        and record.error_code == refusal.code
        and record.error_kind == refusal.kind.value
    ):
        return
    text = f"login refused by the mail server: {refusal.code}"
    save(store, state, record.lineage, lambda current: current.login_failed(text, now, refusal))


def login_succeeded(store: TokenStore, state: AccountState) -> None:
    """Clear a refusal recorded from a login; a memory check when there is none."""
    record = state.record
    if record is None or not record.error_from_login:
        return
    save(store, state, record.lineage, TokenRecord.login_cleared)
