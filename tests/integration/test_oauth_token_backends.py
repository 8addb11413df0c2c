"""The token store interface, once for each state backend: embedded files
and PostgreSQL ("one suite, two backends"), and two token managers (two
gateway processes) racing logins with an expired token."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import deferLater

from gateway.model import Secret
from gateway.oauth.cipher import MAGIC
from gateway.oauth.record import StoreUnreadable, TokenRecord
from gateway.oauth.store_postgres import UNREGISTERED_GRACE, PostgresTokenStore
from gateway.oauth.tokens import Tokens, parse_token_response
from tests.harness.oauth_server import AuthServer
from tests.helpers.oauth import CLIENT_SECRET, fresh_key, oauth_config
from tests.helpers.state import backend_for, postgres_settings
from tests.helpers.token_stores import TokenStores, pg_token_stores, token_stores

__all__ = ["pg_token_stores", "token_stores"]

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration

ACCESS = "access-token-value-123"
REFRESH = "refresh-token-value-456"
REFRESH_GRANT = "token:refresh_token"
CROWD = 40


def record(account: str = "scanner", now: float = 1000.0) -> TokenRecord:
    tokens = Tokens(Secret(ACCESS), now + 3600, Secret(REFRESH), "mail")
    return TokenRecord.authorized(account, "device_code", tokens, now)


@pytest_twisted.ensureDeferred
async def test_a_record_is_stored_and_read_back(token_stores: TokenStores) -> None:
    store = await token_stores.store()
    assert await store.fetch("scanner") is None
    assert await store.stamp("scanner", fresh=True) is None
    mine = record()
    assert await store.change("scanner", lambda current: mine) == mine
    assert await store.fetch("scanner") == mine
    assert await store.stamp("scanner", fresh=True) is not None
    assert await store.stored_accounts() == ["scanner"]


@pytest_twisted.ensureDeferred
async def test_a_change_starts_from_what_another_process_stored(
    token_stores: TokenStores,
) -> None:
    first, second = await token_stores.store(), await token_stores.store()
    await first.change("scanner", lambda _: record())
    before = await second.stamp("scanner", fresh=True)
    rotated = Tokens(Secret("new-access"), 9000.0, Secret("rotated-refresh"), "mail")
    await first.change("scanner", lambda current: current and current.refreshed(rotated, 5000.0))
    assert await second.stamp("scanner", fresh=True) != before
    seen: list[TokenRecord | None] = []

    def note_error(current: TokenRecord | None) -> TokenRecord | None:
        seen.append(current)
        return current and current.failed("ok", "temporary: x", 6000.0)

    saved = await second.change("scanner", note_error)
    assert seen[0] is not None and seen[0].tokens == rotated
    assert saved is not None and saved.tokens == rotated and saved.last_error == "temporary: x"
    assert (await first.fetch("scanner")) == saved


@pytest_twisted.ensureDeferred
async def test_a_change_that_returns_the_record_writes_nothing(token_stores: TokenStores) -> None:
    store = await token_stores.store()
    mine = record()
    await store.change("scanner", lambda _: mine)
    stamp = await store.stamp("scanner", fresh=True)
    assert await store.change("scanner", lambda current: current) == mine
    assert await store.stamp("scanner", fresh=True) == stamp


@pytest_twisted.ensureDeferred
async def test_another_key_cannot_read_and_only_a_new_authorisation_replaces(
    token_stores: TokenStores,
) -> None:
    await (await token_stores.store()).change("scanner", lambda _: record())
    token_stores.key = fresh_key()
    other = await token_stores.store()
    with pytest.raises(StoreUnreadable, match="wrong key") as info:
        await other.fetch("scanner")
    assert ACCESS not in str(info.value) and REFRESH not in str(info.value)
    with pytest.raises(StoreUnreadable):
        await other.change("scanner", lambda current: current)
    fresh = record(now=2000.0)
    assert await other.change("scanner", lambda _: fresh, replace_unreadable=True) == fresh
    assert await other.fetch("scanner") == fresh


@pytest_twisted.ensureDeferred
async def test_one_refresh_claim_at_a_time(token_stores: TokenStores) -> None:
    first, second = await token_stores.store(), await token_stores.store()
    await first.change("scanner", lambda _: record())
    claim = await first.claim_refresh("scanner")
    assert claim is not None
    assert await second.claim_refresh("scanner") is None
    await claim.release()
    again = await second.claim_refresh("scanner")
    assert again is not None
    assert await first.claim_refresh("scanner") is None
    await again.release()


# A process that holds the account's refresh claim and waits to be killed.
HOLDER = """
import sys, time
from pathlib import Path
from gateway.oauth.store import TokenStore
from tests.helpers.state import backend_for, postgres_settings
from tests.helpers.oauth import fresh_key
store = TokenStore.open(Path(sys.argv[1]), fresh_key())
claim = store._claim("scanner")
print("held" if claim is not None else "refused", flush=True)
time.sleep(60)
"""


@pytest_twisted.ensureDeferred
async def test_the_refresh_claim_of_a_dead_process_is_free(token_stores: TokenStores) -> None:
    mine = await token_stores.store()
    await mine.change("scanner", lambda _: record())
    if token_stores.dsn is None:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(token_stores.state_dir)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            assert await mine.claim_refresh("scanner") is None
        finally:
            holder.kill()  # -9: the kernel drops its flock
            holder.wait()
    else:
        other = await token_stores.store()
        assert await other.claim_refresh("scanner") is not None
        assert await mine.claim_refresh("scanner") is None
        # The holder dies: its process lease passes without a renewal.
        with psycopg.connect(token_stores.dsn, autocommit=True) as connection:
            connection.execute(
                "UPDATE gateway_processes SET lease_until = now() - interval '1 second'"
                " WHERE process = (SELECT refreshing FROM gateway_oauth_tokens)"
            )
    claim = await mine.claim_refresh("scanner")
    assert claim is not None
    await claim.release()


@pytest_twisted.ensureDeferred
async def test_a_holder_without_a_process_row_keeps_its_lease_for_a_grace_time(
    pg_token_stores: TokenStores,
) -> None:
    assert pg_token_stores.dsn is not None
    mine = await pg_token_stores.store()
    await mine.change("scanner", lambda _: record())
    # `gateway check`, or a node whose first process lease is not written yet.
    backend = backend_for(postgres_settings(pg_token_stores.dsn), reactor)
    assert backend.database is not None
    unregistered = PostgresTokenStore(backend.database, pg_token_stores.key, "nobody:1:x", reactor)
    try:
        assert await unregistered.claim_refresh("scanner") is not None
        assert await mine.claim_refresh("scanner") is None
        with psycopg.connect(pg_token_stores.dsn, autocommit=True) as connection:
            connection.execute(
                "UPDATE gateway_oauth_tokens SET refresh_until = refresh_until"
                " - make_interval(secs => %s)",
                (UNREGISTERED_GRACE + 1,),
            )
        assert await mine.claim_refresh("scanner") is not None
    finally:
        await backend.database.stop()


@pytest_twisted.ensureDeferred
async def test_the_database_never_sees_a_token(pg_token_stores: TokenStores) -> None:
    mine = record()
    await (await pg_token_stores.store()).change("scanner", lambda _: mine)
    assert pg_token_stores.dsn is not None
    with psycopg.connect(pg_token_stores.dsn) as connection:
        rows = connection.execute(
            "SELECT account, blob, lineage, state, last_error FROM gateway_oauth_tokens"
        ).fetchall()
    [(account, blob, lineage, state, last_error)] = rows
    assert (account, state, last_error) == ("scanner", "ok", None)
    assert lineage == mine.lineage
    blob = bytes(blob)
    assert blob.startswith(MAGIC)
    for secret in (ACCESS, REFRESH):
        assert secret.encode() not in blob


# -- two gateway processes, one refresh ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_processes_racing_logins_make_one_refresh_and_keep_the_rotated_token(
    token_stores: TokenStores, tmp_path: Path
) -> None:
    server = AuthServer(client_secret=CLIENT_SECRET)
    port = server.listen(reactor)
    managers = []
    try:
        config = oauth_config(token_stores.state_dir, server.base_url, secret=CLIENT_SECRET)
        managers = [await token_stores.manager(config) for _ in range(2)]
        answer = server._issue("alice", "gateway", "mail", refresh=True)
        first_refresh = answer["refresh_token"]
        expired = parse_token_response(answer, time.time() - 7200)
        seeded = TokenRecord.authorized("scanner", "device_code", expired, time.time())
        await (await token_stores.store()).change(
            "scanner", lambda _: seeded, replace_unreadable=True
        )
        account = config.accounts["scanner"]
        # Both processes have read the expired token before anyone refreshes.
        for manager in managers:
            manager.open()
        server.hold = True
        calls = [ensureDeferred(managers[i % 2].access_token(account)) for i in range(CROWD)]
        while not server.held:
            await deferLater(reactor, 0.01, lambda: None)
        # Long enough for the other process to ask for the claim several times.
        await deferLater(reactor, 0.5, lambda: None)
        assert len(server.held) == 1 and not any(d.called for d in calls)
        server.release()
        results = await DeferredList(calls, fireOnOneErrback=True, consumeErrors=True)
        tokens = {token for _, token in results}
        assert len(tokens) == 1
        assert server.counts[REFRESH_GRANT] == 1
        # The rotated refresh token is what the store holds; the old one is dead.
        stored = await (await token_stores.store()).fetch("scanner")
        assert stored is not None and stored.tokens is not None
        rotated = stored.tokens.refresh_token
        assert rotated is not None and rotated.reveal() != first_refresh
        assert server.refresh[rotated.reveal()].active
        assert not server.refresh[first_refresh].active
        assert stored.tokens.access_token.reveal() in tokens
        # It is the one the provider takes next.
        status, _ = server.token(
            {
                "grant_type": "refresh_token",
                "refresh_token": rotated.reveal(),
                "client_id": "gateway",
                "client_secret": CLIENT_SECRET,
            }
        )
        assert status == 200
        assert sum(m.refresh_requests("scanner") for m in managers) == 1
    finally:
        for manager in managers:
            if manager.running:
                manager.stopService()
        await port.stopListening()
