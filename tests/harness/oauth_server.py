"""A small OAuth2 authorization server for tests and benchmarks, on 127.0.0.1.

It implements just enough of the real thing for the gateway to be tested
end to end, strictly, so that mistakes fail here rather than at a provider:

- ``POST /token``: refresh_token (with strict rotation: a used refresh token
  is dead, as with the strictest providers), client_credentials,
  authorization_code (single use, PKCE S256 and redirect_uri checked) and the
  device_code grant (RFC 8628 polling answers);
- ``POST /device``: device authorization (RFC 8628 3.1);
- ``GET /authorize``: the code grant's browser step; "the user" consents at
  once (as ``consent_user``) and is redirected with code and state;
- ``POST /introspect``: RFC 7662, which Dovecot's oauth2 passdb asks about
  every bearer token;
- ``/control/...``: what a test does to the server (approve a device code,
  revoke a user, expire tokens, inject errors, hold requests, register a
  service account) and ``GET /control/stats``, the request counts tests
  assert on.

``mode = "entra"`` or ``"google"`` makes it behave as that provider
documents (errors, client authentication, device-flow scopes, JWT bearer
grant, revocation): see `tests.harness.oauth_modes`. Endpoints are matched
on the end of the path (``.../token``, ``.../devicecode``, ``.../revoke``),
so a preset's URL layout can be reproduced under the server's base URL.

Client authentication is checked (``invalid_client``). Tokens expire by the
server's clock (real time plus `offset`, which ``/control/advance`` moves).

Run in-process (`AuthServer` + `listen`) by tests that drive everything on
the reactor, or as a child process (`OAuthServerProcess`) by tests whose
body blocks (poplib against a twistd gateway), since Dovecot must be able to
introspect while the test waits.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.harness import oauth_modes as modes

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# Device authorization: ours, Microsoft's and Google's paths.
DEVICE_PATHS = ("/device", "/devicecode", "/device/code")


@dataclass
class _Access:
    username: str
    client_id: str
    scope: str
    expires_at: float
    active: bool = True


@dataclass
class _Refresh:
    username: str
    scope: str
    active: bool = True
    # Issued to a public client (no secret presented): Entra refuses a secret
    # on its refresh.
    public: bool = False


@dataclass
class _DeviceCode:
    user_code: str
    scope: str
    expires_at: float
    username: str | None = None
    denied: bool = False
    redeemed: bool = False


@dataclass
class _Code:
    username: str
    client_id: str
    redirect_uri: str
    challenge: str
    scope: str
    used: bool = False


@dataclass
class AuthServer:
    """The server's state; `resource()` serves it over twisted.web."""

    client_id: str = "gateway"
    client_secret: str | None = None
    access_ttl: float = 3600.0
    device_ttl: float = 600.0
    device_interval: int = 5
    # Length of issued access tokens: real ones are 1-2 KB, which forces the
    # two-step form of POP3 AUTH; short ones fit in the initial response.
    token_length: int = 40
    rotate_refresh_tokens: bool = True
    issue_refresh_tokens: bool = True
    # Who "signs in" at /authorize (None: the user declines).
    consent_user: str | None = None
    # The mailbox app-only tokens are introspected as (client credentials).
    client_credentials_user: str = ""
    base_url: str = "http://127.0.0.1"
    offset: float = 0.0
    access: dict[str, _Access] = field(default_factory=dict)
    refresh: dict[str, _Refresh] = field(default_factory=dict)
    devices: dict[str, _DeviceCode] = field(default_factory=dict)
    codes: dict[str, _Code] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    # Queued failures for /token: (HTTP status, body dict); consumed in order.
    failures: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    slow_down: int = 0
    hold: bool = False
    held: list[Deferred[None]] = field(default_factory=list)
    # "generic" (this server's own strict rules), "entra" or "google".
    mode: str = "generic"
    # Entra: the app registration allows public client flows.
    public_client: bool = True
    # Google: client_email -> {"public_key", "key_id", "mailboxes"}.
    service_accounts: dict[str, dict[str, Any]] = field(default_factory=dict)

    # An IReactorTime (a MemoryReactorClock in unit tests); None: real time.
    clock: Any = None

    def now(self) -> float:
        base = self.clock.seconds() if self.clock is not None else time.time()
        return base + self.offset

    # -- what a test does -----------------------------------------------------

    def approve(self, user_code: str, username: str) -> None:
        self._device_by_user_code(user_code).username = username

    def deny(self, user_code: str) -> None:
        self._device_by_user_code(user_code).denied = True

    def pending_user_codes(self) -> list[str]:
        return [d.user_code for d in self.devices.values() if d.username is None and not d.denied]

    def revoke(self, username: str) -> None:
        """The user (or an admin at the provider) withdrew consent: every token dies."""
        for token in self.access.values():
            if token.username == username:
                token.active = False
        for token in self.refresh.values():
            if token.username == username:
                token.active = False

    def expire_access_tokens(self, username: str | None = None) -> None:
        """Access tokens stop working early (server-side), refresh tokens still work."""
        for token in self.access.values():
            if username is None or token.username == username:
                token.active = False

    def fail_next(self, status: int, error: str | None = None, count: int = 1) -> None:
        body = {"error": error} if error else {}
        self.failures.extend([(status, body)] * count)

    def release(self) -> None:
        self.hold = False
        held, self.held = self.held, []
        for d in held:
            d.callback(None)

    def stats(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "held": len(self.held),
            "pending_user_codes": self.pending_user_codes(),
            "active_access_tokens": sum(t.active for t in self.access.values()),
        }

    def _device_by_user_code(self, user_code: str) -> _DeviceCode:
        for device in self.devices.values():
            if device.user_code == user_code:
                return device
        raise KeyError(user_code)

    # -- issuing ----------------------------------------------------------------

    def _issue(
        self, username: str, client_id: str, scope: str, *, refresh: bool, public: bool = False
    ) -> dict[str, Any]:
        token = _random(self.token_length)
        self.access[token] = _Access(username, client_id, scope, self.now() + self.access_ttl)
        answer: dict[str, Any] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": int(self.access_ttl),
            "scope": scope,
        }
        if refresh and self.issue_refresh_tokens:
            refresh_token = "rt-" + _random(32)
            self.refresh[refresh_token] = _Refresh(username, scope, public=public)
            answer["refresh_token"] = refresh_token
        return answer

    # -- endpoints ----------------------------------------------------------------

    @contextlib.contextmanager
    def acting_for(self, path: str) -> Iterator[None]:
        """With mode "providers", behave per request as the provider whose URL
        layout the path has: ``/google/...`` Google, ``/{tenant}/oauth2/v2.0/...``
        Entra ID, anything else this server's own rules. One server (and one
        introspection URL for Dovecot) then stands in for both providers."""
        if self.mode != "providers":
            yield
            return
        self.mode = (
            "google"
            if path.startswith("/google/")
            else "entra"
            if modes.tenant_of(path) is not None
            else "generic"
        )
        try:
            yield
        finally:
            self.mode = "providers"

    def token(self, form: dict[str, str], path: str = "/token") -> tuple[int, dict[str, Any]]:
        with self.acting_for(path):
            return self._token(form, path)

    def _token(self, form: dict[str, str], path: str) -> tuple[int, dict[str, Any]]:
        grant = form.get("grant_type", "")
        self.counts[f"token:{grant}"] += 1
        if "client_secret" in form:
            self.counts[f"secret:{grant}"] += 1
        if self.failures:
            return self.failures.pop(0)
        if grant == modes.JWT_BEARER and self.mode == "google":
            return modes.jwt_bearer(self, form, path)
        refused = modes.refuse_client(self, grant, form, path)
        if refused is not None:
            return refused
        if self.mode == "generic" and (
            form.get("client_id") != self.client_id
            or (self.client_secret is not None and form.get("client_secret") != self.client_secret)
        ):
            return 401, {"error": "invalid_client"}
        scope = form.get("scope", "")
        if grant == "refresh_token":
            record = self.refresh.get(form.get("refresh_token", ""))
            if record is None or not record.active:
                if self.mode != "generic":
                    detail = "revoked" if record is not None else "expired"
                    return modes.grant_error(self, 400, "invalid_grant", detail)
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "refresh token revoked, expired or already used",
                }
            # Google keeps refresh tokens; Entra (and we, strictly) rotate them.
            rotate = self.rotate_refresh_tokens and self.mode != "google"
            if rotate:
                record.active = False
            answer = self._issue(
                record.username,
                self.client_id,
                scope or record.scope,
                refresh=rotate,
                public=record.public,
            )
            return 200, answer
        if grant == "client_credentials":
            if self.client_secret is None:
                return 400, {"error": "unauthorized_client"}
            return 200, self._issue(
                self.client_credentials_user, self.client_id, scope, refresh=False
            )
        if grant == "authorization_code":
            return self._redeem_code(form)
        if grant == DEVICE_GRANT:
            return self._poll_device(form)
        return 400, {"error": "unsupported_grant_type"}

    def _redeem_code(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        code = self.codes.get(form.get("code", ""))
        if code is None or code.used:
            return 400, {
                "error": "invalid_grant",
                "error_description": "code unknown or already redeemed",
            }
        code.used = True
        if form.get("redirect_uri") != code.redirect_uri:
            return 400, {"error": "invalid_grant", "error_description": "redirect_uri mismatch"}
        verifier = form.get("code_verifier", "")
        digest = hashlib.sha256(verifier.encode()).digest()
        if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != code.challenge:
            return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        public = "client_secret" not in form
        return 200, self._issue(
            code.username, code.client_id, code.scope, refresh=True, public=public
        )

    def _poll_device(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        device = self.devices.get(form.get("device_code", ""))
        if device is None or device.redeemed:
            return 400, {"error": "invalid_grant"}
        if self.now() >= device.expires_at:
            return 400, {"error": "expired_token"}
        if device.denied:
            return modes.grant_error(self, 400, "access_denied", "plain")
        if self.slow_down > 0:
            self.slow_down -= 1
            return 400, {"error": "slow_down"}
        if device.username is None:
            return modes.grant_error(self, 400, "authorization_pending", "authorization_pending")
        device.redeemed = True
        public = "client_secret" not in form
        return 200, self._issue(
            device.username, self.client_id, device.scope, refresh=True, public=public
        )

    def device_authorization(
        self, form: dict[str, str], path: str = "/device"
    ) -> tuple[int, dict[str, Any]]:
        with self.acting_for(path):
            return self._device_authorization(form)

    def _device_authorization(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        self.counts["device"] += 1
        if form.get("client_id") != self.client_id:
            return 401, {"error": "invalid_client"}
        refused = modes.refuse_device(self, form)
        if refused is not None:
            return refused
        device_code = "dc-" + _random(32)
        user_code = "-".join(_random(4, "BCDFGHJKLMNPQRSTVWXZ") for _ in range(2))
        self.devices[device_code] = _DeviceCode(
            user_code, form.get("scope", ""), self.now() + self.device_ttl
        )
        answer = {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": f"{self.base_url}/verify",
            "expires_in": int(self.device_ttl),
            "interval": self.device_interval,
        }
        return 200, modes.device_answer(self, answer)

    def authorize(self, query: dict[str, str], path: str = "/authorize") -> tuple[int, str]:
        """The browser step: returns (status, Location or error text)."""
        with self.acting_for(path):
            return self._authorize(query)

    def revocation(self, form: dict[str, str], path: str = "/revoke") -> tuple[int, dict[str, Any]]:
        with self.acting_for(path):
            return modes.revoke(self, form)

    def _authorize(self, query: dict[str, str]) -> tuple[int, str]:
        self.counts["authorize"] += 1
        redirect = query.get("redirect_uri", "")
        if query.get("client_id") != self.client_id or not redirect:
            return 400, "unknown client or missing redirect_uri"
        if query.get("response_type") != "code" or query.get("code_challenge_method") != "S256":
            return 400, "code flow with PKCE S256 required"
        if not modes.redirect_allowed(self, redirect):
            self.counts["redirect_mismatch"] += 1
            return 400, f"redirect_uri_mismatch: {redirect} is not registered"
        state = query.get("state", "")
        if self.consent_user is None:
            params = {"error": "access_denied", "state": state}
        else:
            code = "code-" + _random(24)
            self.codes[code] = _Code(
                self.consent_user,
                self.client_id,
                redirect,
                query.get("code_challenge", ""),
                query.get("scope", ""),
            )
            params = {"code": code, "state": state}
        return 302, redirect + ("&" if "?" in redirect else "?") + urlencode(params)

    def introspect(self, form: dict[str, str]) -> dict[str, Any]:
        self.counts["introspect"] += 1
        token = self.access.get(form.get("token", ""))
        if token is None or not token.active or self.now() >= token.expires_at:
            return {"active": False}
        return {
            "active": True,
            "username": token.username,
            "scope": token.scope,
            "client_id": token.client_id,
            "exp": int(token.expires_at),
            "token_type": "Bearer",
        }

    def control(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        if action == "approve":
            self.approve(body["user_code"], body["username"])
        elif action == "deny":
            self.deny(body["user_code"])
        elif action == "revoke":
            self.revoke(body["username"])
        elif action == "expire_access":
            self.expire_access_tokens(body.get("username"))
        elif action == "fail_next":
            self.fail_next(body["status"], body.get("error"), body.get("count", 1))
        elif action == "advance":
            self.offset += float(body["seconds"])
        elif action == "hold":
            self.hold = True
        elif action == "release":
            self.release()
        elif action == "set":
            for key, value in body.items():
                if key not in _SETTABLE:
                    raise KeyError(key)
                setattr(self, key, value)
        elif action == "service_account":
            return modes.new_service_account(self, body["email"], body["mailboxes"])
        elif action == "reset_counts":
            self.counts.clear()
        elif action == "secrets":
            # Every token ever issued, so a test can prove none reached a log.
            return {"secrets": [*self.access, *self.refresh, *self.devices, *self.codes]}
        elif action != "stats":
            raise KeyError(action)
        return self.stats()

    # -- serving ----------------------------------------------------------------

    def resource(self) -> Resource:
        return _Root(self)

    def listen(self, reactor: Any, port: int = 0) -> IListeningPort:
        site = Site(self.resource())
        site.noisy = False
        listening: IListeningPort = reactor.listenTCP(port, site, interface="127.0.0.1")
        self.base_url = f"http://127.0.0.1:{listening.getHost().port}"
        return listening


_SETTABLE = frozenset(
    {
        "access_ttl",
        "device_ttl",
        "device_interval",
        "token_length",
        "rotate_refresh_tokens",
        "issue_refresh_tokens",
        "consent_user",
        "client_credentials_user",
        "slow_down",
        "public_client",
    }
)


def _random(length: int, alphabet: str = "") -> str:
    if alphabet:
        return "".join(secrets.choice(alphabet) for _ in range(length))
    text = secrets.token_urlsafe(length)
    while len(text) < length:
        text += secrets.token_urlsafe(length)
    return text[:length]


class _Root(Resource):
    isLeaf = True

    def __init__(self, server: AuthServer) -> None:
        super().__init__()
        self.server = server

    def render_GET(self, request: Request) -> bytes:
        path = request.path.decode()
        query = _single(parse_qs(urlsplit(request.uri.decode()).query))
        # Ours and Microsoft's end in /authorize, Google's in /o/oauth2/v2/auth.
        if path.endswith(("/authorize", "/auth")):
            status, where = self.server.authorize(query, path)
            request.setResponseCode(status)
            if status == 302:
                request.setHeader(b"location", where.encode())
                return b""
            return where.encode()
        if path == "/control/stats":
            return _json(request, 200, self.server.stats())
        return _json(request, 404, {"error": "not_found"})

    def render_POST(self, request: Request) -> bytes | int:
        path = request.path.decode()
        raw = request.content.read() if request.content is not None else b""
        if path.startswith("/control/"):
            try:
                body = json.loads(raw or b"{}")
                return _json(request, 200, self.server.control(path[len("/control/") :], body))
            except (KeyError, ValueError, TypeError) as e:
                return _json(request, 400, {"error": f"bad control request: {e!r}"})
        form = _single(parse_qs(raw.decode(), keep_blank_values=True))
        if path == "/introspect":
            return _json(request, 200, self.server.introspect(form))
        if path.endswith(DEVICE_PATHS):
            return _json(request, *self.server.device_authorization(form, path))
        if path.endswith("/revoke"):
            status, body = self.server.revocation(form, path)
            request.setResponseCode(status)
            return b"" if status == 200 else _json(request, status, body)
        if path.endswith("/token"):
            if self.server.hold:
                gate: Deferred[None] = Deferred()
                self.server.held.append(gate)
                self.server.counts["held"] += 1

                def answer(_: None) -> None:
                    status, body = self.server.token(form, path)
                    if request._disconnected:  # the client gave up meanwhile
                        return
                    request.write(_json(request, status, body))
                    request.finish()

                gate.addCallback(answer)
                return NOT_DONE_YET
            return _json(request, *self.server.token(form, path))
        return _json(request, 404, {"error": "not_found"})


def _single(params: dict[str, list[str]]) -> dict[str, str]:
    return {key: values[0] for key, values in params.items()}


def _json(request: Request, status: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OAuth2 test authorization server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--settings", default="{}", help="JSON of AuthServer fields")
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    server = AuthServer(**json.loads(args.settings))
    listening = server.listen(reactor, args.port)
    tmp = Path(args.port_file + ".tmp")
    tmp.write_text(str(listening.getHost().port))
    tmp.replace(args.port_file)
    reactor.run()  # type: ignore[attr-defined]


# Kept importable from here, where the tests have always found them.
from tests.harness.oauth_poster import InMemoryPoster  # noqa: E402
from tests.harness.oauth_process import OAuthServerProcess  # noqa: E402

__all__ = ["DEVICE_GRANT", "AuthServer", "InMemoryPoster", "OAuthServerProcess", "main"]

if __name__ == "__main__":
    main()
