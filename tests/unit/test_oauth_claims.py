"""One refresh per account across processes, on a MemoryReactorClock: two
token managers (two processes) on one embedded store, each with its own
`TokenStore` (its own open files, so `flock` keeps them apart as it keeps
two processes apart)."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from gateway.maildrop import UpstreamUnavailable
from gateway.model import Config
from gateway.oauth.account_state import UNSAVED_RETRY
from gateway.oauth.claims import CLAIM_POLL, CLAIM_WAIT
from gateway.oauth.keys import GatewayKey
from gateway.oauth.manager import TokenManager
from gateway.oauth.record import TokenRecord, TokenStoreError
from gateway.oauth.store import TokenStore
from tests.harness.oauth_server import AuthServer, InMemoryPoster
from tests.helpers import token_manager
from tests.helpers.oauth import seed

clock = token_manager.clock
server = token_manager.server
poster = token_manager.poster
key = token_manager.key
config = token_manager.config
store = token_manager.store


def login(manager: TokenManager, config: Config) -> Deferred[str]:
    return ensureDeferred(manager.access_token(config.accounts["scanner"]))


def result(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "still waiting"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


def process(config: Config, clock: Clock, server: AuthServer, key: GatewayKey) -> TokenManager:
    """A token manager with a store of its own, as another process has."""
    manager = TokenManager(
        config,
        clock=clock,
        poster=InMemoryPoster(server),
        store=TokenStore.open(config.state_dir, key),
    )
    manager.startService()
    return manager


def expired_seed(store: TokenStore, server: AuthServer, clock: Clock) -> TokenRecord:
    record = seed(store, server, clock.seconds())
    clock.advance(2 * server.access_ttl)
    return record


def test_a_process_waiting_for_the_claim_takes_the_stored_tokens(
    config: Config, clock: Clock, server: AuthServer, key: GatewayKey, store: TokenStore
) -> None:
    expired_seed(store, server, clock)
    first, second = process(config, clock, server, key), process(config, clock, server, key)
    first_poster, second_poster = first._poster, second._poster
    assert isinstance(first_poster, InMemoryPoster) and isinstance(second_poster, InMemoryPoster)
    first_poster.hold = True
    mine = login(first, config)
    theirs = login(second, config)
    clock.advance(CLAIM_POLL * 3)
    assert not mine.called and not theirs.called
    first_poster.release()
    token = result(mine)
    clock.advance(CLAIM_POLL)
    assert result(theirs) == token
    assert server.counts["token:refresh_token"] == 1
    assert second.refresh_requests("scanner") == 0


def test_a_claim_held_too_long_is_a_temporary_failure(
    config: Config, clock: Clock, server: AuthServer, key: GatewayKey, store: TokenStore
) -> None:
    expired_seed(store, server, clock)
    claim = result(TokenStore.open(config.state_dir, key).claim_refresh("scanner"))
    assert claim is not None  # a process stuck in its refresh
    waiting = login(process(config, clock, server, key), config)
    clock.pump([CLAIM_POLL] * int(CLAIM_WAIT / CLAIM_POLL + 2))
    with pytest.raises(UpstreamUnavailable) as info:
        result(waiting)
    assert "another gateway process has been refreshing" in info.value.detail
    assert server.counts["token:refresh_token"] == 0
    result(claim.release())


def test_a_rotated_refresh_token_the_store_refused_keeps_the_claim_until_stored(
    config: Config, clock: Clock, server: AuthServer, key: GatewayKey, store: TokenStore
) -> None:
    seeded = expired_seed(store, server, clock)
    first, second = process(config, clock, server, key), process(config, clock, server, key)
    first_store = first.store
    assert isinstance(first_store, TokenStore)

    def disk_full(account: str, record: TokenRecord) -> None:
        raise TokenStoreError("cannot write the token store file: No space left on device")

    first_store._write = disk_full  # type: ignore[method-assign]
    token = result(login(first, config))
    assert server.counts["token:refresh_token"] == 1
    # The stored refresh token was rotated away at the provider: nobody may
    # refresh with it. The other process waits for the claim.
    theirs = login(second, config)
    clock.advance(CLAIM_POLL * 3)
    assert not theirs.called
    del first_store._write  # the disk has room again
    clock.advance(UNSAVED_RETRY)
    stored = store.load("scanner")
    assert stored is not None and stored.tokens is not None
    assert stored.tokens.access_token.reveal() == token
    assert seeded.tokens is not None and stored.tokens.refresh_token != seeded.tokens.refresh_token
    clock.advance(CLAIM_POLL)
    assert result(theirs) == token
    assert server.counts["token:refresh_token"] == 1
