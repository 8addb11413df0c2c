"""Setting up an upstream IMAP session: TLS, capabilities and login as the account.

TLS is implicit or STARTTLS, always verified; every failure is mapped to the
`UpstreamError` the device should see (`gateway.maildrop` names the family).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger

from gateway.model import Account, Provider
from gateway.timing import timed_step
from gateway.upstream.connection import (
    EndpointFactory,
    hostname_endpoint,
    open_connection,
    or_abort,
)
from gateway.upstream.credentials import (
    TokenSource,
    bearer_error,
    bearer_login,
    is_bearer,
    mechanism_for,
    note_refused,
    refused,
)
from gateway.upstream.errors import (
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.upstream.imap.client import IMAPClient
from gateway.upstream.imap.responses import ServerError, Status
from gateway.upstream.refusals import Answer, classify_login
from gateway.upstream.sasl import SASLMechanism

# One line per upstream login, with `upstream_login` (the protocol) among its
# fields: `gateway.admin.events` counts them as gateway_upstream_logins_total.
login_log = Logger(namespace="gateway.upstream.logins")


async def connect(
    provider: Provider,
    *,
    reactor: Any,
    endpoint_factory: EndpointFactory = hostname_endpoint,
) -> IMAPClient:
    """Connect, read the greeting, secure the connection and learn capabilities.

    Returns a client ready to log in, always over verified TLS: for STARTTLS
    providers a missing or refused STARTTLS ends here, before any credential.
    `reactor` must provide IReactorTime (and whatever the endpoint needs).
    """
    server = provider.imap
    if server is None:
        raise UpstreamRejected(f"provider {provider.name} has no imap endpoint")
    return await open_connection(
        provider,
        server,
        IMAPClient,
        reactor=reactor,
        endpoint_factory=endpoint_factory,
        secure=_secure,
    )


async def _secure(
    client: IMAPClient, mode: str, tls: IOpenSSLClientConnectionCreator
) -> IMAPClient:
    peer = client.peer
    try:
        try:
            await client.greeting()
        except ServerError as e:
            raise UpstreamUnavailable(f"{peer} greeted with {e.status.describe()}") from None
        if mode == "starttls":
            if not client.capabilities:
                await client.capability()
            if "STARTTLS" not in client.capabilities:
                raise UpstreamUnavailable(
                    f"{peer} does not offer STARTTLS; not logging in in clear"
                )
            try:
                await client.starttls(tls)
            except ServerError as e:
                raise UpstreamUnavailable(
                    f"{peer} refused STARTTLS: {e.status.describe()}"
                ) from None
            # RFC 3501 6.2.1: forget what was learnt in clear.
            await client.capability()
        elif not client.capabilities:
            await client.capability()
    except ServerError as e:
        raise UpstreamUnavailable(f"{peer} refused {e.verb}: {e.status.describe()}") from None
    return client


def answer_of(status: Status) -> Answer:
    """An IMAP status response, as `gateway.upstream.refusals` reads it."""
    return Answer("imap", status.describe(), response_code=status.code)


def login_refused(
    error: ServerError, peer: str, mechanism: SASLMechanism | None = None, note: str = ""
) -> UpstreamError:
    """Classify a refused LOGIN/AUTHENTICATE (`gateway.upstream.refusals`) and map
    it to what the device should be told: [IN-USE], SYS/TEMP or SYS/PERM."""
    status = error.status
    challenge = bearer_error(mechanism) if mechanism is not None else None
    refusal = classify_login(
        answer_of(status),
        bearer=is_bearer(mechanism),
        challenge_status=challenge.status if challenge is not None else None,
    )
    return refused(refusal, f"{peer} refused the login ({error.verb}): {status.describe()}{note}")


async def login(
    client: IMAPClient,
    account: Account,
    provider: Provider,
    *,
    tokens: TokenSource | None = None,
) -> None:
    """Log in as the account; raise the UpstreamError the device should see.

    Password accounts use AUTHENTICATE PLAIN when offered, else LOGIN (never
    both: a wrong password would count twice against the upstream's penalty).
    OAuth2 accounts use XOAUTH2/OAUTHBEARER with one forced token refresh
    after a refused token, as `gateway.upstream.credentials` rules. A
    classified refusal is also recorded for `gateway oauth status`.
    """
    announced = client.capabilities
    try:
        if account.auth == "oauth2":
            await bearer_login(
                client, account, provider, tokens, server_error=ServerError, refusal=login_refused
            )
        else:
            await _password_login(client, account, provider)
    except UpstreamError as e:
        note_refused(tokens, account, e)
        raise
    client.logged_in = True
    # Servers may offer more once logged in (RFC 3501 6.2.3); most say so in
    # the login answer. If this one did not, ask later, when it matters.
    client.capabilities_stale = client.capabilities is announced


async def _password_login(client: IMAPClient, account: Account, provider: Provider) -> None:
    if account.password is None:
        raise UpstreamRejected(f"account {account.name} has no password configured")
    caps = client.capabilities
    try:
        if "PLAIN" in caps.sasl:
            mechanism = await mechanism_for(account, provider, caps.sasl, None)
            await client.authenticate(mechanism)
        elif "LOGINDISABLED" in caps:
            raise UpstreamRejected(
                f"{client.peer} offers neither AUTH=PLAIN nor LOGIN "
                f"(capabilities: {' '.join(sorted(caps.names))})"
            )
        else:
            try:
                await client.login(account.username, account.password)
            except ValueError as e:
                raise UpstreamRejected(f"account {account.name}: {e}") from None
    except ServerError as e:
        raise login_refused(e, client.peer) from None


async def open_session(
    account: Account,
    provider: Provider,
    *,
    reactor: Any,
    endpoint_factory: EndpointFactory = hostname_endpoint,
    tokens: TokenSource | None = None,
    why: str = "device session",
) -> IMAPClient:
    """Connect and log in as `account`; the client is in the authenticated state.

    `why` goes to the login's log line: a device session, or what made a
    kept connection log in again.
    """
    client = await connect(provider, reactor=reactor, endpoint_factory=endpoint_factory)
    logging_in = timed_step(
        "imap", provider.name, "login", login(client, account, provider, tokens=tokens)
    )
    await or_abort(client, logging_in, "login failed")
    login_log.info(
        "upstream imap login for account {account} at {provider} ({why})",
        upstream_login="imap",
        account=account.name,
        provider=provider.name,
        why=why,
    )
    return client
