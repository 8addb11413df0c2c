"""The PostgreSQL token store: one row per account in `gateway_oauth_tokens`,
shared by every node.

The row's `blob` is the record sealed with the gateway key exactly as a
token file is (`gateway.oauth.cipher`); every node has the key, the database
never sees a token in the clear. A change is a read-modify-write in one
transaction under a per-account advisory lock, so two nodes writing at once
are serialised and each sees the other's result (a rotated refresh token is
never overwritten by an older one).

One refresh per account across nodes: the refresh lease (`refreshing`,
`refresh_until`) is taken by one UPDATE that succeeds only if the lease is
free, expired, or held by a process that is dead per `gateway_processes`
(its lease passed; or it has no row there and took the refresh lease over
`UNREGISTERED_GRACE` ago).
The lease lasts longer than a token request may (the HTTP client's timeout),
so a live holder never loses it mid-request; a holder killed mid-request
frees it with its process lease (`[state] lease_time`).

The gateway notices other nodes' writes through the row's `version`, asked
at most every `SYNC_INTERVAL` seconds per account (a login needs no query
while its token is valid), and always before a refresh.

Work runs through a `Runner`: the gateway's `Database` (a thread pool, never
the reactor thread), or `BlockingRunner` for the `gateway oauth` command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import psycopg
from twisted.internet.defer import Deferred, fail, succeed

from gateway.model import StateSettings
from gateway.oauth.cipher import TokenCipher
from gateway.oauth.http import DEFAULT_TIMEOUT
from gateway.oauth.keys import GatewayKey
from gateway.oauth.record import StoreUnreadable, TokenRecord
from gateway.state.database import StateUnavailable, connect, describe

T = TypeVar("T")
Work = Callable[[psycopg.Connection[Any]], T]
Change = Callable[[TokenRecord | None], TokenRecord | None]

# How long a node trusts the version it last saw of an account's row.
SYNC_INTERVAL = 2.0
# How long a refresh lease holds without being released, however long the
# token request takes or its result waits to be stored (a dead holder loses
# it sooner, with its process lease).
REFRESH_LEASE = DEFAULT_TIMEOUT * 4
# How long the refresh lease of a process with no row in gateway_processes
# holds: one starting may refresh before its first lease is written.
UNREGISTERED_GRACE = 30.0
WHERE = "token store row in PostgreSQL"
_LOCK_PREFIX = "gateway_oauth_tokens:"


class Runner(Protocol):
    def run(self, work: Work[T]) -> Deferred[T]: ...


class BlockingRunner:
    """Runs each piece of work at once, in one transaction on one connection:
    for the `gateway oauth` command, whose callers want fired Deferreds."""

    def __init__(self, settings: StateSettings) -> None:
        self._settings = settings
        self._connection: psycopg.Connection[Any] | None = None

    def run(self, work: Work[T]) -> Deferred[T]:
        try:
            if self._connection is None or self._connection.closed:
                self._connection = connect(self._settings, autocommit=True)
            with self._connection.transaction():
                return succeed(work(self._connection))
        except psycopg.OperationalError as e:
            return fail(StateUnavailable(describe(e)))
        except Exception:
            return fail()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class PostgresRefreshClaim:
    def __init__(self, store: PostgresTokenStore, account: str) -> None:
        self._store = store
        self._account = account

    def release(self) -> Deferred[None]:
        return self._store.release_refresh(self._account)


class PostgresTokenStore:
    """Token records in the state database, for one process (`process`)."""

    shared = True

    def __init__(self, database: Runner, key: GatewayKey, process: str, clock: Any) -> None:
        self._database = database
        self._cipher = TokenCipher(key)
        self._process = process
        # None (the command): every stamp asks the database.
        self._clock = clock
        # account -> (when checked, version or None)
        self._versions: dict[str, tuple[float, int | None]] = {}

    @property
    def key(self) -> GatewayKey:
        return self._cipher.key

    def describe(self, account: str) -> str:
        return f"PostgreSQL table gateway_oauth_tokens, account {account}"

    def problem(self) -> str | None:
        return None  # the database's reachability is /readyz's business

    def _seen(self, account: str, version: int | None) -> None:
        if self._clock is not None:
            self._versions[account] = (self._clock.seconds(), version)

    def stamp(self, account: str, *, fresh: bool = False) -> Deferred[object]:
        cached = self._versions.get(account)
        if not fresh and cached is not None and self._clock is not None:
            if self._clock.seconds() - cached[0] < SYNC_INTERVAL:
                return succeed(cached[1])

        def work(connection: psycopg.Connection[Any]) -> int | None:
            row = connection.execute(
                "SELECT version FROM gateway_oauth_tokens WHERE account = %s", (account,)
            ).fetchone()
            return None if row is None else int(row[0])

        def seen(version: int | None) -> object:
            self._seen(account, version)
            return version

        return self._database.run(work).addCallback(seen)

    def fetch(self, account: str) -> Deferred[TokenRecord | None]:
        def work(connection: psycopg.Connection[Any]) -> tuple[TokenRecord | None, int | None]:
            row = connection.execute(
                "SELECT blob, version FROM gateway_oauth_tokens WHERE account = %s", (account,)
            ).fetchone()
            if row is None:
                return None, None
            return self._cipher.unseal(account, WHERE, bytes(row[0])), int(row[1])

        def seen(result: tuple[TokenRecord | None, int | None]) -> TokenRecord | None:
            self._seen(account, result[1])
            return result[0]

        return self._database.run(work).addCallback(seen)

    def change(
        self, account: str, change: Change, *, replace_unreadable: bool = False
    ) -> Deferred[TokenRecord | None]:
        cipher = self._cipher

        def work(connection: psycopg.Connection[Any]) -> tuple[TokenRecord | None, int | None]:
            connection.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", (_LOCK_PREFIX + account,)
            )
            row = connection.execute(
                "SELECT blob, version FROM gateway_oauth_tokens WHERE account = %s FOR UPDATE",
                (account,),
            ).fetchone()
            current: TokenRecord | None = None
            version = None if row is None else int(row[1])
            if row is not None:
                try:
                    current = cipher.unseal(account, WHERE, bytes(row[0]))
                except StoreUnreadable:
                    if not replace_unreadable:
                        raise
            new = change(current)
            if new is None or new is current:
                return current, version
            written = connection.execute(
                "INSERT INTO gateway_oauth_tokens"
                " (account, blob, lineage, state, last_error, version, updated_at)"
                " VALUES (%s, %s, %s, %s, %s, 1, now())"
                " ON CONFLICT (account) DO UPDATE SET blob = EXCLUDED.blob,"
                " lineage = EXCLUDED.lineage, state = EXCLUDED.state,"
                " last_error = EXCLUDED.last_error,"
                " version = gateway_oauth_tokens.version + 1, updated_at = now()"
                " RETURNING version",
                (
                    account,
                    cipher.seal(account, new.to_json()),
                    new.lineage,
                    new.state,
                    new.last_error,
                ),
            ).fetchone()
            return new, None if written is None else int(written[0])

        def seen(result: tuple[TokenRecord | None, int | None]) -> TokenRecord | None:
            self._seen(account, result[1])
            return result[0]

        return self._database.run(work).addCallback(seen)

    def stored_accounts(self) -> Deferred[list[str]]:
        def work(connection: psycopg.Connection[Any]) -> list[str]:
            rows = connection.execute("SELECT account FROM gateway_oauth_tokens ORDER BY account")
            return [str(row[0]) for row in rows]

        return self._database.run(work)

    def claim_refresh(self, account: str) -> Deferred[PostgresRefreshClaim | None]:
        """Take the account's refresh lease in one UPDATE; None if a live
        process holds it. An account without a row has nothing to refresh
        from: the claim is granted (and releases nothing)."""
        me = self._process

        def work(connection: psycopg.Connection[Any]) -> bool:
            taken = connection.execute(
                "UPDATE gateway_oauth_tokens AS t SET refreshing = %(me)s,"
                " refresh_until = now() + make_interval(secs => %(lease)s)"
                " WHERE t.account = %(account)s AND (t.refreshing IS NULL"
                " OR t.refreshing = %(me)s OR t.refresh_until <= now()"
                # A holder whose process lease has passed is dead.
                " OR EXISTS (SELECT 1 FROM gateway_processes AS p"
                " WHERE p.process = t.refreshing AND p.lease_until <= now())"
                # One with no row at all (gone, or not registered yet: a node
                # starting, `gateway check`) is given UNREGISTERED_GRACE.
                " OR (NOT EXISTS (SELECT 1 FROM gateway_processes AS p"
                " WHERE p.process = t.refreshing)"
                " AND t.refresh_until <= now() + make_interval(secs => %(young)s)))"
                " RETURNING t.account",
                {
                    "me": me,
                    "lease": REFRESH_LEASE,
                    "young": REFRESH_LEASE - UNREGISTERED_GRACE,
                    "account": account,
                },
            ).fetchone()
            if taken is not None:
                return True
            exists = connection.execute(
                "SELECT 1 FROM gateway_oauth_tokens WHERE account = %s", (account,)
            ).fetchone()
            return exists is None

        def granted(ok: bool) -> PostgresRefreshClaim | None:
            return PostgresRefreshClaim(self, account) if ok else None

        return self._database.run(work).addCallback(granted)

    def release_refresh(self, account: str) -> Deferred[None]:
        """Give the lease up; if the database cannot be told, it expires."""
        me = self._process

        def work(connection: psycopg.Connection[Any]) -> None:
            connection.execute(
                "UPDATE gateway_oauth_tokens SET refreshing = NULL, refresh_until = NULL"
                " WHERE account = %s AND refreshing = %s",
                (account, me),
            )

        done = self._database.run(work)
        done.addErrback(lambda failure: failure.trap(StateUnavailable))
        return done.addCallback(lambda _: None)
