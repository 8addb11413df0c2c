"""Token responses (RFC 6749 5.1) turned into one small value object.

Parsing lives apart from the HTTP and the store so that every grant (device
code, authorization code, client credentials, refresh) reads a token answer
the same way, and so that "what expires when" is computed once, against the
injected clock, at the moment the answer arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.model import Secret
from gateway.oauth.errors import OAuthUnavailable

# RFC 6749 only recommends `expires_in`; without it, assume an hour (what
# Microsoft and Google issue) rather than "forever".
DEFAULT_LIFETIME = 3600.0
# Bearer tokens are opaque but printable ASCII without spaces (RFC 6750 2.1
# b64token); anything else cannot travel in a SASL response.
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")


@dataclass(frozen=True)
class Tokens:
    """What a token endpoint granted, with absolute times on the gateway's clock."""

    access_token: Secret
    expires_at: float
    refresh_token: Secret | None = None
    scope: str = ""

    def valid_at(self, now: float, *, skew: float = 0.0) -> bool:
        """Usable at `now` with at least `skew` seconds to spare."""
        return self.expires_at - skew > now

    def with_refresh_token(self, previous: Secret | None) -> Tokens:
        """Keep `previous` when a refresh answer did not rotate the refresh token
        (RFC 6749 6: the server MAY issue a new one; the old one stays valid if not)."""
        if self.refresh_token is not None or previous is None:
            return self
        return Tokens(self.access_token, self.expires_at, previous, self.scope)


def parse_token_response(document: dict[str, Any], now: float) -> Tokens:
    """Validate a successful token answer; `now` is when it arrived."""
    token = document.get("access_token")
    if not isinstance(token, str) or not token or not set(token) <= _TOKEN_CHARS:
        raise OAuthUnavailable("the token answer has no usable access_token")
    token_type = document.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise OAuthUnavailable(f"the token answer has token_type {str(token_type)[:20]!r}")
    lifetime = _lifetime(document.get("expires_in"))
    refresh = document.get("refresh_token")
    if refresh is not None and (not isinstance(refresh, str) or not refresh):
        raise OAuthUnavailable("the token answer has an unusable refresh_token")
    scope = document.get("scope", "")
    return Tokens(
        access_token=Secret(token),
        expires_at=now + lifetime,
        refresh_token=Secret(refresh) if refresh else None,
        scope=scope if isinstance(scope, str) else "",
    )


def _lifetime(value: object) -> float:
    # Some servers (older Microsoft endpoints) send the number as a string.
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return DEFAULT_LIFETIME
    return float(max(0, value))
