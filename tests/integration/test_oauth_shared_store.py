"""The OAuth2 token store on PostgreSQL as operators and devices meet it:
`gateway oauth` against the shared table, and logins while the database is
unreachable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from gateway.admin.console.connect import AccountActions
from gateway.config.loader import load_config
from gateway.model import Secret
from gateway.oauth.admin import fired
from gateway.oauth.http import TreqPoster
from gateway.oauth.keys import KEY_ENV, encode_key, load_key, new_key
from gateway.oauth.manager import TokenManager
from gateway.oauth.record import TokenRecord
from gateway.oauth.store_postgres import SYNC_INTERVAL, PostgresTokenStore
from gateway.oauth.tokens import Tokens
from gateway.upstream.errors import UpstreamUnavailable
from tests.harness.postgres import PostgresCluster
from tests.helpers.oauth import fresh_key, oauth_config
from tests.helpers.state import backend_for, migrated_database, postgres_settings
from tests.helpers.token_stores import (
    TokenStores,
    command_store,
    pg_token_stores,
    seed_answer,
    shared_store,
)

__all__ = ["pg_token_stores"]

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def _config_file(tmp_path: Path, dsn: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        "[state]\n"
        'backend = "postgresql"\n'
        f'dsn = "{dsn}"\n'
        "[providers.idp]\n"
        'pop3 = { host = "pop.example.net", port = 995, tls = "implicit" }\n'
        'oauth = { token_url = "https://id.example.net/token", '
        'device_authorization_url = "https://id.example.net/device", '
        'authorization_url = "https://id.example.net/authorize", client_id = "gw", '
        'scopes = ["mail"] }\n'
        "[accounts.scanner]\n"
        'provider = "idp"\nusername = "scanner@example.net"\nauth = "oauth2"\n'
    )
    path.chmod(0o600)
    return path


def _gateway(config: Path, key: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, KEY_ENV: key, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(config), *argv],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )


def test_gateway_oauth_works_on_the_shared_table(tmp_path: Path, state_dsn: str) -> None:
    config_path = _config_file(tmp_path, state_dsn)
    config = load_config(config_path)
    key_text = encode_key(new_key())
    key = load_key(config.oauth, config.state_dir, environ={KEY_ENV: key_text})
    answer = {
        "access_token": "the-access-token",
        "refresh_token": "the-refresh-token",
        "expires_in": 3600,
        "token_type": "Bearer",
    }
    seeded = seed_answer(command_store(config, key), "scanner", answer)
    assert fired(shared_store(state_dsn, key).fetch("scanner")) == seeded
    # Nothing was written under the state directory: the tokens are in the table.
    assert not (tmp_path / "state" / "oauth").exists()

    status = _gateway(config_path, key_text, "oauth", "status", "--json")
    assert status.returncode == 0, status.stderr
    [entry] = json.loads(status.stdout)["accounts"]
    assert entry["state"] == "ok" and entry["access_token_valid"] and entry["refresh_token"]

    revoke = _gateway(config_path, key_text, "oauth", "revoke", "scanner")
    assert revoke.returncode == 0, revoke.stderr
    with psycopg.connect(state_dsn) as connection:
        rows = connection.execute(
            "SELECT state, blob FROM gateway_oauth_tokens WHERE account = 'scanner'"
        ).fetchall()
    [(state, blob)] = rows
    assert state == "revoked" and b"the-refresh-token" not in bytes(blob)
    status = _gateway(config_path, key_text, "oauth", "status")
    assert status.returncode == 0 and "scanner: revoked" in status.stdout

    overview = _gateway(config_path, key_text, "state", "status")
    assert "oauth tokens: 1" in overview.stdout and "  revoked: 1" in overview.stdout

    # Another key cannot read the row, and says so.
    other = _gateway(config_path, encode_key(new_key()), "oauth", "status")
    assert other.returncode == 0 and "wrong key" in other.stdout


@pytest.fixture
def own_cluster() -> Any:
    """A cluster of its own: this test stops it."""
    with PostgresCluster() as cluster:
        yield cluster


@pytest_twisted.ensureDeferred
async def test_an_unreachable_database_costs_only_logins_that_need_a_new_token(
    tmp_path: Path, own_cluster: PostgresCluster
) -> None:
    dsn = migrated_database(own_cluster)
    backend = backend_for(postgres_settings(dsn, timeout=1.0), reactor)
    assert backend.database is not None and backend.lease is not None
    await backend.lease.start()
    key = fresh_key()
    cache = Clock()  # when the store's cached version goes stale
    store = PostgresTokenStore(backend.database, key, backend.identity.name, cache)
    config = oauth_config(tmp_path / "state", accounts=("scanner", "printer"))
    manager = TokenManager(config, clock=reactor, store=store, state=backend)
    now = time.time()
    valid = Tokens(Secret("valid-access"), now + 3600, Secret("refresh-1"), "mail")
    expired = Tokens(Secret("old-access"), now - 60, Secret("refresh-2"), "mail")
    for name, tokens in (("scanner", valid), ("printer", expired)):
        record = TokenRecord.authorized(name, "device_code", tokens, now - 7200)
        await store.change(name, lambda _current, r=record: r)
    try:
        scanner, printer = config.accounts["scanner"], config.accounts["printer"]
        assert await manager.access_token(scanner) == "valid-access"
        own_cluster.stop("immediate")
        cache.advance(SYNC_INTERVAL + 1)
        # A valid token in memory still serves.
        assert await manager.access_token(scanner) == "valid-access"
        # One that needs a refresh fails as temporary, naming the store.
        with pytest.raises(UpstreamUnavailable) as info:
            await manager.access_token(printer)
        assert info.value.code == "SYS/TEMP"
        assert "account printer: the token store is unavailable" in info.value.detail
        # A refresh (the mail server refused the token) is not even asked for:
        # its result could not be stored.
        with pytest.raises(UpstreamUnavailable) as info:
            await manager.access_token(scanner, force_refresh=True)
        assert info.value.code == "SYS/TEMP"
        assert "a fresh token is needed and the token store is unavailable" in info.value.detail
        assert manager.refresh_requests("scanner") == 0
    finally:
        await backend.lease.stop()
        await backend.database.stop()


@pytest_twisted.ensureDeferred
async def test_the_console_forgets_tokens_in_the_shared_table(
    tmp_path: Path, pg_token_stores: TokenStores
) -> None:
    assert pg_token_stores.dsn is not None
    config = replace(oauth_config(tmp_path / "state"), state=postgres_settings(pg_token_stores.dsn))
    manager = await pg_token_stores.manager(config)
    store = manager.store
    assert store is not None and store.shared
    now = time.time()
    tokens = Tokens(Secret("an-access"), now + 3600, Secret("a-refresh"), "mail")
    await store.change(
        "scanner", lambda _: TokenRecord.authorized("scanner", "device_code", tokens, now)
    )
    audit: list[tuple[str, str, str]] = []
    actions = AccountActions(
        lambda: config,
        reactor=reactor,
        clock=reactor,
        poster=TreqPoster(reactor),
        tokens=lambda: manager,
        audit=lambda *entry: audit.append(entry),
    )
    outcome = await actions.forget("scanner", "admin")
    assert outcome == "no_endpoint"
    assert audit == [("forget-tokens", "admin", "scanner")]
    other = await pg_token_stores.store()
    forgotten = await other.fetch("scanner")
    assert forgotten is not None and forgotten.state == "revoked" and forgotten.tokens is None
