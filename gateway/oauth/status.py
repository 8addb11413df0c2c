"""What the metrics read about an OAuth2 account: its token state and times,
never a token. Built by `TokenManager.statuses()` from its memory alone, so a
scrape touches no file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.oauth.store import TokenRecord


@dataclass(frozen=True)
class TokenStatus:
    """`state` is the stored record's ("ok", "needs_reauth", "failed",
    "revoked") or what stands in for one: "unauthorised" (nothing stored),
    "unreadable" (its file), "unusable" (the store or the provider setup)."""

    account: str
    state: str
    expires_at: float | None
    refresh_outcomes: Mapping[str, int]


def token_status(
    account: str,
    record: TokenRecord | None,
    refresh_outcomes: Mapping[str, int],
    *,
    unusable: bool,
    unreadable: bool,
) -> TokenStatus:
    if unusable:
        state = "unusable"
    elif unreadable:
        state = "unreadable"
    elif record is None:
        state = "unauthorised"
    else:
        state = record.state
    tokens = record.tokens if record is not None else None
    return TokenStatus(
        account=account,
        state=state,
        expires_at=tokens.expires_at if tokens is not None else None,
        refresh_outcomes=dict(refresh_outcomes),
    )
