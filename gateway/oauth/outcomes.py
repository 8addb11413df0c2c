"""What a refresh's outcome (and a mail server's verdict on a login) does to
an account: the record in the store, the log, and what devices are told.

Every write goes through `save`, under the store's lineage guard: a result
is saved only if the authorisation it belongs to is still the one stored,
so nothing here can overwrite tokens an admin has just (re-)authorised. A
store that cannot be written (a full disk, an unreachable database) costs
the write, not the result: it is kept in memory, and the next write retries.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from gateway.model import APP_ONLY_GRANTS
from gateway.oauth.account_state import BACKOFF_FIRST, BACKOFF_MAX, AccountState
from gateway.oauth.backend import TokenBackend
from gateway.oauth.errors import refusal_of
from gateway.oauth.record import State, StoreUnreadable, TokenRecord, TokenStoreError
from gateway.oauth.refusal import Refusal, RefusalKind, network_refusal
from gateway.state.database import StateUnavailable
from gateway.upstream.errors import UpstreamRejected, UpstreamUnavailable

log = Logger(namespace="gateway.oauth")

DEVICE_TEXT_REAUTH = "mailbox authorisation expired, ask the administrator"
DEVICE_TEXT_UNAUTHORISED = "mailbox not authorised yet, ask the administrator"
DEVICE_TEXT_BROKEN = "gateway cannot use its stored authorisation, ask the administrator"
DEVICE_TEXT_MISCONFIGURED = "mailbox access misconfigured, ask the administrator"

Change = Callable[[TokenRecord], TokenRecord]


class PermanentFailure(Exception):
    """A refresh the provider refused; only an admin can help."""


async def save(
    store: TokenBackend, state: AccountState, lineage: str, change: Change
) -> TokenRecord | None:
    """Apply `change` to the stored record if it still has `lineage`; keep memory in step."""

    def guarded(current: TokenRecord | None) -> TokenRecord | None:
        if current is None or current.lineage != lineage:
            return current
        return change(current)

    name = state.account.name
    try:
        saved = await store.change(name, guarded)
        state.signature = await store.stamp(name)
    except (StoreUnreadable, TokenStoreError, StateUnavailable) as e:
        log.error(
            "oauth account {account}: cannot save to the token store ({reason}); "
            "keeping the result in memory only",
            account=state.account.name,
            reason=str(e),
        )
        if state.record is not None and state.record.lineage == lineage:
            state.record = change(state.record)
            state.unsaved = lineage
        return state.record
    state.record = saved
    state.unsaved = None
    state.unreadable = None
    return saved


async def save_unsaved(store: TokenBackend, state: AccountState) -> None:
    """Retry writing a result only memory holds (a rotated refresh token must
    reach the store before another process refreshes with the old one)."""
    lineage, record = state.unsaved, state.record
    if lineage is not None and (record is None or record.lineage != lineage):
        state.unsaved = None
    elif lineage is not None and record is not None:
        await save(store, state, lineage, lambda _current: record)
        if state.unsaved is None:
            log.info(
                "oauth account {account}: saved to the token store", account=state.account.name
            )
    # A refresh in progress (it holds the lock) releases the claim itself.
    claim = state.claim
    if state.unsaved is None and claim is not None and not state.lock.locked:
        state.claim = None
        await claim.release()


async def first_app_only_record(store: TokenBackend, state: AccountState) -> TokenRecord | None:
    """Start an app-only account's record, so its first token is fetched
    like any refresh (single flight, backoff, refusals recorded)."""
    account = state.account
    assert account.grant is not None
    fresh = TokenRecord.app_only(account.name, account.grant)
    try:
        state.record = await store.change(account.name, lambda current: current or fresh)
        state.signature = await store.stamp(account.name)
    except (StoreUnreadable, TokenStoreError, StateUnavailable) as e:
        log.error(
            "oauth account {account}: cannot save to the token store ({reason}); "
            "keeping the result in memory only",
            account=account.name,
            reason=str(e),
        )
        state.record = fresh
    return state.record


async def permanent_failure(
    store: TokenBackend, state: AccountState, lineage: str, error: Exception, now: float
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
    await save(store, state, lineage, lambda current: current.failed(kind, text, now, refusal))


async def transient_failure(
    store: TokenBackend, state: AccountState, lineage: str, error: Exception, now: float
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
    await save(
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


async def login_refused(
    store: TokenBackend, state: AccountState, refusal: Refusal, now: float
) -> None:
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
    await save(
        store, state, record.lineage, lambda current: current.login_failed(text, now, refusal)
    )


async def login_succeeded(store: TokenBackend, state: AccountState) -> None:
    """Clear a refusal recorded from a login; a memory check when there is none."""
    record = state.record
    if record is None or not record.error_from_login:
        return
    await save(store, state, record.lineage, TokenRecord.login_cleared)
