"""How an upstream client gets what it logs in with, whatever the protocol.

A password account carries its password in the config. An OAuth2 account
gets a bearer token from a `TokenSource` (gateway.oauth), which keeps tokens
fresh and makes concurrent logins share one refresh. POP3, IMAP and SMTP
clients all log in through `mechanism_for`, so the choice of SASL mechanism
and the "refresh once after a 401" rule live in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, Protocol

from twisted.logger import Logger

from gateway.model import Account, Provider, Secret
from gateway.upstream.errors import UpstreamError, UpstreamRejected, UpstreamUnavailable
from gateway.upstream.sasl import BearerError, OAuthBearer, Plain, SASLMechanism, XOAuth2

log = Logger(namespace="gateway.upstream")


class TokenSource(Protocol):
    async def access_token(self, account: Account, *, force_refresh: bool = False) -> str:
        """A currently valid access token for `account`.

        Raises a `gateway.upstream.errors.UpstreamError`: `UpstreamRejected`
        (SYS/PERM) when the account needs re-authorisation by an admin,
        `UpstreamUnavailable` (SYS/TEMP) when no valid token can be had now.
        """
        ...


def bearer_mechanism_name(provider: Provider, offered: Collection[str]) -> str:
    """XOAUTH2 or OAUTHBEARER for this provider and what the server advertises.

    The provider's `sasl` override wins, even when the server does not list
    it (some list mechanisms only after TLS, or not at all). Otherwise the
    standard OAUTHBEARER when offered, else XOAUTH2, which Microsoft 365 and
    Gmail both accept; an empty `offered` (no CAPA) also means XOAUTH2.
    """
    if provider.sasl != "auto":
        return provider.sasl.upper()
    names = {name.upper() for name in offered}
    if "OAUTHBEARER" in names:
        return "OAUTHBEARER"
    if "XOAUTH2" in names or not names:
        return "XOAUTH2"
    raise UpstreamRejected(
        f"provider {provider.name} offers neither XOAUTH2 nor OAUTHBEARER "
        f"(offers {' '.join(sorted(names))})"
    )


async def mechanism_for(
    account: Account,
    provider: Provider,
    offered: Collection[str],
    tokens: TokenSource | None,
    *,
    force_refresh: bool = False,
) -> SASLMechanism:
    """The SASL mechanism to log in upstream as `account`, fresh for one attempt.

    Password accounts get PLAIN. OAuth2 accounts get XOAUTH2 or OAUTHBEARER
    (see `bearer_mechanism_name`) carrying a token from `tokens`; pass
    `force_refresh=True` for the single retry after the server refused a token
    that looked valid (`retry_with_fresh_token`). Raises an UpstreamError:
    `UpstreamRejected` for what only an admin can fix, `UpstreamUnavailable`
    when no valid token can be had right now.
    """
    if account.auth != "oauth2":
        if account.password is None:
            raise UpstreamRejected(f"account {account.name} has no password configured")
        try:
            return Plain(account.username, account.password)
        except ValueError as e:
            raise UpstreamRejected(f"account {account.name}: {e}") from None
    if tokens is None:
        raise UpstreamUnavailable(
            f"account {account.name} uses OAuth2 but this process has no token manager"
        )
    name = bearer_mechanism_name(provider, offered)
    token = Secret(await tokens.access_token(account, force_refresh=force_refresh))
    try:
        if name == "OAUTHBEARER":
            return OAuthBearer(account.username, token)
        return XOAuth2(account.username, token)
    except ValueError as e:
        raise UpstreamRejected(f"account {account.name}: {e}") from None


def bearer_error(mechanism: SASLMechanism) -> BearerError | None:
    """The JSON error report the server sent during a failed bearer login, if any."""
    error = getattr(mechanism, "error", None)
    return error if isinstance(error, BearerError) else None


def retry_with_fresh_token(mechanism: SASLMechanism, *, already_forced: bool) -> bool:
    """After a refused login: is one more attempt with a force-refreshed token worth it?

    Only for bearer mechanisms, only once per login (`already_forced`), and
    only when the server blamed the token (401 / invalid_token) or gave no
    reason: a 403 or a scope error will not be cured by a new token, and
    retrying those would only add load at the provider.
    """
    if already_forced or not isinstance(mechanism, (XOAuth2, OAuthBearer)):
        return False
    error = bearer_error(mechanism)
    return error is None or error.token_rejected


async def bearer_login(
    client: Any,
    account: Account,
    provider: Provider,
    tokens: TokenSource | None,
    *,
    server_error: type[Exception],
    refusal: Callable[[Any, str], UpstreamError],
) -> None:
    """Log in with the account's bearer token (XOAUTH2 or OAUTHBEARER), for
    any client whose `authenticate(mechanism)` raises `server_error` when the
    server says no (POP3 AUTH, IMAP AUTHENTICATE).

    A token the server refuses although it looked valid (revoked early, or
    the clocks disagree) gets exactly one forced refresh and one retry on the
    same connection; a second refusal is final, so a bad token never loops.
    The server's JSON status goes to the log detail, never the token.
    `refusal(error, peer)` maps the final refusal to the device's error.
    """
    forced = False
    while True:
        mechanism = await mechanism_for(
            account, provider, client.capabilities.sasl, tokens, force_refresh=forced
        )
        try:
            await client.authenticate(mechanism)
            return
        except server_error as e:
            error = bearer_error(mechanism)
            status = f" (token {error.describe()})" if error else ""
            if retry_with_fresh_token(mechanism, already_forced=forced):
                log.warn(
                    "{peer} refused the access token of account {account} with "
                    "{mechanism}{status}; refreshing it once and retrying",
                    peer=client.peer,
                    account=account.name,
                    mechanism=mechanism.name,
                    status=status,
                )
                forced = True
                continue
            refused = refusal(e, client.peer)
            refused.detail += f"{status}; mechanism {mechanism.name}"
            if forced:
                refused.detail += ", after one forced token refresh"
            raise refused from None
