"""The web console's routes (Klein), mounted at `/console/` on the admin listener.

Every page but the login form and the OAuth2 callback needs a session;
without one a GET is sent to the login form and anything else gets 403.
Every POST must carry the session's CSRF token (403 otherwise), so another
site cannot make an admin's browser act, even where `SameSite` is not
honoured. Actions write one audit line each:
``console action=... admin=... target=...``.

Pages are server-rendered Jinja2 templates with autoescape on; none needs
JavaScript (the device-code page reloads itself with a meta refresh).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, select_autoescape
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from gateway.admin.console import views
from gateway.admin.console.auth import AdminLogins
from gateway.admin.console.connect import AccountActions
from gateway.admin.console.sessions import Session, SessionStore
from gateway.admin.listeners import ListenerWatch
from gateway.admin.metrics import GatewayMetrics
from gateway.model import Config
from gateway.oauth.admin import CommandFailed
from gateway.oauth.errors import OAuthError
from gateway.sessions import log_value
from gateway.smtp.spool_records import valid_id
from gateway.smtp.spool_store import SpoolStore as Spool
from gateway.state.database import StateUnavailable

log = Logger(namespace="gateway.admin.console")

COOKIE = b"gateway_console"
PREFIX = "/console"
_HEADERS = {
    b"cache-control": b"no-store",
    b"x-frame-options": b"DENY",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"content-security-policy": (
        b"default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self'; "
        b"form-action 'self' http: https:; frame-ancestors 'none'; base-uri 'none'"
    ),
}


def audit(action: str, admin: str, target: str) -> None:
    """The audit line of one console action."""
    log.info(
        "console action={action} admin={admin} target={target}",
        action=action,
        admin=log_value(admin),
        target=log_value(target),
    )


@dataclass
class ConsoleState:
    """What the console reads: the running gateway's own objects."""

    config: Callable[[], Config]
    clock: IReactorTime
    metrics: GatewayMetrics
    watches: Callable[[], list[ListenerWatch]]
    spool: Spool | None
    uses_tls: bool


