"""Our own SMTP submission client for relaying to the provider as the account.

Twisted's `ESMTPSender` is not used: it dot-stuffs per 16 KiB chunk (a "."
line at a chunk boundary truncated the message and the rest ran as commands),
leaves its Deferred unfired after a failed TLS handshake, and does not insist
on TLS (see notes/twisted-mail-traps.md).

Three layers, each testable alone:

- `ReplyParser` turns bytes into `Reply` objects (multi-line replies joined),
  knowing nothing of sockets or commands.
- `SMTPClient` is the Twisted protocol: commands answered in order, pipelined
  when the server offers PIPELINING (RFC 2920), a timeout on an injected
  clock, and message content streamed from a file with `DotStuffer` (the rule
  that holds at every byte offset) under the transport's back-pressure.
- `connect()`, `login()` and `send_message()`: TLS (465 implicit, or 587 with
  STARTTLS, which is then required; always verified), EHLO, AUTH as the
  account, and one transaction with a result per recipient.

Failures of the connection, TLS or login are `SMTPUpstreamError` (the relay
retries them); what the server says about a message comes back as `Reply`
objects for the relay to judge. No command carrying a secret is ever logged
or put into an error text.
"""

from __future__ import annotations

import base64
import binascii
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from gateway.dotstuff import DotStuffer
from gateway.model import Account, Provider
from gateway.upstream.connection import (
    EndpointFactory,
    UpstreamLifecycle,
    describe_error,
    hostname_endpoint,
    open_connection,
)
from gateway.upstream.credentials import TokenSource, mechanism_for, retry_with_fresh_token
from gateway.upstream.errors import UpstreamError, UpstreamRejected
from gateway.upstream.sasl import Login, SASLMechanism
from gateway.upstream.streaming import IdleTimer

log = Logger()

# RFC 5321 4.5.3.1.5 allows 512 octets per reply line; EHLO lists and SASL
# challenges are longer in practice but nowhere near this.
MAX_LINE = 64 * 1024
MAX_REPLY_LINES = 1000
# RFC 5321 4.5.3.2.6: wait up to 10 minutes for the reply to the final ".".
DATA_END_TIMEOUT = 600.0
# Read this much of the spool file per write; the transport's back-pressure
# decides how fast.
CHUNK_SIZE = 256 * 1024


# --- Replies ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """One (possibly multi-line) server reply; `lines` are the texts after the code."""

    code: int
    lines: tuple[bytes, ...]

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 status code at the start of the text, if there is one."""
        first = self.lines[0].split(b" ", 1)[0] if self.lines else b""
        parts = first.split(b".")
        if len(parts) == 3 and all(p.isdigit() and 0 < len(p) <= 3 for p in parts):
            if parts[0] in (b"2", b"4", b"5"):
                return first.decode()
        return None

    def describe(self, limit: int = 300) -> str:
        """The reply as it may appear in a log line or a bounce (bounded, printable)."""
        text = b" ".join(self.lines)[:limit].decode("utf-8", "replace")
        text = "".join(c if c.isprintable() else "?" for c in text)
        return f"{self.code} {text}".rstrip()

    def keywords(self) -> dict[str, str]:
        """EHLO extensions: keyword (upper case) -> parameters."""
        found: dict[str, str] = {}
        for line in self.lines[1:]:
            word, _, params = line.decode("ascii", "replace").strip().partition(" ")
            if word:
                found[word.upper()] = params.strip()
        return found


class SMTPProtocolError(Exception):
    """The server sent something that is not an SMTP reply."""


class ReplyParser:
    """Bytes in, replies out; holds at most one partial reply."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buffer = b""
        self._lines: list[bytes] = []
        self._code: bytes | None = None
        self._max = max_line

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_reply(self) -> Reply | None:
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self._max:
                    raise SMTPProtocolError(f"reply line longer than {self._max} octets")
                return None
            line = self._buffer[:end].rstrip(b"\r")
            self._buffer = self._buffer[end + 1 :]
            code, sep, text = line[:3], line[3:4], line[4:]
            if len(code) != 3 or not code.isdigit() or sep not in (b" ", b"-", b""):
                raise SMTPProtocolError(f"not an SMTP reply: {_printable(line[:80])!r}")
            if self._code is not None and code != self._code:
                raise SMTPProtocolError("reply code changed inside a multi-line reply")
            self._code = code
            self._lines.append(text)
            if len(self._lines) > MAX_REPLY_LINES:
                raise SMTPProtocolError("multi-line reply too long")
            if sep != b"-":
                reply = Reply(int(code), tuple(self._lines))
                self._lines = []
                self._code = None
                return reply


