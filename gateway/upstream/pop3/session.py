"""Setting up an upstream POP3 session: TLS, CAPA and login as the account.

TLS is implicit or STLS, always verified; every failure is mapped to the
`UpstreamError` the device should see (`gateway.maildrop` names the family).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, TypeAlias

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure

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
    note_refused,
    refused,
)
from gateway.upstream.errors import (
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.upstream.pop3.client import MAX_COMMAND, POP3Client
from gateway.upstream.pop3.parser import Capabilities, ServerError
from gateway.upstream.refusals import Answer, classify_login
from gateway.upstream.sasl import Plain, SASLMechanism


async def connect(
    provider: Provider,
    *,
    reactor: Any,
    endpoint_factory: EndpointFactory = hostname_endpoint,
) -> POP3Client:
    """Connect, read the greeting, secure the connection and read CAPA.

    Returns a client ready to log in, always over verified TLS: for STLS
    providers a missing or refused STLS ends here, before any credential.
    `reactor` must provide IReactorTime (and whatever the endpoint needs).
    """
    server = provider.pop3
    if server is None:
        raise UpstreamUnavailable(f"provider {provider.name} has no pop3 endpoint")
    return await open_connection(
        provider,
        server,
        POP3Client,
        reactor=reactor,
        endpoint_factory=endpoint_factory,
        secure=_secure,
    )


async def _secure(
    client: POP3Client, mode: str, tls: IOpenSSLClientConnectionCreator
) -> POP3Client:
    peer = client.peer
    try:
        await client.greeting()
    except ServerError as e:
        raise UpstreamUnavailable(f"{peer} greeted with {e.status.describe()}") from None
    await client.read_capabilities()
    if mode == "starttls":
        if "STLS" not in client.capabilities:
            raise UpstreamUnavailable(f"{peer} does not offer STLS; not logging in in clear")
        try:
            await client.starttls(tls)
        except ServerError as e:
            raise UpstreamUnavailable(f"{peer} refused STLS: {e.status.describe()}") from None
        # RFC 2595 section 4: forget what was learnt in clear.
        await client.read_capabilities()
    return client


def login_refused(
    error: ServerError, peer: str, mechanism: SASLMechanism | None = None, note: str = ""
) -> UpstreamError:
    """Classify a refused USER/PASS/AUTH (`gateway.upstream.refusals`) and map it
    to what the device should be told: [IN-USE], SYS/TEMP or SYS/PERM."""
    status = error.status
    challenge = bearer_error(mechanism) if mechanism is not None else None
    refusal = classify_login(
        Answer("pop3", status.describe(), response_code=status.code),
        bearer=is_bearer(mechanism),
        challenge_status=challenge.status if challenge is not None else None,
    )
    return refused(refusal, f"{peer} refused the login ({error.verb}): {status.describe()}{note}")


def login_method(provider: Provider, capabilities: Capabilities) -> str:
    """ "plain" (AUTH PLAIN) or "user" (USER/PASS) for this provider and server."""
    if provider.pop3_auth == "auto":
        return "plain" if "PLAIN" in capabilities.sasl else "user"
    return provider.pop3_auth


# A command sent right after the login, given the client: the first look at
# the mailbox (LIST). Its Deferred fires with the command's answer.
FollowUp: TypeAlias = Callable[[POP3Client], "Deferred[Any]"]


async def login(
    client: POP3Client,
    account: Account,
    provider: Provider,
    *,
    tokens: TokenSource | None = None,
) -> None:
    """Log in as the account; raise the UpstreamError the device should see.

    A refused AUTH PLAIN does not fall back to USER/PASS: a wrong password
    would count twice against the upstream's failed-login penalty. OAuth2
    accounts log in with a bearer token from `tokens` (`bearer_login`). A
    classified refusal is also recorded for `gateway oauth status`.
    """
    await login_then(client, account, provider, tokens=tokens)


async def login_then(
    client: POP3Client,
    account: Account,
    provider: Provider,
    *,
    tokens: TokenSource | None = None,
    then: FollowUp | None = None,
) -> Deferred[Any] | None:
    """`login`, and `then(client)` sends the command that follows it; returns its Deferred.

    With the login in one write when the server announced PIPELINING (RFC
    2449) and the login is one line (AUTH PLAIN with its initial response),
    which saves a round trip per session; otherwise once the login
    succeeded. After a refused login its answer is ignored.
    """
    try:
        return await _login(client, account, provider, tokens, then)
    except UpstreamError as e:
        note_refused(tokens, account, e)
        raise


def _ignore(failure: Failure) -> None:
    return None


async def _login(
    client: POP3Client,
    account: Account,
    provider: Provider,
    tokens: TokenSource | None,
    then: FollowUp | None,
) -> Deferred[Any] | None:
    if account.auth == "oauth2":
        await bearer_login(
            client, account, provider, tokens, server_error=ServerError, refusal=login_refused
        )
        client.logged_in = True
        return then(client) if then is not None else None
    if account.password is None:
        raise UpstreamRejected(f"account {account.name} has no password configured")
    method = login_method(provider, client.capabilities)
    follow: Deferred[Any] | None = None
    try:
        if method == "plain":
            try:
                mechanism: SASLMechanism = Plain(account.username, account.password)
            except ValueError as e:
                raise UpstreamRejected(f"account {account.name}: {e}") from None
            pipelined = then is not None and _one_line(mechanism, client)
            authenticating = client.authenticate(mechanism, pipelinable=pipelined)
            if pipelined:
                assert then is not None
                follow = then(client)
            try:
                await authenticating
            except BaseException:
                if follow is not None:
                    # The answer to a command sent after a refused login means nothing.
                    follow.addErrback(_ignore)
                raise
        else:
            try:
                await client.user_pass(account.username, account.password)
            except ValueError as e:
                raise UpstreamRejected(f"account {account.name}: {e}") from None
    except ServerError as e:
        raise login_refused(e, client.peer) from None
    client.logged_in = True
    if follow is None and then is not None:
        follow = then(client)
    return follow


def _one_line(mechanism: SASLMechanism, client: POP3Client) -> bool:
    """Whether AUTH with `mechanism` can be pipelined: PIPELINING announced and
    the initial response fits on the AUTH line (`POP3Client.authenticate`)."""
    if "PIPELINING" not in client.capabilities:
        return False
    initial = mechanism.initial_response()
    if initial is None:
        return False
    encoded = base64.b64encode(initial) or b"="
    return len(b"AUTH ") + len(mechanism.name) + 1 + len(encoded) + 2 <= MAX_COMMAND


async def open_session(
    account: Account,
    provider: Provider,
    *,
    reactor: Any,
    endpoint_factory: EndpointFactory = hostname_endpoint,
    tokens: TokenSource | None = None,
) -> POP3Client:
    """Connect and log in as `account`; the client is in the TRANSACTION state."""
    client, _ = await open_session_then(
        account, provider, reactor=reactor, endpoint_factory=endpoint_factory, tokens=tokens
    )
    return client


async def open_session_then(
    account: Account,
    provider: Provider,
    *,
    reactor: Any,
    endpoint_factory: EndpointFactory = hostname_endpoint,
    tokens: TokenSource | None = None,
    then: FollowUp | None = None,
) -> tuple[POP3Client, Deferred[Any] | None]:
    """`open_session`, with `then(client)` sent after the login (see `login`);
    returns the client and the follow-up's Deferred."""
    client = await connect(provider, reactor=reactor, endpoint_factory=endpoint_factory)
    logging_in = timed_step(
        "pop3",
        provider.name,
        "login",
        login_then(client, account, provider, tokens=tokens, then=then),
    )
    follow = await or_abort(client, logging_in, "login failed")
    return client, follow
