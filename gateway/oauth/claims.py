"""Waiting for an account's refresh claim: one refresh per account across
processes (the worker processes of a host, the nodes sharing PostgreSQL).

A process that finds the claim taken polls until the holder releases it (or
dies: its flock goes with it, its PostgreSQL lease lapses), then re-reads the
store before deciding to refresh: the holder's new tokens are usually there,
and then no second request goes to the token endpoint.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from gateway.oauth.account_state import GRAPH, AccountState, Resource, skew, tokens_of
from gateway.oauth.backend import RefreshClaim, TokenBackend
from gateway.oauth.errors import OAuthUnavailable
from gateway.oauth.http import DEFAULT_TIMEOUT
from gateway.oauth.outcomes import PermanentFailure
from gateway.oauth.tokens import Tokens

log = Logger(namespace="gateway.oauth")

# How often a waiting process asks again.
CLAIM_POLL = 0.15
# How long a process waits for another's refresh: about the longest a token
# request may take, after which the waiting login fails as temporary.
CLAIM_WAIT = DEFAULT_TIMEOUT + 5.0


async def claim_for(state: AccountState, store: TokenBackend, clock: IReactorTime) -> RefreshClaim:
    """The claim this process kept (an unsaved result), or a new one."""
    if state.claim is not None:
        return state.claim
    return await claim_refresh(store, state.account.name, clock)


async def settle(state: AccountState, claim: RefreshClaim) -> None:
    """After a refresh: release the claim, unless its result is only in
    memory (the store could not be written): then it is kept until
    `outcomes.save_unsaved` stores it."""
    if state.unsaved is not None:
        state.claim = claim
        return
    state.claim = None
    await claim.release()


async def claim_refresh(
    store: TokenBackend, account: str, clock: IReactorTime, wait: float = CLAIM_WAIT
) -> RefreshClaim:
    """The account's refresh claim, waited for; `OAuthUnavailable` after `wait`."""
    deadline = clock.seconds() + wait
    while True:
        claim: Any = await store.claim_refresh(account)
        if claim is not None:
            result: RefreshClaim = claim
            return result
        if clock.seconds() >= deadline:
            raise OAuthUnavailable(
                f"another gateway process has been refreshing this account for over {wait:.0f} s"
            )
        await deferLater(clock, CLAIM_POLL, lambda: None)


def refreshed_elsewhere(
    state: AccountState, resource: Resource, before: Tokens | None, now: float
) -> Tokens | None:
    """The valid token another process stored while we waited for the claim
    (memory just re-read from the store), if any. `PermanentFailure` if the
    account lost its authorisation meanwhile (revoked, unreadable)."""
    record = state.record
    if state.unreadable is not None or record is None or record.state == "revoked":
        raise PermanentFailure()
    tokens = tokens_of(record, resource)
    if tokens is None or not tokens.valid_at(now, skew=skew(record, resource)):
        return None
    if before is not None and tokens.access_token.reveal() == before.access_token.reveal():
        return None
    log.info(
        "oauth account {account}: {what} refreshed by another gateway process; using it",
        account=state.account.name,
        what="Graph access token" if resource == GRAPH else "access token",
    )
    return tokens
