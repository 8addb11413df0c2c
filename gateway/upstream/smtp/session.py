"""An upstream SMTP session: connect, TLS, EHLO, AUTH as the account, one transaction.

TLS is 465 implicit, or 587 with STARTTLS, which is then required; always
verified. Failures of the connection, TLS or login are `SMTPUpstreamError`
(the relay retries them); what the server says about a message comes back as
`Reply` objects in a `Transmission` for the relay to judge.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from gateway.model import Account, Provider
from gateway.oauth.refusal import Refusal, RefusalKind
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
    is_bearer,
    mechanism_for,
    note_refused,
    note_succeeded,
    retry_with_fresh_token,
)
from gateway.upstream.errors import UpstreamError, UpstreamRejected
from gateway.upstream.refusals import Answer, classify_login, describe
from gateway.upstream.sasl import Login, SASLMechanism
from gateway.upstream.smtp.client import SMTPClient, SMTPUpstreamError
from gateway.upstream.smtp.parser import Reply


async def connect(
    provider: Provider,
    *,
    reactor: Any,
    helo_name: str,
    endpoint_factory: EndpointFactory = hostname_endpoint,
) -> SMTPClient:
    """Connect, read the greeting, secure the connection (verified TLS), EHLO.

    For a "starttls" endpoint a missing or refused STARTTLS ends here, before
    any credential is sent.
    """
    server = provider.smtp
    if server is None:
        raise SMTPUpstreamError(f"provider {provider.name} has no smtp endpoint", admin=True)

    async def secure(client: SMTPClient, mode: str, tls: IOpenSSLClientConnectionCreator) -> None:
        await _secure(client, mode, tls, helo_name)

    return await open_connection(
        provider,
        server,
        SMTPClient,
        reactor=reactor,
        endpoint_factory=endpoint_factory,
        secure=secure,
        error=SMTPUpstreamError,
        passthrough=SMTPUpstreamError,
        # A TLS set-up problem (the CA file) is the administrator's to fix.
        setup_error=lambda detail: SMTPUpstreamError(detail, admin=True),
    )


async def _secure(
    client: SMTPClient, mode: str, tls: IOpenSSLClientConnectionCreator, helo_name: str
) -> SMTPClient:
    peer = client.peer
    greeting = await client.greeting()
    if greeting.code != 220:
        raise SMTPUpstreamError(f"{peer} greeted with {greeting.describe()}", reply=greeting)
    await client.ehlo(helo_name)
    if mode == "starttls":
        if "STARTTLS" not in client.extensions:
            raise SMTPUpstreamError(f"{peer} does not offer STARTTLS; not sending in clear")
        reply = await client.starttls(tls)
        if reply.code != 220:
            raise SMTPUpstreamError(f"{peer} refused STARTTLS: {reply.describe()}", reply=reply)
        # RFC 3207 4.2: forget what was learnt in clear, ask again.
        await client.ehlo(helo_name)
    return client


def choose_mechanism_name(account: Account, offered: Collection[str]) -> str | None:
    """For a password account: PLAIN, else LOGIN, whichever the server offers."""
    names = {name.upper() for name in offered}
    if account.auth == "oauth2":
        return None
    if "PLAIN" not in names and "LOGIN" in names:
        return "LOGIN"
    return "PLAIN"


def classify_auth_reply(reply: Reply, mechanism: SASLMechanism) -> Refusal:
    """What a refused AUTH means (`gateway.upstream.refusals`)."""
    challenge = bearer_error(mechanism)
    return classify_login(
        Answer("smtp", reply.describe(), reply_code=reply.code),
        bearer=is_bearer(mechanism),
        challenge_status=challenge.status if challenge is not None else None,
    )


async def login(
    client: SMTPClient, account: Account, provider: Provider, tokens: TokenSource | None
) -> None:
    """AUTH as the account (PLAIN/LOGIN with its password, XOAUTH2/OAUTHBEARER with
    a token); one retry with a refreshed token when the refusal is the token's.

    A refusal is classified; it is recorded for `gateway oauth status` and
    raised as an `SMTPUpstreamError` carrying it (the relay retries it).
    """
    try:
        await _login(client, account, provider, tokens)
    except SMTPUpstreamError as e:
        if e.refusal is not None:
            note_refused(tokens, account, e)
        raise
    note_succeeded(tokens, account)


async def _login(
    client: SMTPClient, account: Account, provider: Provider, tokens: TokenSource | None
) -> None:
    offered = client.extensions.get("AUTH", "").split()
    forced = False
    while True:
        try:
            if choose_mechanism_name(account, offered) == "LOGIN" and account.password:
                mechanism: SASLMechanism = Login(account.username, account.password)
            else:
                mechanism = await mechanism_for(
                    account, provider, offered, tokens, force_refresh=forced
                )
        except UpstreamError as e:
            raise SMTPUpstreamError(
                f"no credentials for account {account.name}: {e.detail or e}",
                admin=isinstance(e, UpstreamRejected),
            ) from None
        reply = await client.authenticate(mechanism)
        if reply.code == 235:
            return
        refusal = classify_auth_reply(reply, mechanism)
        if retry_with_fresh_token(mechanism, already_forced=forced, refusal=refusal):
            forced = True
            continue
        challenge = bearer_error(mechanism)
        status = f" (token {challenge.describe()})" if challenge else ""
        again = ", after one forced token refresh" if forced else ""
        raise SMTPUpstreamError(
            f"{client.peer} refused the login of account {account.name} "
            f"({mechanism.name}{again}): {reply.describe()}{status}; {describe(refusal)}",
            reply=reply,
            admin=refusal.kind is not RefusalKind.TEMPORARY,
            refusal=refusal,
        )


async def open_session(
    account: Account,
    provider: Provider,
    *,
    reactor: Any,
    helo_name: str,
    tokens: TokenSource | None = None,
    endpoint_factory: EndpointFactory = hostname_endpoint,
) -> SMTPClient:
    """Connect and log in as `account`, ready for `send_message`."""
    client = await connect(
        provider, reactor=reactor, helo_name=helo_name, endpoint_factory=endpoint_factory
    )
    logging_in = timed_step(
        "smtp", provider.name, "login", login(client, account, provider, tokens)
    )
    await or_abort(client, logging_in, "login failed")
    return client


@dataclass
class Transmission:
    """The upstream's verdict on one message: a reply per recipient."""

    replies: dict[str, Reply] = field(default_factory=dict)

    def delivered(self) -> list[str]:
        return [r for r, reply in self.replies.items() if reply.code // 100 == 2]

    def failed(self) -> dict[str, Reply]:
        return {r: reply for r, reply in self.replies.items() if reply.permanent}

    def deferred(self) -> dict[str, Reply]:
        return {r: reply for r, reply in self.replies.items() if reply.code // 100 == 4}


async def send_message(
    client: SMTPClient,
    *,
    sender: str,
    recipients: list[str],
    source: BinaryIO,
    size: int,
    eight_bit: bool,
) -> Transmission:
    """MAIL, RCPT..., DATA (one round trip with PIPELINING), then the content.

    Raises SMTPUpstreamError only if the connection fails; then nothing can
    be said about the message, and the relay tries it again.
    """
    params = b""
    if "SIZE" in client.extensions:
        params += b" SIZE=%d" % size
    if eight_bit and "8BITMIME" in client.extensions:
        params += b" BODY=8BITMIME"
    pipelined = client.pipelining
    result = Transmission()
    mail_d = client.command(b"MAIL FROM:<" + sender.encode() + b">" + params, pipelined=True)
    if not pipelined:
        mail = await mail_d
        if not mail.positive:
            result.replies = dict.fromkeys(recipients, mail)
            await _reset(client)
            return result
    rcpt_ds = [client.command(b"RCPT TO:<" + r.encode() + b">", pipelined=True) for r in recipients]
    accepted: list[str] = []
    if not pipelined:
        for recipient, d in zip(recipients, rcpt_ds, strict=True):
            reply = await d
            result.replies[recipient] = reply
            if reply.positive:
                accepted.append(recipient)
        if not accepted:
            await _reset(client)
            return result
    data_d = client.command(b"DATA", pipelined=True)
    if pipelined:
        mail = await mail_d
        for recipient, d in zip(recipients, rcpt_ds, strict=True):
            reply = await d
            result.replies[recipient] = reply if mail.positive else mail
            if mail.positive and reply.positive:
                accepted.append(recipient)
    data = await data_d
    if data.code != 354:
        for recipient in accepted:
            result.replies[recipient] = data
        await _reset(client)
        return result
    if not accepted:
        # A server that said 354 although every RCPT failed: end the empty
        # message and throw the transaction away.
        source = _Empty()  # type: ignore[assignment]
        size = 0
    final = await client.send_content(source, size)
    for recipient in accepted:
        result.replies[recipient] = final
    if not final.positive or not accepted:
        await _reset(client)
    return result


class _Empty:
    def read(self, n: int = -1) -> bytes:
        return b""


async def _reset(client: SMTPClient) -> None:
    reply = await client.command(b"RSET")
    if not reply.positive:
        client.abort(f"{client.peer} refused RSET: {reply.describe()}")