class Console:
    app = Klein()

    def __init__(
        self,
        state: ConsoleState,
        logins: AdminLogins,
        sessions: SessionStore,
        actions: AccountActions,
    ) -> None:
        self.state = state
        self.logins = logins
        self.sessions = sessions
        self.actions = actions
        self.templates = Environment(
            loader=PackageLoader("gateway.admin.console", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )

    # -- plumbing --------------------------------------------------------------

    def _session(self, request: Request) -> Deferred[Session | None]:
        raw = request.getCookie(COOKIE)
        return self.sessions.find(raw.decode("ascii", "replace") if raw else None)

    def _set_cookie(self, request: Request, session: Session) -> None:
        request.addCookie(
            COOKIE,
            session.id.encode("ascii"),
            path=PREFIX.encode(),
            secure=self.state.uses_tls,
            httpOnly=True,
            sameSite="strict",
        )

    async def _admin(self, request: Request, *, post: bool = False) -> Session | None:
        """The logged-in session, or None after answering (redirect or 403)."""
        _headers(request)
        session = await self._session(request)
        if session is None or session.admin is None:
            if post:
                request.setResponseCode(403)
            else:
                _redirect(request, f"{PREFIX}/login")
            return None
        if post and not session.csrf_ok(_field(request, "csrf")):
            request.setResponseCode(403)
            return None
        return session

    def _render(
        self, request: Request, template: str, session: Session | None, **ctx: Any
    ) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        notices: list[str] = []
        if session is not None:
            notices, session.notices = session.notices, []
            self.sessions.shown(session, len(notices))
        page = self.templates.get_template(template).render(
            prefix=PREFIX,
            admin=session.admin if session is not None else None,
            csrf=session.csrf if session is not None else "",
            notices=notices,
            page=template.removesuffix(".html"),
            now=views.when(self.state.clock.seconds()),
            **ctx,
        )
        return page.encode("utf-8")

    # -- login -----------------------------------------------------------------

    @app.route("/login", methods=["GET"])
    def login_form(self, request: Request) -> bytes | Deferred[bytes]:
        return _answer(request, self._login_form(request))

    async def _login_form(self, request: Request) -> bytes:
        _headers(request)
        session = await self._session(request)
        if session is not None and session.admin is not None:
            _redirect(request, f"{PREFIX}/")
            return b""
        if session is None:
            session = await self.sessions.open()
            self._set_cookie(request, session)
        return self._render(request, "login.html", session, error=None)

    @app.route("/login", methods=["POST"])
    async def login(self, request: Request) -> bytes:
        return await _unless_unavailable(request, self._login(request))

    async def _login(self, request: Request) -> bytes:
        _headers(request)
        session = await self._session(request)
        if session is None or not session.csrf_ok(_field(request, "csrf")):
            request.setResponseCode(403)
            return b"expired or forged form: reload the login page\n"
        name = _field(request, "name") or ""
        password = _field(request, "password") or ""
        peer = _peer(request)
        admin = await self.logins.check(name, password, peer)
        if admin is None:
            audit("login-refused", name, peer)
            request.setResponseCode(401)
            return self._render(
                request, "login.html", session, error="wrong name or password", name=name
            )
        # A fresh id once logged in: an id seen before the login is worth nothing.
        await self.sessions.close(session)
        session = await self.sessions.open(admin)
        self._set_cookie(request, session)
        audit("login", admin, peer)
        _redirect(request, f"{PREFIX}/")
        return b""

    @app.route("/logout", methods=["POST"])
    def logout(self, request: Request) -> bytes | Deferred[bytes]:
        return _answer(request, self._logout(request))

    async def _logout(self, request: Request) -> bytes:
        session = await self._admin(request, post=True)
        if session is None:
            return b"forbidden\n"
        await self.sessions.close(session)
        assert session.admin is not None
        audit("logout", session.admin, "-")
        _redirect(request, f"{PREFIX}/login")
        return b""

    # -- pages -----------------------------------------------------------------

    @app.route("/", methods=["GET"])
    def overview(self, request: Request) -> bytes | Deferred[bytes]:
        return _answer(request, self._overview(request))

    async def _overview(self, request: Request) -> bytes:
        session = await self._admin(request)
        if session is None:
            return b""
        s = self.state
        data = views.overview(s.config(), s.watches(), s.metrics, s.spool, s.clock.seconds())
        return self._render(request, "overview.html", session, **data)

    @app.route("/devices", methods=["GET"])
    def devices(self, request: Request) -> bytes | Deferred[bytes]:
        return _answer(request, self._devices(request))

    async def _devices(self, request: Request) -> bytes:
        session = await self._admin(request)
        if session is None:
            return b""
        rows = views.devices(self.state.config(), self.state.metrics)
        return self._render(request, "devices.html", session, devices=rows)

    @app.route("/accounts", methods=["GET"])
    def accounts(self, request: Request) -> bytes | Deferred[bytes]:
        return _answer(request, self._accounts(request))

    async def _accounts(self, request: Request) -> bytes:
        session = await self._admin(request)
        if session is None:
            return b""
        rows = views.accounts(
            self.state.config(), self.state.clock.seconds(), self.actions.checks, self.actions.flow
        )
        waiting = any(
            (row["flow"] and row["flow"]["status"] == "waiting")
            or (row["check"] and row["check"]["running"])
            for row in rows
        )
        # A refresh to the page's own URL would keep a #fragment, which
        # browsers take as a jump within the page, not a reload: name it.
        return self._render(
            request,
            "accounts.html",
            session,
            accounts=rows,
            refresh=waiting,
            refresh_url=f"{PREFIX}/accounts",
        )

    @app.route("/queue", methods=["GET"])
    def queue(self, request: Request) -> Deferred[bytes]:
        # Always a Deferred: the spool's listing may wait (PostgreSQL).
        return Deferred.fromCoroutine(_unless_unavailable(request, self._queue(request)))

    async def _queue(self, request: Request) -> bytes:
        session = await self._admin(request)
        if session is None:
            return b""
        # The embedded spool answers at once; PostgreSQL's listing waits.
        return await self._queue_page(request, session)

    async def _queue_page(self, request: Request, session: Session) -> bytes:
        spool = self.state.spool
        try:
            entries = await spool.listing() if spool is not None else None
        except OSError as e:
            entries = None
            session.notices.append(f"the spool cannot be read now: {e}")
        rows = views.queue(entries, self.state.clock.seconds())
        return self._render(
            request, "queue.html", session, messages=rows, spool=self.state.spool is not None
        )

    # -- actions ---------------------------------------------------------------

    @app.route("/queue/<message_id>/<verb>", methods=["POST"])
    def queue_action(self, request: Request, message_id: str, verb: str) -> Deferred[bytes]:
        # Always a Deferred: the spool's request may wait (PostgreSQL).
        page = self._queue_action(request, message_id, verb)
        return Deferred.fromCoroutine(_unless_unavailable(request, page))

    async def _queue_action(self, request: Request, message_id: str, verb: str) -> bytes:
        session = await self._admin(request, post=True)
        if session is None:
            return b"forbidden\n"
        assert session.admin is not None
        spool = self.state.spool
        if verb not in ("retry", "delete") or not valid_id(message_id) or spool is None:
            request.setResponseCode(404)
            return b"no such action\n"
        try:
            # What `gateway queue retry|delete` does while the gateway runs:
            # a request the relay (of whichever process) carries out within seconds.
            known = await spool.request("retry" if verb == "retry" else "delete", message_id)
        except OSError as e:
            await self.sessions.note(session, f"{message_id}: {verb} failed: {e}")
            known = None
        if known is False:
            await self.sessions.note(
                session, f"no message {message_id} (already delivered or deleted?)"
            )
        elif known:
            audit(f"queue-{verb}", session.admin, message_id)
            await self.sessions.note(
                session, f"{message_id}: {verb} requested; carried out within seconds"
            )
        _redirect(request, f"{PREFIX}/queue")
        return b""

    @app.route("/accounts/<name>/<verb>", methods=["POST"])
    async def account_action(self, request: Request, name: str, verb: str) -> bytes:
        return await _unless_unavailable(request, self._account_action(request, name, verb))

    async def _account_action(self, request: Request, name: str, verb: str) -> bytes:
        session = await self._admin(request, post=True)
        if session is None:
            return b"forbidden\n"
        admin = session.admin
        assert admin is not None
        if name not in self.state.config().accounts or verb not in ("connect", "forget", "check"):
            request.setResponseCode(404)
            return b"no such account or action\n"
        try:
            if verb == "connect":
                audit("connect", admin, name)
                flow = self.actions.connect(name, admin, _callback_uri(request))
                if flow.url is not None:
                    _redirect(request, flow.url)
                    return b""
            elif verb == "forget":
                outcome = await self.actions.forget(name, admin)
                notice = f"{name}: tokens forgotten (at the provider: {outcome})"
                await self.sessions.note(session, notice)
            else:
                self.actions.check(name, admin)
        except (CommandFailed, OAuthError) as e:
            await self.sessions.note(session, f"{name}: {e}")
        _redirect(request, f"{PREFIX}/accounts#account-{quote(name)}")
        return b""

    @app.route("/oauth/callback", methods=["GET"])
    async def oauth_callback(self, request: Request) -> bytes:
        _headers(request)
        state = _field(request, "state") or ""
        query = request.uri.decode("ascii", "replace").partition("?")[2]
        flow = await self.actions.code_callback(query, state)
        if flow is None:
            request.setResponseCode(400)
            return self._render(request, "callback.html", None, flow=None)
        return self._render(
            request,
            "callback.html",
            None,
            flow=flow.view(),
            account=flow.account,
            refresh=True,
            refresh_seconds=1,
            refresh_url=f"{PREFIX}/accounts#account-{quote(flow.account)}",
        )


def _answer(request: Request, page: Coroutine[Any, Any, bytes]) -> bytes | Deferred[bytes]:
    """The page itself if it is ready at once (sessions in memory), else a
    Deferred of it (Klein waits for either): a page needs no reactor turn
    unless its session is looked up in the database."""
    answer = Deferred.fromCoroutine(_unless_unavailable(request, page))
    if not answer.called:
        return answer
    outcome: list[bytes | Failure] = []
    answer.addBoth(outcome.append)
    [result] = outcome
    if isinstance(result, Failure):
        result.raiseException()
    return result


async def _unless_unavailable(request: Request, page: Coroutine[Any, Any, bytes]) -> bytes:
    """The page, or 503 when the sessions' database cannot be reached (one
    log line; the browser may simply reload)."""
    try:
        return await page
    except StateUnavailable as e:
        log.warn("console: sessions unavailable, the state database failed: {error}", error=str(e))
        _headers(request)
        request.setResponseCode(503)
        request.setHeader(b"retry-after", b"5")
        return b"the console's session store is unreachable: try again in a few seconds\n"


def _headers(request: Request) -> None:
    for name, value in _HEADERS.items():
        request.setHeader(name, value)


def _redirect(request: Request, location: str) -> None:
    request.setResponseCode(303)
    request.setHeader(b"location", location.encode("utf-8"))


def _field(request: Request, name: str) -> str | None:
    values = (request.args or {}).get(name.encode())
    if not values:
        return None
    return bytes(values[0]).decode("utf-8", "replace")


def _peer(request: Request) -> str:
    peer = request.getClientAddress()
    return str(getattr(peer, "host", peer))


def _callback_uri(request: Request) -> str:
    """The console's own callback as the admin's browser reaches it."""
    scheme = "https" if request.isSecure() else "http"
    host = (request.getHeader(b"host") or b"localhost").decode("ascii", "replace")
    return f"{scheme}://{host}{PREFIX}/oauth/callback"
