"""When an account's token is refreshed without a login asking: the
background timer's rules.

Each account's mail token is refreshed `refresh_margin` before it expires
(never closer to expiry than half its lifetime), and at least every
`idle_refresh_interval` when it has a refresh token: Microsoft expires
refresh tokens unused for 90 days. A Graph token is refreshed by its logins:
one that finds it within the margin gets it and starts a refresh behind it.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway.model import APP_ONLY_GRANTS, OAuthSettings
from gateway.oauth.account_state import MAIL, MAX_SLEEP, AccountState, Resource, lifetime, tokens_of


def next_refresh(
    state: AccountState, settings: OAuthSettings, resource: Resource = MAIL
) -> float | None:
    """When the resource's next refresh is due; None: never by itself."""
    record = state.record
    tokens = tokens_of(record, resource)
    if (
        record is None
        or tokens is None
        or state.unreadable is not None
        or state.setup_error is not None
        or resource in state.flights
        or record.state == "revoked"
        or state.blocked_lineage == record.lineage
    ):
        return None
    # Never closer to expiry than half the lifetime: a provider issuing
    # tokens shorter than the margin must not cause a refresh loop.
    margin = min(settings.refresh_margin, (lifetime(record, resource) or 0.0) / 2)
    when = tokens.expires_at - margin
    if resource == MAIL and record.grant not in APP_ONLY_GRANTS and record.last_refresh is not None:
        when = min(when, record.last_refresh + settings.idle_refresh_interval)
    return max(when, state.retry_at)


def due(state: AccountState, settings: OAuthSettings, now: float, resource: Resource) -> bool:
    when = next_refresh(state, settings, resource)
    return when is not None and when <= now


def sleep_for(states: Iterable[AccountState], settings: OAuthSettings, now: float) -> float:
    """How long the timer sleeps: until the first mail token is due, at most MAX_SLEEP."""
    dues = [d for d in (next_refresh(s, settings) for s in states) if d is not None]
    return MAX_SLEEP if not dues else min(MAX_SLEEP, max(0.0, min(dues) - now))
