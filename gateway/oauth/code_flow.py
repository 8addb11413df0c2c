"""The authorization code grant with PKCE (RFC 6749 4.1, RFC 7636 S256).

For admins whose provider or policy does not allow the device grant (Gmail
always). The command prints the authorization URL; the admin signs in with a
browser and the provider redirects to the loopback address in the form the
provider documents: ``http://localhost:PORT`` for Microsoft (which registers
``http://localhost`` and ignores the port), ``http://127.0.0.1:PORT`` for
Google's desktop clients. If that browser runs on the gateway machine, a
one-shot listener catches the redirect; it listens on both 127.0.0.1 and ::1
with the same port, because a browser may resolve localhost to either.
If it does not (the usual headless case), the page fails to load and the
admin pastes the address bar's URL into the command. Both paths run at once
and the first valid answer wins; `state` is checked either way, so a stray
or forged redirect is refused.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from gateway.oauth.endpoint import TokenEndpoint
from gateway.oauth.errors import AuthorizationFailed
from gateway.oauth.http import safe_text
from gateway.oauth.tokens import Tokens

# How long the command waits for the admin to sign in.
DEFAULT_WAIT = 600.0


@dataclass(frozen=True)
class PKCE:
    verifier: str
    challenge: str

    @classmethod
    def new(cls) -> PKCE:
        # 64 random bytes -> 86 characters, inside RFC 7636's 43..128.
        verifier = secrets.token_urlsafe(64)
        digest = hashlib.sha256(verifier.encode("ascii")).digest()
        return cls(verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii"))


def authorization_url(
    endpoint: TokenEndpoint, redirect_uri: str, state: str, pkce: PKCE, login_hint: str
) -> str:
    client = endpoint.client
    if client.authorization_url is None:
        raise AuthorizationFailed(
            f"provider {endpoint.provider.name} has no authorization_url for the code grant"
        )
    params = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": redirect_uri,
        "scope": " ".join(client.scopes),
        "state": state,
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
        "login_hint": login_hint,
    }
    if endpoint.provider.preset == "gmail":
        # Google issues a refresh token only with offline access and a fresh consent.
        params.update(access_type="offline", prompt="consent")
    separator = "&" if urlsplit(client.authorization_url).query else "?"
    return client.authorization_url + separator + urlencode(params)


def _redirect_params(text: str) -> dict[str, str]:
    text = text.strip()
    if "://" in text or text.startswith("/"):
        text = urlsplit(text).query
    return {k: v[0] for k, v in parse_qs(text.lstrip("?"), keep_blank_values=True).items()}


def state_matches(text: str, expected_state: str) -> bool:
    state = _redirect_params(text).get("state", "")
    return hmac.compare_digest(state.encode(), expected_state.encode())


def code_from_redirect(text: str, expected_state: str) -> str:
    """The code from a redirect URL (or just its query string), after checking `state`."""
    params = _redirect_params(text)
    if not state_matches(text, expected_state):
        raise AuthorizationFailed(
            "the redirect's state does not match this request (a stale or forged redirect); "
            "nothing was stored"
        )
    if "error" in params:
        description = safe_text(params.get("error_description", ""), 200)
        raise AuthorizationFailed(
            f"the provider refused: {safe_text(params['error'], 60)}"
            + (f" ({description})" if description else "")
        )
    code = params.get("code")
    if not code:
        raise AuthorizationFailed("the redirect carries no code")
    return code


class _Callback(Resource):
    """Answers the browser's redirect once; requests with a wrong state are refused."""

    isLeaf = True

    def __init__(
        self, expected_state: str, found: Callable[[str | AuthorizationFailed], None]
    ) -> None:
        super().__init__()
        self._state = expected_state
        self._found = found

    def render_GET(self, request: Request) -> bytes:
        uri = request.uri.decode("ascii", "replace")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if not state_matches(uri, self._state):
            # Noise (a favicon request, a stale tab, another local process)
            # must not end the grant: refuse it and keep waiting.
            request.setResponseCode(400)
            return b"Not accepted: not the redirect this command is waiting for.\n"
        try:
            code = code_from_redirect(uri, self._state)
        except AuthorizationFailed as e:
            self._found(e)
            request.setResponseCode(400)
            return f"Not signed in: {e}\n".encode()
        self._found(code)
        return b"Signed in. The gateway has the authorization; you can close this window.\n"


