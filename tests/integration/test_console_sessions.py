"""Console sessions on both state backends: one suite for the store, then
what PostgreSQL adds: a session opened on one node holds on another, and the
database never holds the cookie's id."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import pytest
from pytest_twisted import async_yield_fixture, ensureDeferred
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from gateway.admin.console.app import COOKIE
from gateway.admin.console.sessions import (
    MAX_SESSIONS,
    PostgresSessions,
    Sessions,
    SessionStore,
    session_store,
)
from gateway.state.database import Database
from tests.helpers.log_lines import captured_log
from tests.helpers.state import postgres_settings
from tests.unit.test_console import console, request

pytestmark = pytest.mark.integration

IDLE = 1800.0


class Stores:
    """Stores of one backend on one clock; with PostgreSQL each is another
    node (its own pool) on the same database."""

    def __init__(self, dsn: str | None) -> None:
        self.dsn = dsn
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.databases: list[Database] = []
        self._memory = Sessions(self.clock, IDLE)

    @property
    def shared(self) -> bool:
        return self.dsn is not None

    def store(self) -> SessionStore:
        if self.dsn is None:
            return self._memory
        database = Database(postgres_settings(self.dsn), reactor)
        self.databases.append(database)
        return session_store(database, self.clock, IDLE)

    async def close(self) -> None:
        for database in self.databases:
            await database.stop()


@async_yield_fixture(params=["embedded", "postgresql"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[Stores]:
    dsn = request.getfixturevalue("state_dsn") if request.param == "postgresql" else None
    made = Stores(dsn)
    try:
        yield made
    finally:
        await made.close()


# -- the store's promises, on each backend ---------------------------------------------


@ensureDeferred
async def test_a_session_is_found_by_its_id_until_idle_then_gone(stores: Stores) -> None:
    first, second = stores.store(), stores.store()
    session = await first.open("root")
    found = await second.find(session.id)
    assert found is not None and (found.admin, found.csrf) == ("root", session.csrf)
    stores.clock.advance(IDLE - 1)
    assert await second.find(session.id) is not None  # used: the timer restarted
    stores.clock.advance(IDLE - 1)
    assert await first.find(session.id) is not None
    stores.clock.advance(IDLE + 1)
    assert await first.find(session.id) is None
    assert await second.find(session.id) is None


@ensureDeferred
async def test_logout_ends_the_session_everywhere(stores: Stores) -> None:
    first, second = stores.store(), stores.store()
    session = await first.open("root")
    other = await first.open("root")
    found = await second.find(session.id)
    assert found is not None
    await second.close(found)
    assert await first.find(session.id) is None
    assert await first.find(other.id) is not None
    assert await first.find(None) is None and await first.find("made-up") is None


@ensureDeferred
async def test_a_login_form_session_has_no_admin_and_its_own_csrf(stores: Stores) -> None:
    store = stores.store()
    anonymous, admin = await store.open(), await store.open("root")
    found = await store.find(anonymous.id)
    assert found is not None and found.admin is None
    assert anonymous.id != admin.id and anonymous.csrf != admin.csrf
    assert found.csrf_ok(anonymous.csrf) and not found.csrf_ok(admin.csrf)


@ensureDeferred
async def test_notices_show_once_on_the_next_page(stores: Stores) -> None:
    first, second = stores.store(), stores.store()
    session = await first.open("root")
    await first.note(session, "queued: retry requested")
    page = await second.find(session.id)
    assert page is not None and page.notices == ["queued: retry requested"]
    shown, page.notices = page.notices, []
    await second.shown(page, len(shown))
    again = await first.find(session.id)
    assert again is not None and again.notices == []


# -- PostgreSQL ---------------------------------------------------------------------


@ensureDeferred
async def test_the_database_holds_a_digest_of_the_id_never_the_id(state_dsn: str) -> None:
    stores = Stores(state_dsn)
    try:
        store = stores.store()
        assert isinstance(store, PostgresSessions)
        session = await store.open("root")
        rows = await stores.databases[0].run(
            lambda c: c.execute("SELECT * FROM gateway_console_sessions").fetchall()
        )
        [row] = rows
        assert bytes(row[0]) == hashlib.sha256(session.id.encode()).digest()
        assert not any(session.id in str(value) for value in row)
    finally:
        await stores.close()


@ensureDeferred
async def test_sessions_are_bounded_oldest_first(state_dsn: str) -> None:
    stores = Stores(state_dsn)
    try:
        store = stores.store()
        first = await store.open()
        database = stores.databases[0]
        # Fill the table up to the bound behind the store's back (quicker).
        await database.run(
            lambda c: c.execute(
                "INSERT INTO gateway_console_sessions"
                " (token_hash, csrf, created_at, last_seen)"
                " SELECT sha256(i::text::bytea), 'x', %s, %s FROM generate_series(1, %s) i",
                (stores.clock.seconds() + 1, stores.clock.seconds() + 1, MAX_SESSIONS - 1),
            )
        )
        stores.clock.advance(2)
        last = await store.open("root")
        assert await store.find(first.id) is None and await store.find(last.id) is not None
        count = await database.run(
            lambda c: c.execute("SELECT count(*) FROM gateway_console_sessions").fetchone()
        )
        assert count == (MAX_SESSIONS,)
    finally:
        await stores.close()


async def _page(answer: Any) -> bytes:
    if isinstance(answer, Deferred | Coroutine):
        answer = await answer
    assert isinstance(answer, bytes)
    return answer


def _cookie(r: Any) -> bytes:
    return bytes(r.cookies[-1].split(b";")[0].split(b"=", 1)[1])


@ensureDeferred
async def test_a_login_on_one_node_holds_on_the_other(tmp_path: Path, state_dsn: str) -> None:
    stores = Stores(state_dsn)
    try:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        a, _ = console(tmp_path / "a")
        b, _ = console(tmp_path / "b")
        a.sessions, b.sessions = stores.store(), stores.store()
        # The login form from node a, the login posted to node b.
        r = request(b"login")
        await _page(a.login_form(r))
        before = _cookie(r)
        form = await a.sessions.find(before.decode())
        assert form is not None
        r = request(b"login", b"POST", csrf=form.csrf, name="root", password="admin-pw")
        r.received_cookies[COOKIE] = before
        await b.login(r)
        assert r.responseCode == 303
        after = _cookie(r)
        # Node a knows the new session, and no longer the form's.
        r = request(b"queue")
        r.received_cookies[COOKIE] = after
        page = await _page(a.queue(r))
        assert r.responseCode in (None, 200) and b"root" in page
        r = request(b"queue")
        r.received_cookies[COOKIE] = before
        await _page(a.queue(r))
        assert r.responseCode == 303
        # Logout on a: b sends the browser to the login form.
        session = await a.sessions.find(after.decode())
        assert session is not None
        r = request(b"logout", b"POST", csrf=session.csrf)
        r.received_cookies[COOKIE] = after
        await _page(a.logout(r))
        r = request(b"queue")
        r.received_cookies[COOKIE] = after
        await _page(b.queue(r))
        assert r.responseCode == 303
    finally:
        await stores.close()


@ensureDeferred
async def test_the_database_down_answers_503_not_a_traceback(tmp_path: Path) -> None:
    database = Database(
        postgres_settings("host=127.0.0.1 port=9 user=gw dbname=none", timeout=1.0), reactor
    )
    try:
        c, _ = console(tmp_path)
        c.sessions = PostgresSessions(database, Clock(), IDLE)
        with captured_log() as lines:
            for path, method, handler in [
                (b"queue", b"GET", c.queue),
                (b"login", b"GET", c.login_form),
                (b"login", b"POST", c.login),
            ]:
                r = request(path, method, csrf="x", name="root", password="admin-pw")
                r.received_cookies[COOKIE] = b"some-session"
                page = await _page(handler(r))
                assert r.responseCode == 503 and b"try again" in page
        failed = [line for line in lines if "sessions unavailable" in line]
        assert len(failed) == 3 and not any("Traceback" in line for line in lines)
    finally:
        await database.stop()
