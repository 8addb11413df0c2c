"""The requests the gateway sends to one provider's authorization server.

One method per grant request, each building the exact form fields its RFC
asks for and parsing the answer into `Tokens` (or `DeviceAuthorization`).
The interactive parts of the grants (polling, the browser round trip) live
in `device_flow.py` and `code_flow.py`; the token manager only needs
`refresh` and `client_credentials`.

Client authentication is `client_secret_post` (the secret in the form), which
Microsoft and Google both accept, and only where the client is confidential
for that grant (`sends_secret`): a public Microsoft client that presents a
secret is refused (AADSTS700025), so a provider may hold a secret for its
app-only accounts while its device-code accounts never send it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

from gateway.model import OAuthClient, Provider, Secret
from gateway.oauth.errors import OAuthEndpointError, OAuthUnavailable
from gateway.oauth.http import FormPoster, safe_text
from gateway.oauth.jwt_bearer import JWT_BEARER_GRANT, signed_assertion
from gateway.oauth.tokens import Tokens, parse_token_response

DEVICE_CODE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
# RFC 8628 3.2: the default polling interval when the server names none.
DEFAULT_INTERVAL = 5.0


@dataclass(frozen=True)
class DeviceAuthorization:
    """RFC 8628 3.2: what the admin must be shown, and what to poll with."""

    device_code: Secret
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_at: float
    interval: float


def sends_secret(client: OAuthClient, grant: str | None) -> bool:
    """Whether a request of `grant` (None: a delegated grant's refresh) carries
    the client secret.

    Client credentials always do (the secret is the credential); the JWT
    bearer grant never does (the signed assertion is). Delegated grants send
    it only from a confidential client: "public" (Microsoft's presets, for
    device code and the native code flow) never, "confidential" (Google's
    desktop clients, a Microsoft web app) always, "auto" (no preset) whenever
    one is configured, as RFC 6749 2.3.1 asks of a client that has one.
    """
    if client.client_secret is None or grant == "service_account":
        return False
    if grant == "client_credentials":
        return True
    return client.client_type != "public"


class NoOAuthClient(Exception):
    """The provider has no `oauth` registration, or lacks the endpoint a grant needs."""


class TokenEndpoint:
    """One provider's token and device-authorization endpoints."""

    def __init__(self, provider: Provider, poster: FormPoster, clock: IReactorTime) -> None:
        if provider.oauth is None:
            raise NoOAuthClient(f"provider {provider.name} has no OAuth2 client configured")
        self.provider = provider
        self.client: OAuthClient = provider.oauth
        self._poster = poster
        self._clock = clock

    # -- grants -------------------------------------------------------------

    async def refresh(
        self,
        refresh_token: Secret,
        grant: str | None = None,
        *,
        scopes: tuple[str, ...] | None = None,
    ) -> Tokens:
        """RFC 6749 6; the answer keeps the old refresh token unless it rotated.

        `grant` is the grant that issued the refresh token: the refresh
        authenticates the client the same way (a public client stays public).
        `scopes` asks for another resource than the provider's (Microsoft
        Graph): one refresh token mints tokens for each resource consented.
        """
        fields = {"grant_type": "refresh_token", "refresh_token": refresh_token.reveal()}
        scopes = self.client.scopes if scopes is None else scopes
        if scopes:
            fields["scope"] = " ".join(scopes)
        tokens = await self._token_request(fields, grant)
        return tokens.with_refresh_token(refresh_token)

    async def client_credentials(self, scopes: tuple[str, ...] | None = None) -> Tokens:
        """RFC 6749 4.4 (Microsoft 365 app-only access); needs the client secret.
        `scopes` (a resource's `.default`) overrides the provider's."""
        if self.client.client_secret is None:
            raise NoOAuthClient(
                f"provider {self.provider.name}: the client credentials grant needs "
                "a client secret (client_secret_file)"
            )
        if scopes is None:
            scopes = self.client.app_scopes or self.client.scopes
        fields = {"grant_type": "client_credentials"}
        if scopes:
            fields["scope"] = " ".join(scopes)
        tokens = await self._token_request(fields, "client_credentials")
        # A refresh token makes no sense here (RFC 6749 4.4.3); never keep one.
        return Tokens(tokens.access_token, tokens.expires_at, None, tokens.scope)

    async def service_account(self, subject: str) -> Tokens:
        """RFC 7523 2.1 with a Google service account: an access token for the
        mailbox `subject` (domain-wide delegation). No client id or secret:
        the signed assertion names the service account."""
        account = self.client.service_account
        if account is None:
            raise NoOAuthClient(
                f"provider {self.provider.name}: the service_account grant needs "
                "service_account_file (the service account's JSON key)"
            )
        assertion = signed_assertion(
            account,
            subject=subject,
            scopes=self.client.app_scopes or self.client.scopes,
            # The token URL the assertion is presented at (overridable for tests).
            audience=self.client.token_url,
            now=self._clock.seconds(),
        )
        document = await self._poster.post_form(
            self.client.token_url,
            {"grant_type": JWT_BEARER_GRANT, "assertion": assertion},
            ca_file=self.provider.ca_file,
        )
        tokens = parse_token_response(document, self._clock.seconds())
        return Tokens(tokens.access_token, tokens.expires_at, None, tokens.scope)

    async def revoke(self, token: Secret, hint: str = "refresh_token") -> bool:
        """RFC 7009 token revocation; False when the provider has no endpoint
        (Microsoft has none for refresh tokens). Raises like any request."""
        url = self.client.revocation_url
        if url is None:
            return False
        await self._poster.post_form(
            url, {"token": token.reveal(), "token_type_hint": hint}, ca_file=self.provider.ca_file
        )
        return True

    async def exchange_code(self, code: str, verifier: str, redirect_uri: str) -> Tokens:
        """RFC 6749 4.1.3 with the PKCE verifier (RFC 7636 4.5)."""
        return await self._token_request(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
            },
            "authorization_code",
        )

    async def start_device_authorization(self) -> DeviceAuthorization:
        """RFC 8628 3.1-3.2."""
        url = self.client.device_authorization_url
        if url is None:
            raise NoOAuthClient(f"provider {self.provider.name} has no device_authorization_url")
        fields = self._client_fields("device_code")
        if self.client.scopes:
            fields["scope"] = " ".join(self.client.scopes)
        document = await self._poster.post_form(url, fields, ca_file=self.provider.ca_file)
        return _device_authorization(document, self._clock.seconds())

    async def poll_device(self, device_code: Secret) -> Tokens:
        """One RFC 8628 3.4 poll. Raises OAuthEndpointError with
        ``authorization_pending`` / ``slow_down`` / ``expired_token`` /
        ``access_denied`` until the user has acted."""
        return await self._token_request(
            {"grant_type": DEVICE_CODE_GRANT, "device_code": device_code.reveal()}, "device_code"
        )

    # -- plumbing -----------------------------------------------------------

    def _client_fields(self, grant: str | None) -> dict[str, str]:
        fields = {"client_id": self.client.client_id}
        secret = self.client.client_secret
        if secret is not None and sends_secret(self.client, grant):
            fields["client_secret"] = secret.reveal()
        return fields

    async def _token_request(self, fields: dict[str, str], grant: str | None) -> Tokens:
        document = await self._poster.post_form(
            self.client.token_url,
            {**fields, **self._client_fields(grant)},
            ca_file=self.provider.ca_file,
        )
        return parse_token_response(document, self._clock.seconds())