def _printable(text: bytes) -> str:
    return "".join(c if c.isprintable() else "?" for c in text.decode("utf-8", "replace"))


# --- Errors -------------------------------------------------------------------


class SMTPUpstreamError(Exception):
    """The session with the upstream failed (connect, TLS, greeting, login, lost).

    `detail` is for the log; `reply` is the server's answer when there was one.
    `admin` marks what retrying alone will not fix (credentials refused,
    account not configured): the relay still retries, but logs it as an error.
    """

    def __init__(self, detail: str, *, reply: Reply | None = None, admin: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reply = reply
        self.admin = admin


# --- The protocol ----------------------------------------------------------------


@dataclass(eq=False)
class _Pending:
    verb: str
    deferred: Deferred[Reply]
    line: bytes | None = None
    pipelined: bool = False
    # Answers 334 continuations (AUTH); the command stays in flight.
    on_continuation: Callable[[Reply], None] | None = None
    # Runs synchronously when the reply is positive, before any later byte is read.
    on_positive: Callable[[], None] | None = None
    timeout: float | None = None


class _Bounded:
    """The first `size` bytes of a file: the spool file ends with the envelope."""

    def __init__(self, source: BinaryIO, size: int) -> None:
        self._source = source
        self._left = size

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if n < 0 else min(n, self._left)
        data = self._source.read(n)
        self._left -= len(data)
        return data


class SMTPClient(UpstreamLifecycle, IdleTimer, Protocol):
    """One upstream SMTP connection; every command returns a Deferred[Reply].

    When the connection breaks, times out, or `abort()` is called, every
    pending and later command fails with `SMTPUpstreamError`, so no Deferred
    is ever left unfired.
    """

    def __init__(self, clock: IReactorTime, timeout: float, *, peer: str = "upstream") -> None:
        self._clock = clock
        self._timeout = timeout
        self.peer = peer
        self.extensions: dict[str, str] = {}
        self._parser = ReplyParser()
        self._queue: deque[_Pending] = deque()
        self._inflight: deque[_Pending] = deque()
        self._ended: str | None = None
        self._quitting = False
        self._connected = False
        self._lost = False
        self._closed_waiters: list[Deferred[None]] = []
        greeting = _Pending("greeting", self._new_deferred())
        self._inflight.append(greeting)
        self._greeting = greeting.deferred

    # -- public API

    def greeting(self) -> Deferred[Reply]:
        return self._greeting

    @property
    def ended(self) -> bool:
        """No more commands can be sent (failed, aborted, or QUIT sent)."""
        return self._ended is not None or self._quitting

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    def command(
        self, line: bytes, *, pipelined: bool = False, timeout: float | None = None
    ) -> Deferred[Reply]:
        """Send one command line (without CRLF); fires with the reply, whatever its code.

        `pipelined` commands may go out before earlier replies arrived, when
        the server offered PIPELINING.
        """
        verb = line.split(b" ", 1)[0].decode("ascii", "replace").upper()
        return self._enqueue(
            _Pending(verb, self._new_deferred(), line, pipelined=pipelined, timeout=timeout)
        )

    async def ehlo(self, name: str) -> Reply:
        reply = await self.command(b"EHLO " + name.encode("ascii"))
        if reply.code != 250:
            raise SMTPUpstreamError(f"{self.peer} refused EHLO: {reply.describe()}", reply=reply)
        self.extensions = reply.keywords()
        return reply

    def starttls(self, options: IOpenSSLClientConnectionCreator) -> Deferred[Reply]:
        """STARTTLS; TLS starts synchronously at the 220 (RFC 3207).

        Any byte that arrived with or after the 220 in clear could only come
        from a man in the middle: it ends the session instead of being read.
        """

        def start() -> None:
            if self._parser.buffered:
                self._end(f"{self.peer} sent data after its STARTTLS answer")
                return
            self.extensions = {}
            self.transport.startTLS(options)  # type: ignore[union-attr]

        return self._enqueue(
            _Pending("STARTTLS", self._new_deferred(), b"STARTTLS", on_positive=start)
        )

    def authenticate(self, mechanism: SASLMechanism) -> Deferred[Reply]:
        """AUTH (RFC 4954), answering 334 challenges; fires with the final reply.

        The initial response goes on the AUTH line (RFC 4954 allows lines up
        to 12288 octets, enough for any bearer token).
        """
        line = b"AUTH " + mechanism.name.encode("ascii")
        initial = mechanism.initial_response()
        if initial is not None:
            line += b" " + (base64.b64encode(initial) or b"=")

        def answer(reply: Reply) -> None:
            payload = reply.lines[0] if reply.lines else b""
            try:
                challenge = base64.b64decode(payload.strip(), validate=True)
            except (binascii.Error, ValueError):
                response = None
            else:
                response = mechanism.respond(challenge)
            self._write(b"*\r\n" if response is None else base64.b64encode(response) + b"\r\n")

        return self._enqueue(_Pending("AUTH", self._new_deferred(), line, on_continuation=answer))

    def send_content(self, source: BinaryIO, size: int) -> Deferred[Reply]:
        """After `354`: the message, dot-stuffed, then ".", and the final reply."""
        pending = _Pending("DATA content", self._new_deferred(), timeout=DATA_END_TIMEOUT)
        if self._ended is not None:
            return fail(SMTPUpstreamError(self._ended))
        assert not self._inflight and not self._queue, "content sent with commands pending"
        assert not self._quitting
        self._inflight.append(pending)
        stuffer = DotStuffer()
        if size <= CHUNK_SIZE:
            # Most messages: one write, one TLS record run, no producer round trips.
            data = _Bounded(source, size).read()
            self._write(stuffer.feed(data) + stuffer.close() + b".\r\n")
            self._arm_timer()
            return pending.deferred

        def transform(chunk: bytes) -> bytes:
            self._last_activity = self._clock.seconds()
            return stuffer.feed(chunk)

        sender = FileSender()
        sender.CHUNK_SIZE = CHUNK_SIZE
        self._arm_timer()
        sent = sender.beginFileTransfer(_Bounded(source, size), self.transport, transform)

        def finished(_: object) -> None:
            if self._ended is None:
                self._write(stuffer.close() + b".\r\n")
                self._arm_timer()

        def failed(reason: Failure) -> None:
            self._end(f"sending the message to {self.peer} failed: {describe_error(reason.value)}")

        sent.addCallbacks(finished, failed)
        return pending.deferred

    def quit(self) -> Deferred[Reply]:
        def close() -> None:
            if self.transport is not None:
                self.transport.loseConnection()

        d = self._enqueue(_Pending("QUIT", self._new_deferred(), b"QUIT", on_positive=close))
        self._quitting = True
        return d

    def abort(self, detail: str = "aborted by the gateway") -> None:
        """Drop the connection now; fail whatever is pending. Idempotent."""
        self._end(detail)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        what = self._connection_gone(reason, quiet_close=False)
        self._end(what + self._waiting_for(), abort_transport=False)
        self._notify_closed()

    # -- internals

    def _new_deferred(self) -> Deferred[Reply]:
        return Deferred(lambda d: self.abort("a pending command was cancelled"))

    def _enqueue(self, pending: _Pending) -> Deferred[Reply]:
        if self._ended is not None:
            return fail(SMTPUpstreamError(self._ended))
        if self._quitting:
            return fail(SMTPUpstreamError(f"the session with {self.peer} is ending (QUIT sent)"))
        self._queue.append(pending)
        self._send_queued()
        return pending.deferred

    def _send_queued(self) -> None:
        while self._queue and self._connected and self._ended is None:
            head = self._queue[0]
            if self._inflight and not (
                self.pipelining and head.pipelined and all(p.pipelined for p in self._inflight)
            ):
                return
            self._queue.popleft()
            self._inflight.append(head)
            assert head.line is not None
            self._write(head.line + b"\r\n")
        self._arm_timer()

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def _process(self) -> None:
        while self._inflight and self._ended is None:
            try:
                reply = self._parser.next_reply()
            except SMTPProtocolError as e:
                self._end(f"{self.peer}: {e}{self._waiting_for()}")
                return
            if reply is None:
                return
            head = self._inflight[0]
            if reply.code == 334 and head.on_continuation is not None:
                head.on_continuation(reply)
                continue
            self._inflight.popleft()
            if reply.positive and head.on_positive is not None:
                head.on_positive()
                if self._ended is not None:
                    head.deferred.errback(Failure(SMTPUpstreamError(self._ended)))
                    return
            # The next command may have another timeout (the end of DATA).
            self._cancel_timer()
            self._send_queued()
            head.deferred.callback(reply)
        if not self._inflight and self._parser.buffered and self._ended is None:
            self._end(f"{self.peer} sent data nobody asked for")

    def _end(self, detail: str, *, abort_transport: bool = True) -> None:
        """End the session once: fail everything pending, drop the connection."""
        if self._ended is None:
            self._ended = detail
        self._cancel_timer()
        pending = list(self._inflight) + list(self._queue)
        self._inflight.clear()
        self._queue.clear()
        if abort_transport and self._connected and self.transport is not None:
            self.transport.abortConnection()
        for p in pending:
            if not p.deferred.called:
                p.deferred.errback(Failure(SMTPUpstreamError(detail)))

    def _waiting_for(self) -> str:
        if self._inflight:
            return f" while waiting for the answer to {self._inflight[0].verb}"
        return ""

    # -- idle timeout (IdleTimer hooks)

    def _timer_due(self) -> bool:
        return self._connected and self._ended is None and bool(self._inflight)

    def _idle_limit(self) -> float | None:
        # The command at the head may wait longer (the end of DATA).
        head = self._inflight[0] if self._inflight else None
        return max(self._timeout, head.timeout or 0.0) if head else None

    def _idle_expired(self, limit: float) -> None:
        self._end(f"{self.peer} sent nothing for {limit:g} s{self._waiting_for()}")


# --- Session set-up -----------------------------------------------------------------


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
    client, tls = await open_connection(
        provider,
        server,
        SMTPClient,
        reactor=reactor,
        endpoint_factory=endpoint_factory,
        error=SMTPUpstreamError,
        passthrough=SMTPUpstreamError,
        # A TLS set-up problem (the CA file) is the administrator's to fix.
        setup_error=lambda detail: SMTPUpstreamError(detail, admin=True),
    )
    peer = client.peer
    try:
        greeting = await client.greeting()
        if greeting.code != 220:
            raise SMTPUpstreamError(f"{peer} greeted with {greeting.describe()}", reply=greeting)
        await client.ehlo(helo_name)
        if server.tls == "starttls":
            if "STARTTLS" not in client.extensions:
                raise SMTPUpstreamError(f"{peer} does not offer STARTTLS; not sending in clear")
            reply = await client.starttls(tls)
            if reply.code != 220:
                raise SMTPUpstreamError(f"{peer} refused STARTTLS: {reply.describe()}", reply=reply)
            # RFC 3207 4.2: forget what was learnt in clear, ask again.
            await client.ehlo(helo_name)
    except BaseException:
        client.abort("connection set-up failed")
        raise
    return client


def choose_mechanism_name(account: Account, offered: Collection[str]) -> str | None:
    """For a password account: PLAIN, else LOGIN, whichever the server offers."""
    names = {name.upper() for name in offered}
    if account.auth == "oauth2":
        return None
    if "PLAIN" not in names and "LOGIN" in names:
        return "LOGIN"
    return "PLAIN"


async def login(
    client: SMTPClient, account: Account, provider: Provider, tokens: TokenSource | None
) -> None:
    """AUTH as the account (PLAIN/LOGIN with its password, XOAUTH2/OAUTHBEARER with
    a token); one retry with a refreshed token when the server blamed the token."""
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
        if retry_with_fresh_token(mechanism, already_forced=forced) and reply.permanent:
            forced = True
            continue
        raise SMTPUpstreamError(
            f"{client.peer} refused the login of account {account.name} "
            f"({mechanism.name}): {reply.describe()}",
            reply=reply,
            admin=reply.permanent,
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
    try:
        await login(client, account, provider, tokens)
    except BaseException:
        client.abort("login failed")
        raise
    return client


# --- One transaction -----------------------------------------------------------------


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
