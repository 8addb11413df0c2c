"""Token stores on both state backends, for "one suite, two backends".

`token_stores` (a fixture, parametrized "embedded" and "postgresql") makes
as many independent stores as a test asks for, each standing for one gateway
process: embedded stores are separate `TokenStore` objects on one state
directory (each claim is its own open file, so `flock` treats them as it
treats two processes); PostgreSQL stores each have their own `StateBackend`
(connection pool, process identity and live row in `gateway_processes`) on
one database. Also what a test needs to seed a shared store the way
`gateway oauth authorize` does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from gateway.model import Config, StateSettings
from gateway.oauth.admin import fired
from gateway.oauth.backend import TokenBackend, open_command_backend
from gateway.oauth.http import TreqPoster
from gateway.oauth.keys import GatewayKey, load_key
from gateway.oauth.manager import TokenManager
from gateway.oauth.record import TokenRecord
from gateway.oauth.store import TokenStore
from gateway.oauth.store_postgres import BlockingRunner, PostgresTokenStore
from gateway.oauth.tokens import parse_token_response
from gateway.state.backend import StateBackend
from tests.harness.oauth_server import OAuthServerProcess
from tests.harness.postgres import PostgresCluster
from tests.helpers.device_grant import device_grant_tokens
from tests.helpers.oauth import fresh_key
from tests.helpers.state import backend_for, migrated_database, postgres_settings

BACKENDS = ["embedded", "postgresql"]


class TokenStores:
    """Stores of one backend kind over the same records, one per "process"."""

    def __init__(self, kind: str, state_dir: Path, dsn: str | None) -> None:
        self.kind = kind
        self.state_dir = state_dir
        self.dsn = dsn
        self.key = fresh_key()
        self._backends: list[StateBackend] = []

    @property
    def settings(self) -> StateSettings:
        if self.dsn is None:
            return StateSettings()
        return postgres_settings(self.dsn)

    async def backend(self) -> StateBackend:
        """A new process's state backend (PostgreSQL: its lease is held)."""
        backend = backend_for(self.settings, reactor)
        self._backends.append(backend)
        if backend.lease is not None:
            await backend.lease.start()
        return backend

    async def store(self, backend: StateBackend | None = None) -> TokenBackend:
        backend = backend or await self.backend()
        if backend.database is None:
            return TokenStore.open(self.state_dir, self.key)
        return PostgresTokenStore(backend.database, self.key, backend.identity.name, reactor)

    async def manager(self, config: Config, **kwargs: Any) -> TokenManager:
        """A token manager as a gateway process of its own would have it."""
        backend = await self.backend()
        return TokenManager(
            config,
            clock=reactor,
            poster=kwargs.pop("poster", None) or TreqPoster(reactor),
            store=await self.store(backend),
            state=backend,
            **kwargs,
        )

    def close(self) -> None:
        for backend in self._backends:
            if backend.lease is not None:
                pytest_twisted.blockon(backend.lease.stop())
            if backend.database is not None:
                pytest_twisted.blockon(backend.database.stop())
        self._backends.clear()


@pytest.fixture(params=BACKENDS)
def token_stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TokenStores]:
    dsn = None
    if request.param == "postgresql":
        cluster: PostgresCluster = request.getfixturevalue("postgres")
        dsn = migrated_database(cluster)
    stores = TokenStores(request.param, tmp_path / "state", dsn)
    try:
        yield stores
    finally:
        stores.close()


@pytest.fixture
def pg_token_stores(postgres: PostgresCluster, tmp_path: Path) -> Iterator[TokenStores]:
    """PostgreSQL stores only, for what only the shared table has."""
    stores = TokenStores("postgresql", tmp_path / "state", migrated_database(postgres))
    try:
        yield stores
    finally:
        stores.close()


def command_store(config: Config, key: GatewayKey | None = None) -> TokenBackend:
    """The store `gateway oauth` uses for `config` (its [state] backend),
    with the key `config` names (its `[oauth] key_file`, else the state
    directory's) unless given."""
    key = key or load_key(config.oauth, config.state_dir, environ={})
    return open_command_backend(config, key)


def shared_store(dsn: str, key: GatewayKey) -> TokenBackend:
    """The PostgreSQL token table at `dsn` as `gateway oauth` reaches it
    (blocking; fired Deferreds), for seeding the nodes of a cluster test.
    Every node must have `key` (the same `[oauth] key_file` or GATEWAY_KEY)."""
    return PostgresTokenStore(BlockingRunner(postgres_settings(dsn)), key, "test:seed", None)


def seed_answer(
    store: TokenBackend,
    account: str,
    answer: dict[str, Any],
    *,
    grant: str = "device_code",
    issued: float | None = None,
) -> TokenRecord:
    """Store a token endpoint's `answer` as `gateway oauth authorize` would;
    `issued` in the past makes the access token expired already. For stores
    that answer at once (the command's)."""
    now = time.time()
    tokens = parse_token_response(answer, now if issued is None else issued)
    record = TokenRecord.authorized(account, grant, tokens, now)
    fired(store.change(account, lambda _current: record, replace_unreadable=True))
    return record


def seed_expired_grant(
    store: TokenBackend, account: str, idp: OAuthServerProcess, client_secret: str
) -> dict[str, Any]:
    """A device grant completed at `idp`, stored for `account` as if the admin
    had authorised it two hours ago, while the gateway was down: its access
    token has expired since. Returns the token endpoint's answer."""
    answer = device_grant_tokens(idp, client_secret)
    seed_answer(store, account, answer, issued=time.time() - 7200)
    return answer
