"""Who may use the web console: admin logins, their penalties, their sessions.

An admin's password is checked the way a device's is, by a
`DeviceAuthenticator` of its own over the admin users: argon2 in a worker
thread, a bounded number at once, an unknown name costing what a wrong
password costs, and the login penalties of `[penalties]`
(`gateway.penalties`): each failure from an address doubles the pause
before the next answer, too many lock the address out, and a penalty that
starts gets the same log line as a device's (which the fail2ban filter
matches). A refusal waits at least the device refusal's one second. The
admin logins keep their own penalty book, so an admin mistyping from the
office network never slows the printers there, nor the reverse.

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

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from gateway.devices import AuthFailed, DeviceAuthenticator
from gateway.model import AdminUser, Device
from gateway.sessions import log_penalty

# The pseudo-protocol admin logins are checked for.
CONSOLE = "console"
# A refusal's least pause, as for a device (`POP3ServerFactory.auth_failure_delay`).
REFUSAL_DELAY = 1.0
# Sessions kept at most (the oldest go first): a flood of login pages must
# not grow memory without bound.
MAX_SESSIONS = 2000


class AdminLogins:
    """Checks an admin's name and password, with the device logins' costs."""

    def __init__(
        self,
        users: Mapping[str, AdminUser],
        authenticator: DeviceAuthenticator,
        clock: IReactorTime,
        refusal_delay: float = REFUSAL_DELAY,
    ) -> None:
        """`authenticator` is the admins' own (made with the penalty book and
        clock); its devices are replaced by the admin users here."""
        self._authenticator = authenticator
        self._clock = clock
        self._refusal_delay = refusal_delay
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
        """The admin's name (after a penalty's pause, if the address earned
        one), or None after the refusal's pause."""
        try:
            user = await self._authenticator.authenticate(
                name, password.encode("utf-8", "surrogateescape"), peer, CONSOLE
            )
        except AuthFailed as refusal:
            for penalty in refusal.penalized:
                log_penalty(penalty, peer)
            pause = max(self._refusal_delay, refusal.delay)
            await deferLater(self._clock, pause, lambda: None)
            return None
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
