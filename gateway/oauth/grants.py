"""Which token request refreshes an account's token, per grant and resource.

Microsoft Graph is a resource of its own: one token request cannot mix
Graph and outlook.office.com scopes (AADSTS700022), but the same refresh
token mints both, so a delegated account's Graph token is a refresh with
Graph's scopes, and an app-only account's a client-credentials request for
Graph's `.default`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from gateway.model import APP_ONLY_GRANTS, Account, Provider
from gateway.oauth.account_state import GRAPH, Resource
from gateway.oauth.endpoint import TokenEndpoint
from gateway.oauth.errors import OAuthEndpointError
from gateway.oauth.refusal import Refusal, RefusalKind
from gateway.oauth.store import TokenRecord
from gateway.oauth.tokens import Tokens

# Microsoft Graph's delegated mail permissions (Mail.ReadWrite: list, read,
# move, delete; Mail.Send: sendMail), as scopes of Graph's resource.
GRAPH_DELEGATED = ("Mail.ReadWrite", "Mail.Send")


def graph_scopes(provider: Provider, *, app_only: bool) -> tuple[str, ...]:
    """The scopes of a Graph token, on the host of the provider's `graph_url`
    (graph.microsoft.com, or a national cloud's: gateway.oauth.clouds)."""
    base = f"https://{urlsplit(provider.graph_url).hostname}"
    if app_only:
        return (f"{base}/.default",)
    return (*(f"{base}/{name}" for name in GRAPH_DELEGATED), "offline_access")


async def request_tokens(
    endpoint: TokenEndpoint, record: TokenRecord, account: Account, resource: Resource
) -> Tokens:
    """The new token of `resource` for the account of `record`."""
    app_only = record.grant in APP_ONLY_GRANTS
    scopes = graph_scopes(endpoint.provider, app_only=app_only) if resource == GRAPH else None
    if record.grant == "client_credentials":
        return await endpoint.client_credentials(scopes)
    if record.grant == "service_account":
        return await endpoint.service_account(account.username)
    refresh = record.tokens.refresh_token if record.tokens is not None else None
    if refresh is None:
        raise OAuthEndpointError(
            "no_refresh_token",
            "the provider issued no refresh token (offline_access scope missing?)",
            refusal=Refusal(
                RefusalKind.MISCONFIGURED,
                "no_refresh_token",
                "the provider issued no refresh token: add offline_access to the "
                "scopes (Google: access_type=offline) and authorize ACCOUNT again",
            ),
        )
    return await endpoint.refresh(refresh, record.grant, scopes=scopes)
