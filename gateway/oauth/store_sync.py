"""Keeping the token manager's memory of an account in step with the store,
which other processes write: `gateway oauth authorize`/`revoke`, the console,
the other worker processes and nodes (refreshes).

The manager compares the store's stamp of the account with the one it last
read and reloads on a difference; these are the rules for what a reload (or
a failed look) does to its memory.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.oauth.account_state import AccountState
from gateway.oauth.record import StoreUnreadable, TokenRecord
from gateway.state.database import StateUnavailable

log = Logger(namespace="gateway.oauth")


def apply_loaded(
    result: TokenRecord | Failure | None, state: AccountState, signature: object
) -> TokenRecord | Failure | None:
    """Take a reload's result into memory. Returns the failure if the store
    could not be read at all (memory untouched), else the previous record if
    a new authorisation (lineage) was read, else the current record."""
    name = state.account.name
    if isinstance(result, Failure):
        error = result.value
        if not isinstance(error, StoreUnreadable):
            return result
        state.loaded = True
        state.signature = signature
        if state.unreadable != error.reason:
            log.error("oauth account {account}: {reason}", account=name, reason=error.reason)
        state.record = None
        state.unreadable = error.reason
        return state.record
    state.loaded = True
    state.signature = signature
    previous = state.record
    state.record = result
    state.unreadable = None
    if result is not None and (previous is None or previous.lineage != result.lineage):
        # A new authorisation (or a revocation) from `gateway oauth`.
        state.failures = 0
        state.retry_at = 0.0
        state.refreshed_at.clear()
        return previous
    if (
        result is not None
        and state.blocked_lineage == result.lineage
        and result.state == "ok"
        and _refresh_token(result) != _refresh_token(previous)
    ):
        # Another process stored a newer refresh token of the grant this
        # process saw refused (it had refreshed with an older one).
        state.blocked_lineage = None
        state.failures = 0
        state.retry_at = 0.0
    return state.record


def _refresh_token(record: TokenRecord | None) -> str | None:
    tokens = record.tokens if record is not None else None
    if tokens is None or tokens.refresh_token is None:
        return None
    return tokens.refresh_token.reveal()


def reachable(state: AccountState) -> None:
    if state.store_down:
        state.store_down = False
        log.info("oauth account {account}: token store reachable again", account=state.account.name)


def sync_failed(failure: Failure, state: AccountState) -> None:
    """A look at (or a write to) the store that nobody waits for failed:
    an unreachable store is logged once per outage."""
    if failure.check(StateUnavailable):
        if not state.store_down:
            state.store_down = True
            log.warn(
                "oauth account {account}: token store unreachable: {error}",
                account=state.account.name,
                error=failure.getErrorMessage(),
            )
        return
    log.failure(
        "oauth account {account}: using the token store failed",
        failure,
        account=state.account.name,
    )
