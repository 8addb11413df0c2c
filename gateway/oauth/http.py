"""Form POSTs to OAuth2 endpoints over treq, with the safety rules in one place.

Every request the gateway makes to an authorization server is a form POST
whose answer is a JSON object (RFC 6749, RFC 8628), so one function covers the
token, device-authorization and introspection-style endpoints alike. It:

- refuses plain http except to a loopback address (test servers), because
  the body carries refresh tokens, codes and client secrets;
- verifies TLS against the provider's `ca_file`, else the system trust;
- never follows redirects (a redirected POST would re-send the secrets to
  wherever the redirect points);
- bounds the whole exchange, body included, by one timeout on the injected
  clock, and the body size, so a stuck or hostile server cannot hold a
  refresh (and every device login waiting on it) forever;
- sorts failures into `OAuthUnavailable` (retry later) and
  `OAuthEndpointError` (the server said no), without any secret in the text.

`FormPoster` is the seam: the token manager and the grants take any object
with `post_form`, so unit tests hand them a fake with Deferreds they fire
by hand, on a `MemoryReactorClock`.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from gateway.oauth.errors import InsecureEndpoint, OAuthEndpointError, OAuthUnavailable
from gateway.oauth.refusal import classify_token_answer
from gateway.tls import TLSSetupError, load_trust_root

# A token response is a few kilobytes; anything this large is not one.
MAX_RESPONSE = 256 * 1024
DEFAULT_TIMEOUT = 30.0
# Statuses that mean "busy or broken right now", not "no".
_TRANSIENT_STATUSES = frozenset({408, 425, 429})


class FormPoster(Protocol):
    async def post_form(
        self, url: str, fields: Mapping[str, str], *, ca_file: Path | None = None
    ) -> dict[str, Any]:
        """POST `fields` form-encoded to `url`; return the JSON object of a 2xx answer.

        Raises `OAuthEndpointError` for an OAuth error answer, `OAuthUnavailable`
        for everything that may work later, `InsecureEndpoint` for a URL that
        must not carry secrets.
        """
        ...


def check_endpoint_url(url: str) -> None:
    """Raise InsecureEndpoint unless `url` is https, or http to a loopback address."""
    parts = urlsplit(url)
    if not parts.hostname:
        raise InsecureEndpoint(f"{url!r} has no host name")
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and is_loopback(parts.hostname):
        return
    raise InsecureEndpoint(f"{url!r} must be https (plain http only on a loopback address)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


AgentFactory = Callable[[Path | None], IAgent]


class TreqPoster:
    """`FormPoster` over treq and Twisted's Agent.

    `agent_factory(ca_file)` builds the agent for one trust root; the default
    verifies host names with service_identity against `ca_file` or the
    system store. `clock` bounds each exchange (default: `reactor`).
    """

    def __init__(
        self,
        reactor: Any,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        clock: IReactorTime | None = None,
        agent_factory: AgentFactory | None = None,
    ) -> None:
        self._reactor = reactor
        self._clock = clock or reactor
        self._timeout = timeout
        self._agent_factory = agent_factory or self._default_agent
        self._clients: dict[Path | None, HTTPClient] = {}

    def _default_agent(self, ca_file: Path | None) -> IAgent:
        try:
            trust = load_trust_root(ca_file)
        except TLSSetupError as e:
            raise OAuthUnavailable(f"cannot load the trust roots: {e}") from None
        policy = BrowserLikePolicyForHTTPS(trustRoot=trust)
        return Agent(self._reactor, contextFactory=policy, connectTimeout=self._timeout)

    def _client(self, ca_file: Path | None) -> HTTPClient:
        client = self._clients.get(ca_file)
        if client is None:
            client = HTTPClient(self._agent_factory(ca_file))
            self._clients[ca_file] = client
        return client

    async def post_form(
        self, url: str, fields: Mapping[str, str], *, ca_file: Path | None = None
    ) -> dict[str, Any]:
        check_endpoint_url(url)
        exchange = ensureDeferred(self._exchange(url, fields, ca_file))
        timed_out = False

        def give_up() -> None:
            nonlocal timed_out
            timed_out = True
            exchange.cancel()

        timer = self._clock.callLater(self._timeout, give_up)
        try:
            return await exchange
        except Exception:
            # Cancelling reaches us as CancelledError or wrapped in the
            # agent's ResponseNeverReceived, depending on the moment.
            if timed_out:
                raise OAuthUnavailable(
                    f"{_where(url)}: no answer within {self._timeout:g} s"
                ) from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    async def _exchange(
        self, url: str, fields: Mapping[str, str], ca_file: Path | None
    ) -> dict[str, Any]:
        client = self._client(ca_file)
        try:
            response = await client.post(
                url,
                data=dict(fields),
                headers=Headers({b"Accept": [b"application/json"]}),
                allow_redirects=False,
                unbuffered=True,
                reactor=self._reactor,
            )
            body = await _read_bounded(response)
        except (CancelledError, OAuthUnavailable):
            raise
        except Exception as e:
            raise OAuthUnavailable(f"{_where(url)}: {_describe(e)}") from None
        return interpret_response(url, response.code, body)


def interpret_response(url: str, status: int, body: bytes) -> dict[str, Any]:
    """Sort one HTTP answer from an OAuth endpoint into a result or an exception."""
    document = _json_object(body)
    if 200 <= status < 300:
        if not body.strip():
            # RFC 7009 2.2: a revocation answer's body means nothing.
            return {}
        if document is None:
            raise OAuthUnavailable(f"{_where(url)}: HTTP {status} without a JSON object")
        return document
    refusal = classify_token_answer(status, document)
    if status >= 500 or status in _TRANSIENT_STATUSES:
        raise OAuthUnavailable(
            f"{_where(url)}: HTTP {status}{_error_suffix(document)}", refusal=refusal
        )
    if document is not None and isinstance(document.get("error"), str):
        error = OAuthEndpointError(
            safe_text(document["error"], 80),
            safe_text(document.get("error_description"), 300),
            status=status,
            refusal=refusal,
        )
        if error.transient:
            raise OAuthUnavailable(f"{_where(url)}: HTTP {status} {error}", refusal=refusal)
        raise error
    if 300 <= status < 400:
        raise OAuthEndpointError(
            f"http_{status}", "redirect refused", status=status, refusal=refusal
        )
    raise OAuthEndpointError(
        f"http_{status}", "no OAuth error in the answer", status=status, refusal=refusal
    )


async def _read_bounded(response: Any) -> bytes:
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > MAX_RESPONSE:
            raise OAuthUnavailable(f"answer larger than {MAX_RESPONSE} octets")
        chunks.append(data)

    d: Deferred[None] = treq.collect(response, collect)
    await d
    return b"".join(chunks)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _error_suffix(document: dict[str, Any] | None) -> str:
    if document is None or not isinstance(document.get("error"), str):
        return ""
    return f" ({safe_text(document['error'], 80)})"


def safe_text(value: object, limit: int) -> str:
    """A provider's word made safe for one log line: printable, bounded."""
    if not isinstance(value, str):
        return ""
    text = "".join(c if c.isprintable() else " " for c in value[:limit])
    return text + ("..." if len(value) > limit else "")


def _where(url: str) -> str:
    """The endpoint as a log names it: scheme, host and path, never a query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def _describe(e: BaseException) -> str:
    # Twisted's ResponseNeverReceived etc. wrap the real reasons in a list.
    reasons = getattr(e, "reasons", None)
    if reasons:
        inner = reasons[0].value if hasattr(reasons[0], "value") else reasons[0]
        return f"{type(e).__name__} ({_describe(inner)})"
    text = str(e).strip()
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__
