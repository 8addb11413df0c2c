"""Where the console's sessions live: this process's memory, or PostgreSQL.

A session is a random id in the browser's cookie that maps to the admin's
name (None before the login), a CSRF token, when it was last used (a session
unused for `idle` seconds is over) and the notices its next page shows.

- `Sessions` (the embedded backend): in this process's memory, so a restart
  logs everyone out. Enough with worker processes too: the admin listener,
  and so the console, is served by one worker of a host (worker 0, see
  `gateway.workers`); were it served by several, each would have its own
  sessions and a browser landing on another would be sent to the login form.
- `PostgresSessions` (`[state] backend = "postgresql"`, schema
  migrations/0004_console_sessions.sql): shared by every node, so a login on
  one node behind HAProxy holds on the others and survives a restart. The
  database holds a SHA-256 digest of the id, never the id: whoever reads the
  table cannot present a cookie from it.

`SessionStore` is what the console's pages use; its answers are Deferreds
(the database is reached from a thread pool). The memory store's have
already fired, so with it a page is answered without waiting.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from gateway.state.database import Database

# Sessions kept at most (the oldest go first): a flood of login pages must
# not grow memory, or the table, without bound.
MAX_SESSIONS = 2000


@dataclass
class Session:
    """One browser's: `admin` is None until it logs in (the login form's CSRF)."""

    id: str
    csrf: str
    admin: str | None
    last_used: float
    # What the next page says once (the outcome of an action).
    notices: list[str] = field(default_factory=list)

    def csrf_ok(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.csrf.encode())


class SessionStore(Protocol):
    """The console's sessions, wherever they are kept."""

    # Seconds a session may go unused; changed by a reload.
    idle: float

    def open(self, admin: str | None = None) -> Deferred[Session]:
        """A new session (a new id: one seen before a login is worth nothing)."""
        ...

    def find(self, session_id: str | None) -> Deferred[Session | None]:
        """The live session with this id (its idle timer restarted), or None."""
        ...

    def close(self, session: Session) -> Deferred[None]:
        """End the session (logout, or replaced at login)."""
        ...

    def note(self, session: Session, text: str) -> Deferred[None]:
        """Have the session's next page say `text` once."""
        ...

    def shown(self, session: Session, count: int) -> Deferred[None]:
        """The first `count` notices were shown (on the page being sent); the
        page need not wait for this, and it never fails."""
        ...


def _new(admin: str | None, now: float) -> Session:
    return Session(
        id=secrets.token_urlsafe(32), csrf=secrets.token_urlsafe(32), admin=admin, last_used=now
    )


class Sessions:
    """The sessions of this process, in memory."""

    def __init__(self, clock: IReactorTime, idle: float) -> None:
        self._clock = clock
        self.idle = idle
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def new(self, admin: str | None = None) -> Session:
        session = _new(admin, self._clock.seconds())
        self._sessions[session.id] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session (its idle timer restarted), or None."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock.seconds()
        if now - session.last_used > self.idle:
            del self._sessions[session_id]
            return None
        session.last_used = now
        self._sessions.move_to_end(session_id)
        return session

    def end(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    # -- SessionStore: the same, answered at once ----------------------------------

    def open(self, admin: str | None = None) -> Deferred[Session]:
        return succeed(self.new(admin))

    def find(self, session_id: str | None) -> Deferred[Session | None]:
        return succeed(self.get(session_id))

    def close(self, session: Session) -> Deferred[None]:
        self.end(session)
        return succeed(None)

    def note(self, session: Session, text: str) -> Deferred[None]:
        session.notices.append(text)
        return succeed(None)

    def shown(self, session: Session, count: int) -> Deferred[None]:
        # The page took them from the session object itself, which is ours.
        return succeed(None)


def digest(session_id: str) -> bytes:
    """What the database keeps of a session id."""
    return hashlib.sha256(session_id.encode("ascii", "replace")).digest()


Connection = psycopg.Connection[Any]


class PostgresSessions:
    """The sessions of every node, in the state database."""

    def __init__(self, database: Database, clock: IReactorTime, idle: float) -> None:
        self._database = database
        self._clock = clock
        self.idle = idle

    def open(self, admin: str | None = None) -> Deferred[Session]:
        now = self._clock.seconds()
        session = _new(admin, now)
        key, idle = digest(session.id), self.idle

        def work(connection: Connection) -> Session:
            connection.execute(
                "DELETE FROM gateway_console_sessions WHERE last_seen < %s", (now - idle,)
            )
            connection.execute(
                "INSERT INTO gateway_console_sessions"
                " (token_hash, csrf, admin, created_at, last_seen) VALUES (%s, %s, %s, %s, %s)",
                (key, session.csrf, admin, now, now),
            )
            connection.execute(
                "DELETE FROM gateway_console_sessions WHERE token_hash IN"
                " (SELECT token_hash FROM gateway_console_sessions"
                "  ORDER BY last_seen DESC OFFSET %s)",
                (MAX_SESSIONS,),
            )
            return session

        return self._database.run(work)

    def find(self, session_id: str | None) -> Deferred[Session | None]:
        if not session_id:
            return succeed(None)
        now, key, idle = self._clock.seconds(), digest(session_id), self.idle

        def work(connection: Connection) -> Session | None:
            row = connection.execute(
                "UPDATE gateway_console_sessions SET last_seen = %s"
                " WHERE token_hash = %s AND last_seen >= %s"
                " RETURNING csrf, admin, notices",
                (now, key, now - idle),
            ).fetchone()
            if row is None:
                connection.execute(
                    "DELETE FROM gateway_console_sessions WHERE token_hash = %s", (key,)
                )
                return None
            csrf, admin, notices = row
            return Session(session_id, csrf, admin, now, list(notices))

        return self._database.run(work)

    def close(self, session: Session) -> Deferred[None]:
        key = digest(session.id)

        def work(connection: Connection) -> None:
            connection.execute(
                "DELETE FROM gateway_console_sessions WHERE token_hash = %s", (key,)
            )

        return self._database.run(work)

    def note(self, session: Session, text: str) -> Deferred[None]:
        session.notices.append(text)
        key = digest(session.id)

        def work(connection: Connection) -> None:
            connection.execute(
                "UPDATE gateway_console_sessions SET notices = array_append(notices, %s)"
                " WHERE token_hash = %s",
                (text, key),
            )

        return self._database.run(work)

    def shown(self, session: Session, count: int) -> Deferred[None]:
        """Dropped in the background: at worst a notice shows twice, if the
        next page is asked for before the database has forgotten it."""
        if count <= 0:
            return succeed(None)
        key = digest(session.id)

        def work(connection: Connection) -> None:
            connection.execute(
                "UPDATE gateway_console_sessions SET notices = notices[%s:]"
                " WHERE token_hash = %s",
                (count + 1, key),
            )

        return self._database.run(work).addErrback(lambda _: None)


def session_store(database: Database | None, clock: IReactorTime, idle: float) -> SessionStore:
    """The store of the state backend: shared with PostgreSQL, else in memory."""
    if database is None:
        return Sessions(clock, idle)
    return PostgresSessions(database, clock, idle)
