"""The token manager's test bench: a Clock at a fixed start, the test authorization
server's logic in memory behind an InMemoryPoster, an OAuth config and its token
store. Tests import the fixtures they take by name (pytest finds a fixture in the
test module's namespace), so each file states what it stands on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from gateway.model import Config
from gateway.oauth.keys import GatewayKey
from gateway.oauth.manager import TokenManager
from gateway.oauth.store import TokenStore
from tests.harness.oauth_server import AuthServer, InMemoryPoster
from tests.helpers.oauth import CLIENT_SECRET, fresh_key, oauth_config

START = 1_700_000_000.0


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(START)
    return c


@pytest.fixture
def server(clock: Clock) -> AuthServer:
    return AuthServer(client_secret=CLIENT_SECRET, clock=clock, client_credentials_user="alice")


@pytest.fixture
def poster(server: AuthServer) -> InMemoryPoster:
    return InMemoryPoster(server)


@pytest.fixture
def key() -> GatewayKey:
    return fresh_key()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return oauth_config(tmp_path / "state")


@pytest.fixture
def store(config: Config, key: GatewayKey) -> TokenStore:
    return TokenStore.open(config.state_dir, key)


def manager_for(
    config: Config, clock: Clock, poster: InMemoryPoster, store: TokenStore, *, start: bool = True
) -> TokenManager:
    manager = TokenManager(config, clock=clock, poster=poster, store=store)
    if start:
        manager.startService()
    return manager


def fired(d: Deferred[Any]) -> Any:
    """The result of a Deferred that must have fired (everything is in memory);
    a failure is raised."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "still waiting"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]
