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
on TLS) that maps to the admin's name and a CSRF token; nothing is derived
from it, and a session unused for `idle` seconds is over. Where sessions are
kept (this process's memory, or the state database shared by every node):
`gateway.admin.console.sessions`, re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from gateway.admin.console.sessions import MAX_SESSIONS, Session, Sessions, SessionStore
from gateway.devices import AuthFailed, DeviceAuthenticator
from gateway.model import AdminUser, Device
from gateway.sessions import log_penalty

# The pseudo-protocol admin logins are checked for.
CONSOLE = "console"
# A refusal's least pause, as for a device (`POP3ServerFactory.auth_failure_delay`).
REFUSAL_DELAY = 1.0
__all__ = ["MAX_SESSIONS", "AdminLogins", "Session", "SessionStore", "Sessions"]


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
