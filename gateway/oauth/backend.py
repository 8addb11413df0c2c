"""Where the OAuth2 token records live: the interface the token manager, the
`gateway oauth` command and the console use, and which implementation a
state backend gets.

- embedded (`gateway.oauth.store.TokenStore`): one encrypted file per
  account under ``state_dir/oauth``, shared by the worker processes of one
  host through `flock`;
- postgresql (`gateway.oauth.store_postgres.PostgresTokenStore`): one row
  per account in ``gateway_oauth_tokens``, the same encrypted blob, shared by
  every node.

Both promise the same: a record is changed only by a read-modify-write that
sees the latest stored record (so a rotated refresh token is never
overwritten by an older one), and `claim_refresh` grants at most one process
at a time the right to ask the token endpoint for an account. A process that
is refused the claim waits, re-reads and uses the tokens the holder stored.

A PostgreSQL store that cannot reach the database fails with
`StateUnavailable`; the manager turns that into the temporary failure a
device gets when the token endpoint is unreachable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from gateway.model import Config
from gateway.oauth.keys import GatewayKey
from gateway.oauth.record import TokenRecord
from gateway.oauth.store import TokenStore
from gateway.oauth.store_postgres import BlockingRunner, PostgresTokenStore
from gateway.state.backend import StateBackend
from gateway.state.processes import ProcessIdentity

Change = Callable[[TokenRecord | None], TokenRecord | None]


class RefreshClaim(Protocol):
    """The right to refresh one account, until released."""

    def release(self) -> Deferred[None]: ...


class TokenBackend(Protocol):
    """The token records of every OAuth2 account, as one process sees them."""

    # Whether other nodes share these records (PostgreSQL).
    shared: bool

    @property
    def key(self) -> GatewayKey: ...

    def describe(self, account: str) -> str:
        """Where the account's record is, for the admin."""
        ...

    def problem(self) -> str | None:
        """Why the store cannot be used now, for health checks; None if it can."""
        ...

    def stamp(self, account: str, *, fresh: bool = False) -> Deferred[object]:
        """Something that changes whenever the account's record does (None: no
        record). A shared store may answer from a short-lived cache unless
        `fresh`."""
        ...

    def fetch(self, account: str) -> Deferred[TokenRecord | None]:
        """The stored record; fails with `StoreUnreadable` if it cannot be read."""
        ...

    def change(
        self, account: str, change: Change, *, replace_unreadable: bool = False
    ) -> Deferred[TokenRecord | None]:
        """Apply `change` to the latest stored record atomically (see
        `TokenStore.update`); the record stored afterwards."""
        ...

    def stored_accounts(self) -> Deferred[list[str]]: ...

    def claim_refresh(self, account: str) -> Deferred[Any]:
        """A `RefreshClaim`, or None while another live process holds it."""
        ...


def open_token_backend(
    config: Config, key: GatewayKey, state: StateBackend, clock: Any
) -> TokenBackend:
    """The token store for `state`'s backend (creates state_dir/oauth for embedded)."""
    if state.database is None:
        return TokenStore.open(config.state_dir, key)
    return PostgresTokenStore(state.database, key, state.identity.name, clock)


def open_command_backend(config: Config, key: GatewayKey) -> TokenBackend:
    """The token store for the `gateway oauth` command and other blocking
    callers: the same records, reached with a blocking connection whose
    Deferreds have fired by the time they are returned."""
    if config.state.backend != "postgresql":
        return TokenStore.open(config.state_dir, key)
    identity = ProcessIdentity.here(config.state.node)
    return PostgresTokenStore(BlockingRunner(config.state), key, identity.name, None)


__all__ = [
    "Change",
    "RefreshClaim",
    "TokenBackend",
    "open_command_backend",
    "open_token_backend",
]
