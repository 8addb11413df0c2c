"""What can go wrong talking to an authorization server, sorted by what to do next.

The token manager decides between "retry later" and "an admin must act" on
the exception type alone, so the sorting happens once, here and in `http.py`,
rather than at every caller. No exception text ever carries a token, a
refresh token, a code or a client secret: only endpoint URLs, HTTP statuses
and the provider's own (bounded, printable) error code and description.
"""

from __future__ import annotations

from gateway.oauth.refusal import Refusal, RefusalKind

# OAuth error codes (RFC 6749 5.2, RFC 8628 3.5, OpenID Connect) that mean the
# user's grant is gone: only a new `gateway oauth authorize` helps.
REAUTHORIZE_CODES = frozenset(
    {"invalid_grant", "interaction_required", "consent_required", "login_required"}
)
# Codes a server may send in a 4xx body that still mean "try again later".
TRANSIENT_CODES = frozenset({"temporarily_unavailable", "server_error"})


class OAuthError(Exception):
    """Base class; `str()` is safe for logs and for the admin's terminal."""


class OAuthUnavailable(OAuthError):
    """The server could not be asked now: network, timeout, TLS, 5xx, garbage.

    Retrying later may succeed; nothing about the grant is known to be wrong.
    `refusal` is the classified answer when the server gave one (a 429, a
    503, Entra's AADSTS50196 loop detection).
    """

    def __init__(self, text: str, *, refusal: Refusal | None = None) -> None:
        super().__init__(text)
        self.refusal = refusal


class OAuthEndpointError(OAuthError):
    """The server answered with an OAuth error (`error` in a JSON 4xx body).

    `code` is the provider's error code (``invalid_grant``...), or
    ``http_<status>`` when a 4xx came without one.
    """

    def __init__(
        self,
        code: str,
        description: str = "",
        *,
        status: int = 400,
        refusal: Refusal | None = None,
    ) -> None:
        self.code = code
        self.description = description
        self.status = status
        # What an admin does about it (gateway.oauth.refusal), when classified.
        self.refusal = refusal
        text = f"{code}" + (f": {description}" if description else "")
        super().__init__(text)

    @property
    def needs_reauthorization(self) -> bool:
        if self.refusal is not None:
            return self.refusal.kind is RefusalKind.REAUTHORIZE
        return self.code in REAUTHORIZE_CODES

    @property
    def transient(self) -> bool:
        if self.refusal is not None and self.refusal.kind is RefusalKind.TEMPORARY:
            return True
        return self.code in TRANSIENT_CODES


class InsecureEndpoint(OAuthError):
    """An endpoint URL that is not https (plain http is allowed on loopback only)."""


class AuthorizationFailed(OAuthError):
    """An interactive grant ended without tokens (denied, expired, state mismatch)."""


def refusal_of(error: Exception) -> Refusal:
    """The classified refusal an exception carries, or one made from what it says."""
    carried = getattr(error, "refusal", None)
    if isinstance(carried, Refusal):
        return carried
    if isinstance(error, OAuthEndpointError):
        if error.needs_reauthorization:
            return Refusal(
                RefusalKind.REAUTHORIZE, error.code, "run `gateway oauth authorize ACCOUNT` again"
            )
        return Refusal(
            RefusalKind.MISCONFIGURED, error.code, "check the provider's OAuth2 client settings"
        )
    if isinstance(error, OAuthUnavailable):
        return Refusal(RefusalKind.TEMPORARY, "network", "the gateway retries later")
    return Refusal(
        RefusalKind.MISCONFIGURED, "configuration", "check the provider's OAuth2 client settings"
    )