class LoopbackListener:
    """A one-shot HTTP listener on 127.0.0.1 and ::1 (one port) for the redirect."""

    # Attempts at finding a port free on both stacks when any port will do.
    ATTEMPTS = 5

    def __init__(self, reactor: Any, port: int = 0) -> None:
        self._reactor = reactor
        self._port_number = port
        self.result: Deferred[str] = Deferred()
        self._ports: list[IListeningPort] = []

    async def start(self, expected_state: str) -> int:
        """Listen; returns the port. Only a redirect carrying `expected_state` counts."""
        site = Site(_Callback(expected_state, self._found))
        site.noisy = False
        for _attempt in range(self.ATTEMPTS if self._port_number == 0 else 1):
            v4 = await TCP4ServerEndpoint(
                self._reactor, self._port_number, interface="127.0.0.1"
            ).listen(site)
            address = v4.getHost()
            assert isinstance(address, IPv4Address)
            self._ports = [v4]
            try:
                v6 = await TCP6ServerEndpoint(self._reactor, address.port, interface="::1").listen(
                    site
                )
            except CannotListenError as e:
                if _ipv6_unavailable(e):
                    return address.port  # no IPv6 loopback here: 127.0.0.1 it is
                await self.stop()
                continue  # the port is taken on ::1: try another one
            self._ports.append(v6)
            return address.port
        raise AuthorizationFailed(
            "no loopback port free on both 127.0.0.1 and ::1"
            + (f" (port {self._port_number})" if self._port_number else "")
            + "; give another --port or use --no-listen"
        )

    def _found(self, outcome: str | AuthorizationFailed) -> None:
        if self.result.called:
            return
        if isinstance(outcome, AuthorizationFailed):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)

    async def stop(self) -> None:
        ports, self._ports = self._ports, []
        for port in ports:
            stopped = port.stopListening()
            if stopped is not None:
                await stopped


def _ipv6_unavailable(error: CannotListenError) -> bool:
    """A host without IPv6 (or without ::1) cannot bind it at all; that is not a
    clash with another process."""
    number = getattr(error.socketError, "errno", None)
    return number in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT)


def loopback_redirect(endpoint: TokenEndpoint, port: int) -> str:
    """The redirect URI in the provider's documented loopback form."""
    return f"http://{endpoint.client.loopback_host}:{port}"


async def run_code_flow(
    endpoint: TokenEndpoint,
    clock: IReactorTime,
    *,
    login_hint: str,
    show: Callable[[str, str], None],
    pasted: Deferred[str] | None,
    listener: LoopbackListener | None,
    redirect_uri: str | None = None,
    state: str | None = None,
    wait: float = DEFAULT_WAIT,
) -> Tokens:
    """Obtain tokens with the code grant.

    `show(url, redirect_uri)` tells the admin what to open. The code comes
    from `listener` (started here, stopped before returning) or `pasted`
    (a Deferred firing with the text the admin pasted), whichever is first.
    `state` is random unless given (tests).
    """
    state = state or secrets.token_urlsafe(24)
    pkce = PKCE.new()
    sources: list[Deferred[str]] = []
    try:
        if listener is not None:
            port = await listener.start(state)
            redirect_uri = redirect_uri or loopback_redirect(endpoint, port)
            sources.append(listener.result)
        if redirect_uri is None:
            raise AuthorizationFailed("give a redirect URI when not listening for the redirect")
        show(authorization_url(endpoint, redirect_uri, state, pkce, login_hint), redirect_uri)
        if pasted is not None:
            sources.append(pasted.addCallback(lambda text: code_from_redirect(text, state)))
        if not sources:
            raise AuthorizationFailed("nowhere to receive the redirect from")
        code = await _first(sources, clock, wait)
    finally:
        if listener is not None:
            await listener.stop()
    return await endpoint.exchange_code(code, pkce.verifier, redirect_uri)


async def _first(sources: list[Deferred[str]], clock: IReactorTime, wait: float) -> str:
    """The first source to fire (a failure of one counts); the rest are cancelled."""
    winner: Deferred[str] = Deferred()

    def settle(result: Any) -> None:
        if not winner.called:
            winner.callback(result) if isinstance(result, str) else winner.errback(result)
        return None

    for source in sources:
        source.addBoth(settle)

    def give_up() -> None:
        if not winner.called:
            winner.errback(
                AuthorizationFailed(f"nobody signed in within {wait:g} s; run the command again")
            )

    timer = clock.callLater(wait, give_up)
    try:
        return await winner
    finally:
        if timer.active():
            timer.cancel()
        for source in sources:
            if not source.called:
                try:
                    source.cancel()
                except CancelledError:
                    pass
