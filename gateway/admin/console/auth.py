"""Who may use the web console: admin logins, their penalties, their sessions.

An admin's password is checked the way a device's is (`DeviceAuthenticator`:
argon2 in a worker thread, a bounded number at once, an unknown name costing
what a wrong password costs), so guessing an admin's password is as slow as
guessing a device's. A refusal then pauses before the answer, longer with
each recent failure from the same address (`LoginPenalties`); that part sits
behind a small protocol so a gateway-wide penalty box can replace it.

A session is a random id in a cookie (`HttpOnly`, `SameSite=Strict`, `Secure`
on TLS) that maps to the admin's name and a CSRF token in memory; nothing is
derived from it, so a restart logs everyone out, and a session unused for
`idle` seconds is over.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from gateway.devices import AuthFailed, DeviceAuthenticator
from gateway.model import AdminUser, Device

# The pseudo-protocol admin logins are checked for.
CONSOLE = "console"
# What a refusal costs, as for a device (`POP3ServerFactory.auth_failure_delay`),
# times the recent failures from the address, up to the cap.
BASE_DELAY = 1.0
MAX_DELAY = 30.0
FAILURE_MEMORY = 900.0
# Sessions kept at most (the oldest go first): a flood of login pages must
# not grow memory without bound.
MAX_SESSIONS = 2000


class Penalties(Protocol):
    """What a refused login costs an address (`gateway.penalties` may provide one)."""

    async def refused(self, peer: str) -> None: ...

    def succeeded(self, peer: str) -> None: ...


class LoginPenalties:
    """A pause before each refusal: `BASE_DELAY` times the failures the
    address had in the last `FAILURE_MEMORY` seconds, at most `MAX_DELAY`."""

    def __init__(self, clock: IReactorTime, base: float = BASE_DELAY) -> None:
        self._clock = clock
        self._base = base
        self._failures: dict[str, list[float]] = {}

    async def refused(self, peer: str) -> None:
        now = self._clock.seconds()
        recent = [t for t in self._failures.get(peer, []) if now - t < FAILURE_MEMORY]
        recent.append(now)
        self._failures[peer] = recent[-64:]
        if len(self._failures) > MAX_SESSIONS:
            self._failures.pop(next(iter(self._failures)))
        await deferLater(self._clock, min(self._base * len(recent), MAX_DELAY), lambda: None)

    def succeeded(self, peer: str) -> None:
        self._failures.pop(peer, None)


class AdminLogins:
    """Checks an admin's name and password, with the device logins' costs."""

    def __init__(
        self,
        users: Mapping[str, AdminUser],
        penalties: Penalties,
        authenticator: DeviceAuthenticator | None = None,
    ) -> None:
        self._penalties = penalties
        self._authenticator = authenticator or DeviceAuthenticator({})
        self.reconfigure(users)

    def reconfigure(self, users: Mapping[str, AdminUser]) -> None:
        self._authenticator.reconfigure(
            {
                name: Device(
                    name=name,
                    password_hash=user.password_hash,
                    account="",
                    protocols=frozenset({CONSOLE}),
                )
                for name, user in users.items()
            }
        )

    async def check(self, name: str, password: str, peer: str) -> str | None:
        """The admin's name, or None after the penalty's pause."""
        try:
            user = await self._authenticator.authenticate(
                name, password.encode("utf-8", "surrogateescape"), peer, CONSOLE
            )
        except AuthFailed:
            await self._penalties.refused(peer)
            return None
        self._penalties.succeeded(peer)
        return user.name


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


class Sessions:
    def __init__(self, clock: IReactorTime, idle: float) -> None:
        self._clock = clock
        self.idle = idle
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def new(self, admin: str | None = None) -> Session:
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            admin=admin,
            last_used=self._clock.seconds(),
        )
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