def _device_authorization(document: dict[str, Any], now: float) -> DeviceAuthorization:
    device_code = document.get("device_code")
    user_code = document.get("user_code")
    # Google says verification_url; RFC 8628 (and Microsoft) verification_uri.
    uri = document.get("verification_uri") or document.get("verification_url")
    if not all(isinstance(v, str) and v for v in (device_code, user_code, uri)):
        raise OAuthUnavailable(
            "the device authorization answer lacks device_code, user_code or verification_uri"
        )
    assert isinstance(device_code, str) and isinstance(user_code, str) and isinstance(uri, str)
    complete = document.get("verification_uri_complete")
    interval = document.get("interval", DEFAULT_INTERVAL)
    expires_in = document.get("expires_in", 900)
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval < 0:
        interval = DEFAULT_INTERVAL
    if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)):
        expires_in = 900
    return DeviceAuthorization(
        device_code=Secret(device_code),
        user_code=safe_text(user_code, 40),
        verification_uri=safe_text(uri, 500),
        verification_uri_complete=safe_text(complete, 1000) if isinstance(complete, str) else None,
        expires_at=now + float(expires_in),
        interval=float(interval),
    )


__all__ = [
    "DEVICE_CODE_GRANT",
    "DeviceAuthorization",
    "NoOAuthClient",
    "OAuthEndpointError",
    "TokenEndpoint",
    "sends_secret",
]
