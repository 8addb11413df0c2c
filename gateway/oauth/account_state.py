"""What the token manager keeps in memory for one OAuth2 account, and the
timing rules every part of it shares (skew, backoff, the timer's longest sleep).

An account has up to two resources: its mail token ("mail", the provider's
scopes: POP/IMAP/SMTP) and its Microsoft Graph token ("graph"). Each has its
own single flight of waiters; `lock` makes the two take turns at the token
endpoint, since each refresh rotates the one refresh token they share.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from twisted.internet.defer import Deferred, DeferredLock

from gateway.model import Account
from gateway.oauth.backend import RefreshClaim
from gateway.oauth.endpoint import TokenEndpoint
from gateway.oauth.record import TokenRecord
from gateway.oauth.tokens import Tokens

Resource = Literal["mail", "graph"]
MAIL: Resource = "mail"
GRAPH: Resource = "graph"

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
# How soon a result the store could not take is offered to it again.
UNSAVED_RETRY = 2.0


@dataclass(eq=False)
class AccountState:
    """What the manager keeps in memory for one OAuth2 account."""

    account: Account
    endpoint: TokenEndpoint | None
    setup_error: str | None = None
    record: TokenRecord | None = None
    # The store's stamp of the record last read (`TokenBackend.stamp`).
    signature: object = None
    loaded: bool = False
    # The lineage of a result only memory holds: the store could not be written.
    unsaved: str | None = None
    # The refresh claim kept while `unsaved`: no other process refreshes
    # with the stored (maybe already rotated away) refresh token meanwhile.
    claim: RefreshClaim | None = None
    # The store could not be reached at the last look (logged once).
    store_down: bool = False
    unreadable: str | None = None
    # The lineage whose refresh the provider refused in this process.
    blocked_lineage: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    # The waiters of each resource's refresh in flight.
    flights: dict[Resource, list[Deferred[Tokens]]] = field(default_factory=dict)
    lock: DeferredLock = field(default_factory=DeferredLock)
    # When this process last completed a refresh of each resource.
    refreshed_at: dict[Resource, float] = field(default_factory=dict)
    refresh_requests: int = 0
    # Refreshes finished by this process, by outcome ("ok", "failed", "refused").
    refresh_outcomes: Counter[str] = field(default_factory=Counter)


def tokens_of(record: TokenRecord | None, resource: Resource) -> Tokens | None:
    if record is None:
        return None
    return record.graph_tokens if resource == GRAPH else record.tokens


def fetched_at(record: TokenRecord, resource: Resource) -> float | None:
    return record.graph_refresh if resource == GRAPH else record.last_refresh


def lifetime(record: TokenRecord | None, resource: Resource) -> float | None:
    """How long the resource's current token was valid when fetched."""
    tokens = tokens_of(record, resource)
    if record is None or tokens is None:
        return None
    return max(tokens.expires_at - (fetched_at(record, resource) or tokens.expires_at), 0.0)


def skew(record: TokenRecord | None, resource: Resource = MAIL) -> float:
    life = lifetime(record, resource)
    return EXPIRY_SKEW if life is None else min(EXPIRY_SKEW, life / 4)
