"""Our own POP3 client for upstream mailboxes: a pure parser plus Twisted glue.

Twisted's `AdvancedPOP3Client` is not used: it starts STLS unverified, has no
SASL, no back-pressure and a line limit (see notes/twisted-mail-traps.md).

The module has three layers, each testable alone:

- `ResponseParser` turns bytes into events (`Status`, `Continuation`,
  `BodyChunk`) and knows nothing of sockets, clocks or commands. The caller
  tells it what the response at the head of the queue may be (`Expect`), since
  only the command decides whether a `+OK` starts a multi-line body.
- `POP3Client` is the Twisted protocol: one queue of commands, each with a
  Deferred, an idle timeout on an injected clock, and streaming of RETR/TOP
  bodies to a consumer with back-pressure on the upstream socket.
- `connect()`, `login()` and `open_session()` are the session set-up:
  TLS (implicit or STLS, always verified), CAPA, and login as the account,
  mapping every failure to the `MaildropError` the device should see.

Failures mean what the maildrop contract says: before login a broken
connection is `UpstreamUnavailable` (try again later), after it `UpstreamLost`.
Upstream texts only ever reach `detail` (for the log), never the device, and
no command line is ever echoed into a message, because PASS and AUTH carry the
account's secret.
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer, IOpenSSLClientConnectionCreator, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.maildrop import (
    MailboxInUse,
    MaildropError,
    UpstreamLost,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.model import Account, Provider, Secret
from gateway.upstream.connection import (
    EndpointFactory,
    UpstreamLifecycle,
    hostname_endpoint,
    open_connection,
)
from gateway.upstream.credentials import TokenSource, bearer_login
from gateway.upstream.sasl import Plain, SASLMechanism
from gateway.upstream.streaming import StreamingClient

log = Logger()

# A status or continuation line longer than this is not POP3 (RFC 2449 allows
# 512 octets; SASL challenges are longer but nowhere near this).
MAX_LINE = 64 * 1024
# LIST/UIDL/CAPA bodies are collected in memory; a mailbox of a million
# messages lists in ~20 MB. Anything larger is an upstream gone wrong.
MAX_LISTING = 64 * 1024 * 1024
# RFC 2449 section 4: a command line, CRLF included, is at most 255 octets.
# RFC 5034 section 4: an AUTH initial response that would overflow it is sent
# after an empty challenge instead.
MAX_COMMAND = 255

TERMINATOR = b"\r\n.\r\n"
# Bytes held back at the end of a chunk: one short of a whole terminator, so
# a terminator split across chunks is still found by one `find` on the join.
_HOLD = len(TERMINATOR) - 1


# --- The parser ----------------------------------------------------------------


class Expect(enum.Enum):
    """What the response to the command at the head of the queue may be."""

    SINGLE = "single"  # one status line
    MULTI = "multi"  # a status line; after +OK, a dot-terminated body
    SASL = "sasl"  # "+ challenge" continuations, then one status line


@dataclass(frozen=True, slots=True)
class Status:
    """A `+OK`/`-ERR` line; `code` is the RFC 2449 response code, upper-cased."""

    ok: bool
    code: str | None
    text: bytes

    def describe(self) -> str:
        """The line as it may appear in a log `detail` (upstream words, bounded)."""
        word = "+OK" if self.ok else "-ERR"
        code = f" [{self.code}]" if self.code else ""
        text = _printable(self.text)
        return f"{word}{code} {text}".rstrip()


@dataclass(frozen=True, slots=True)
class Continuation:
    """A SASL `+ <base64>` line; `payload` is still base64."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class BodyChunk:
    """Bytes of a multi-line body in wire form; `last` when the terminator was seen.

    The concatenated chunks of one body are exactly the dot-stuffed lines with
    their CRLFs, without the final ".CRLF".
    """

    data: bytes
    last: bool


Event: TypeAlias = Status | Continuation | BodyChunk


class POP3ProtocolError(Exception):
    """The upstream sent something that is not a POP3 response."""


_CODE_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-/")


def parse_status(line: bytes) -> Status | None:
    """Parse one status line (without CRLF); None if it is not one."""
    if line.startswith(b"+OK") and (len(line) == 3 or line[3:4] == b" "):
        ok, rest = True, line[4:]
    elif line.startswith(b"-ERR") and (len(line) == 4 or line[4:5] == b" "):
        ok, rest = False, line[5:]
    else:
        return None
    code = None
    if rest.startswith(b"["):
        end = rest.find(b"]")
        if end > 1 and all(c in _CODE_CHARS for c in rest[1:end]):
            code = rest[1:end].decode("ascii").upper()
            rest = rest[end + 1 :].lstrip(b" ")
    return Status(ok, code, rest)


class ResponseParser:
    """Bytes in, events out; holds at most a partial line or 4 body bytes.

    `feed()` stores data; `next_event()` returns one event at a time so the
    caller can act on each response (send the next command, start TLS, queue
    a new expectation) before the bytes after it are interpreted. Bytes that
    follow a complete response wait here for the next expectation.

    Multi-line bodies are not split into lines: each `next_event()` in a body
    looks for the terminator in (held bytes + new chunk) with one `bytes.find`
    and passes everything before the last 4 bytes on, so throughput does not
    depend on line lengths and a line of megabytes passes like any other.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._max_line = max_line
        self._buf = b""
        self._in_body = False
        self._held = b""
        # Bytes of `_held` that were never received: the body starts at the
        # beginning of a line, so the parser pretends a CRLF preceded it and
        # the empty body "+OK\r\n.\r\n" is the terminator like any other.
        self._virtual = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Received bytes not yet turned into events (excluding held body bytes)."""
        return len(self._buf)

    @property
    def in_body(self) -> bool:
        return self._in_body

    def next_event(self, expect: Expect | None) -> Event | None:
        """The next event, or None until more data (or an expectation) arrives.

        Raises POP3ProtocolError; the parser is then unusable.
        """
        if self._in_body:
            return self._body_event()
        if expect is None:
            if len(self._buf) > self._max_line:
                raise POP3ProtocolError("unsolicited data from the server")
            return None
        end = self._buf.find(b"\n")
        if end < 0:
            if len(self._buf) > self._max_line:
                raise POP3ProtocolError(f"response line longer than {self._max_line} octets")
            return None
        line = self._buf[:end]
        self._buf = self._buf[end + 1 :]
        if line.endswith(b"\r"):
            line = line[:-1]
        status = parse_status(line)
        if status is not None:
            if status.ok and expect is Expect.MULTI:
                self._in_body = True
                self._held = b"\r\n"
                self._virtual = 2
            return status
        if expect is Expect.SASL and (line == b"+" or line.startswith(b"+ ")):
            return Continuation(line[2:])
        raise POP3ProtocolError(f"not a POP3 response: {_printable(line[:80])!r}")

    def _body_event(self) -> BodyChunk | None:
        if not self._buf:
            return None
        data = self._held + self._buf if self._held else self._buf
        self._buf = b""
        at = data.find(TERMINATOR)
        if at >= 0:
            body = data[: at + 2]
            self._buf = data[at + len(TERMINATOR) :]
            self._held = b""
            self._in_body = False
            last = True
        elif len(data) > _HOLD:
            body = data[:-_HOLD]
            self._held = data[-_HOLD:]
            last = False
        else:
            self._held = data
            body = b""
            last = False
        if self._virtual:
            cut = min(self._virtual, len(body))
            body = body[cut:]
            self._virtual -= cut
        if not body and not last:
            return None
        return BodyChunk(body, last)


def _printable(text: bytes, limit: int = 200) -> str:
    """Upstream words made safe for one log line."""
    shown = text[:limit].decode("utf-8", "replace")
    shown = "".join(c if c.isprintable() else "?" for c in shown)
    return shown + ("..." if len(text) > limit else "")


# --- Capabilities -----------------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """The server's CAPA answer (RFC 2449); empty if it does not know CAPA."""

    names: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def parse(cls, body: bytes) -> Capabilities:
        names: dict[str, tuple[str, ...]] = {}
        for raw in body.split(b"\r\n"):
            words = raw.decode("ascii", "replace").split()
            if words:
                names[words[0].upper()] = tuple(words[1:])
        return cls(names)

    def __contains__(self, name: str) -> bool:
        return name.upper() in self.names

    @property
    def sasl(self) -> frozenset[str]:
        return frozenset(m.upper() for m in self.names.get("SASL", ()))


# --- Errors -------------------------------------------------------------------------


class ServerError(Exception):
    """The upstream answered a command with -ERR; callers map it by context."""

    def __init__(self, verb: str, status: Status) -> None:
        super().__init__(f"{verb}: {status.describe()}")
        self.verb = verb
        self.status = status


# --- The protocol -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listing:
    """A collected multi-line answer (CAPA, LIST, UIDL)."""

    status: Status
    body: bytes


@dataclass(eq=False)
class _Command:
    verb: str  # for messages only: never the arguments
    line: bytes | None  # None for the greeting, which is not asked for
    expect: Expect
    deferred: Deferred[Any]
    sink: IConsumer | None = None
    on_continuation: Callable[[bytes], None] | None = None
    # Runs synchronously at +OK, before any byte after it is parsed (STLS).
    on_ok: Callable[[], None] | None = None
    pipelinable: bool = False
    status: Status | None = None
    chunks: list[bytes] = field(default_factory=list)
    collected: int = 0


class POP3Client(UpstreamLifecycle, StreamingClient, Protocol):
    """One upstream POP3 connection; commands return Deferreds.

    Commands are queued and sent one at a time; `DELE`/`QUIT` go out together
    when the server announced PIPELINING. Every command has an idle timeout:
    it fails if the upstream sends nothing for `timeout` seconds while an
    answer is due (not while the sink holds the upstream paused).

    When the connection breaks, times out, or `abort()` is called, every
    pending and later command fails with `UpstreamLost` (after login) or
    `UpstreamUnavailable` (before), so no Deferred is left unfired.
    """

    def __init__(self, clock: IReactorTime, timeout: float, *, peer: str = "upstream") -> None:
        self._clock = clock
        self._timeout = timeout
        self.peer = peer
        self.capabilities = Capabilities()
        self.logged_in = False
        self._parser = ResponseParser()
        self._queue: deque[_Command] = deque()
        self._inflight: deque[_Command] = deque()
        self._processing = False
        self._ended: tuple[type[MaildropError], str] | None = None
        self._quitting = False
        self._connected = False
        self._lost = False
        self._closed_waiters: list[Deferred[None]] = []
        greeting = _Command("greeting", None, Expect.SINGLE, self._new_deferred())
        self._inflight.append(greeting)
        self._greeting = greeting.deferred

    # -- public API

    def greeting(self) -> Deferred[Status]:
        """Fires with the server's +OK greeting (once; later calls get nothing new)."""
        return self._greeting

    @property
    def ended(self) -> bool:
        return self._ended is not None

    def command(
        self, line: bytes, *, expect: Expect = Expect.SINGLE, pipelinable: bool = False
    ) -> Deferred[Any]:
        """Send one command; fires with `Status` or, for MULTI, a `Listing`.

        Fails with `ServerError` on -ERR and with a `MaildropError` if the
        connection ends first.
        """
        return self._enqueue(
            _Command(_verb(line), line, expect, self._new_deferred(), pipelinable=pipelinable)
        )

    def retrieve(self, line: bytes, sink: IConsumer) -> Deferred[Status]:
        """Send RETR/TOP and stream the body to `sink` in wire form, as received.

        Fires after the terminator, once the throttle is unregistered from the
        sink and the upstream reads again. Fails with `ServerError` on -ERR
        (nothing written) and with `UpstreamLost` if the connection ends
        mid-body (the held-back tail is never written).
        """
        cmd = _Command(_verb(line), line, Expect.MULTI, self._new_deferred(), sink=sink)
        return self._enqueue(cmd)

    async def read_capabilities(self) -> Capabilities:
        """CAPA; a server without CAPA (RFC 1939 only) has no capabilities."""
        try:
            listing = await self.command(b"CAPA", expect=Expect.MULTI)
        except ServerError:
            self.capabilities = Capabilities()
        else:
            self.capabilities = Capabilities.parse(listing.body)
        return self.capabilities

    def starttls(self, options: IOpenSSLClientConnectionCreator) -> Deferred[Status]:
        """STLS, then TLS on this connection (RFC 2595).

        TLS starts synchronously at the +OK: any byte that arrived with or
        after that answer in clear could only be injected by a man in the
        middle, so it ends the session instead of being read as a response.
        """

        def start() -> None:
            if self._parser.buffered:
                self._end(UpstreamUnavailable, f"{self.peer} sent data after the STLS answer")
                return
            self.capabilities = Capabilities()
            self.transport.startTLS(options)  # type: ignore[union-attr]

        cmd = _Command("STLS", b"STLS", Expect.SINGLE, self._new_deferred(), on_ok=start)
        return self._enqueue(cmd)

    def authenticate(self, mechanism: SASLMechanism) -> Deferred[Status]:
        """AUTH with a SASL mechanism (RFC 5034), answering its challenges."""
        name = mechanism.name.encode("ascii")
        line = b"AUTH " + name
        pending: list[bytes] = []
        initial = mechanism.initial_response()
        if initial is not None:
            encoded = base64.b64encode(initial) or b"="
            if len(line) + 1 + len(encoded) + 2 <= MAX_COMMAND:
                line += b" " + encoded
            else:
                pending.append(encoded)

        def answer(payload: bytes) -> None:
            if pending and payload.strip() == b"":
                self._send(pending.pop() + b"\r\n")
                return
            try:
                challenge = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                response = None
            else:
                response = mechanism.respond(challenge)
            self._send(b"*\r\n" if response is None else base64.b64encode(response) + b"\r\n")

        cmd = _Command("AUTH", line, Expect.SASL, self._new_deferred(), on_continuation=answer)
        return self._enqueue(cmd)

    async def user_pass(self, username: str, password: Secret) -> Status:
        """RFC 1939 USER/PASS; the password travels only inside the PASS line."""
        user = username.encode()
        secret = password.reveal().encode()
        if any(c in user for c in (b"\r", b"\n", b"\0")) or not user:
            raise ValueError("the user name cannot be sent with USER")
        if any(c in secret for c in (b"\r", b"\n", b"\0")):
            raise ValueError("the password cannot be sent with PASS")
        await self.command(b"USER " + user)
        return await self.command(b"PASS " + secret)

    def quit(self) -> Deferred[Status]:
        """QUIT; at +OK the connection is closed from our side too.

        Nothing can be queued after QUIT; with PIPELINING it follows the DELEs
        still in flight, so an answered QUIT means they were all answered.
        """

        def close() -> None:
            if self.transport is not None:
                self.transport.loseConnection()

        cmd = _Command("QUIT", b"QUIT", Expect.SINGLE, self._new_deferred(), pipelinable=True)
        cmd.on_ok = close
        d = self._enqueue(cmd)
        self._quitting = True
        return d

    def abort(self, detail: str = "aborted by the gateway") -> None:
        """Drop the connection now, without QUIT; fail whatever is pending. Idempotent."""
        self._end(UpstreamLost if self.logged_in else UpstreamUnavailable, detail)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        what = self._connection_gone(reason, quiet_close=not self._inflight and not self._queue)
        if self._ended is None:
            self._end(
                UpstreamLost if self.logged_in else UpstreamUnavailable,
                f"{what}{self._waiting_for()}",
                abort_transport=False,
            )
        self._notify_closed()

    # -- internals

    def _new_deferred(self) -> Deferred[Any]:
        # Cancelling any pending command abandons the whole session: the
        # server will still answer it, and nothing can be read after that.
        return Deferred(lambda d: self.abort("a pending command was cancelled"))

    def _enqueue(self, cmd: _Command) -> Deferred[Any]:
        if self._ended is not None:
            cls, detail = self._ended
            return fail(cls(detail))
        if self._quitting:
            return fail(UpstreamLost(f"the session with {self.peer} is ending (QUIT sent)"))
        self._queue.append(cmd)
        self._send_queued()
        return cmd.deferred

    def _send_queued(self) -> None:
        while self._queue and self._connected and self._ended is None:
            nxt = self._queue[0]
            if self._inflight and not (
                "PIPELINING" in self.capabilities
                and nxt.pipelinable
                and all(c.pipelinable for c in self._inflight)
            ):
                return
            self._queue.popleft()
            self._inflight.append(nxt)
            assert nxt.line is not None
            self._send(nxt.line + b"\r\n")
            self._arm_timer()
        if self._parser.buffered and self._inflight:
            # Bytes that came before this command was sent (after the end of
            # the previous answer) are read as its answer, as on the wire.
            self._process()

    def _send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while self._inflight and self._ended is None:
                head = self._inflight[0]
                try:
                    event = self._parser.next_event(head.expect)
                except POP3ProtocolError as e:
                    self._end(
                        UpstreamLost if self.logged_in else UpstreamUnavailable,
                        f"{self.peer}: {e}{self._waiting_for()}",
                    )
                    return
                if event is None:
                    return
                self._handle(head, event)
        finally:
            self._processing = False

    def _handle(self, cmd: _Command, event: Event) -> None:
        if isinstance(event, BodyChunk):
            if cmd.sink is not None:
                if event.data:
                    cmd.sink.write(event.data)
            else:
                cmd.chunks.append(event.data)
                cmd.collected += len(event.data)
                if cmd.collected > MAX_LISTING:
                    self._end(
                        UpstreamLost if self.logged_in else UpstreamUnavailable,
                        f"{self.peer}: {cmd.verb} answer larger than {MAX_LISTING} octets",
                    )
                    return
            if event.last:
                assert cmd.status is not None
                if cmd.sink is not None:
                    self._stop_stream(resume=True)
                    self._complete(cmd, cmd.status)
                else:
                    self._complete(cmd, Listing(cmd.status, b"".join(cmd.chunks)))
        elif isinstance(event, Status):
            if event.ok and cmd.expect is Expect.MULTI:
                cmd.status = event
                if cmd.sink is not None:
                    self._start_stream(cmd.sink)
                return
            if event.ok and cmd.on_ok is not None:
                cmd.on_ok()
                if self._ended is not None:
                    return
            self._complete(cmd, event if event.ok else ServerError(cmd.verb, event))
        else:
            assert cmd.on_continuation is not None
            cmd.on_continuation(event.payload)

    def _complete(self, cmd: _Command, result: object) -> None:
        if self._inflight and self._inflight[0] is cmd:
            self._inflight.popleft()
        self._send_queued()
        self._arm_timer()
        if isinstance(result, Exception):
            cmd.deferred.errback(Failure(result))
        else:
            cmd.deferred.callback(result)

    def _end(self, cls: type[MaildropError], detail: str, *, abort_transport: bool = True) -> None:
        """End the session once: fail everything pending, drop the connection."""
        if self._ended is not None:
            if abort_transport and self._connected and self.transport is not None:
                self.transport.abortConnection()
            return
        self._ended = (cls, detail)
        self._cancel_timer()
        self._stop_stream(resume=False)
        pending = list(self._inflight) + list(self._queue)
        self._inflight.clear()
        self._queue.clear()
        if abort_transport and self._connected and self.transport is not None:
            self.transport.abortConnection()
        for cmd in pending:
            if not cmd.deferred.called:
                cmd.deferred.errback(Failure(cls(detail)))

    def _waiting_for(self) -> str:
        if self._inflight:
            head = self._inflight[0]
            if self._parser.in_body:
                return f" in the middle of the {head.verb} answer"
            return f" while waiting for the {head.verb} answer"
        return ""

    # -- idle timeout (StreamingClient hooks)

    def _answer_due(self) -> bool:
        return self._ended is None and bool(self._inflight)

    def _idle_expired(self, limit: float) -> None:
        self._end(
            UpstreamLost if self.logged_in else UpstreamUnavailable,
            f"{self.peer} sent nothing for {limit:g} s{self._waiting_for()}",
        )


def _verb(line: bytes) -> str:
    return line.split(b" ", 1)[0].decode("ascii", "replace").upper()


# --- Session set-up --------------------------------------------------------------------


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
    client, tls = await open_connection(
        provider,
        server,
        POP3Client,
        reactor=reactor,
        endpoint_factory=endpoint_factory,
        error=UpstreamUnavailable,
        passthrough=MaildropError,
    )
    peer = client.peer
    try:
        try:
            await client.greeting()
        except ServerError as e:
            raise UpstreamUnavailable(f"{peer} greeted with {e.status.describe()}") from None
        await client.read_capabilities()
        if server.tls == "starttls":
            if "STLS" not in client.capabilities:
                raise UpstreamUnavailable(f"{peer} does not offer STLS; not logging in in clear")
            try:
                await client.starttls(tls)
            except ServerError as e:
                raise UpstreamUnavailable(f"{peer} refused STLS: {e.status.describe()}") from None
            # RFC 2595 section 4: forget what was learnt in clear.
            await client.read_capabilities()
    except BaseException:
        client.abort("connection set-up failed")
        raise
    return client


def login_refused(error: ServerError, peer: str) -> MaildropError:
    """Map a refused USER/PASS/AUTH to what the device should be told."""
    code = error.status.code or ""
    detail = f"{peer} refused the login ({error.verb}): {error.status.describe()}"
    if code == "IN-USE":
        return MailboxInUse(detail)
    if code.startswith("SYS/TEMP") or code == "LOGIN-DELAY":
        return UpstreamUnavailable(detail)
    return UpstreamRejected(detail)


def login_method(provider: Provider, capabilities: Capabilities) -> str:
    """ "plain" (AUTH PLAIN) or "user" (USER/PASS) for this provider and server."""
    if provider.pop3_auth == "auto":
        return "plain" if "PLAIN" in capabilities.sasl else "user"
    return provider.pop3_auth


async def login(
    client: POP3Client,
    account: Account,
    provider: Provider,
    *,
    tokens: TokenSource | None = None,
) -> None:
    """Log in as the account; raise the MaildropError the device should see.

    A refused AUTH PLAIN does not fall back to USER/PASS: a wrong password
    would count twice against the upstream's failed-login penalty. OAuth2
    accounts log in with a bearer token from `tokens` (`bearer_login`).
    """
    if account.auth == "oauth2":
        await bearer_login(
            client, account, provider, tokens, server_error=ServerError, refusal=login_refused
        )
        client.logged_in = True
        return
    if account.password is None:
        raise UpstreamRejected(f"account {account.name} has no password configured")
    method = login_method(provider, client.capabilities)
    try:
        if method == "plain":
            try:
                mechanism: SASLMechanism = Plain(account.username, account.password)
            except ValueError as e:
                raise UpstreamRejected(f"account {account.name}: {e}") from None
            await client.authenticate(mechanism)
        else:
            try:
                await client.user_pass(account.username, account.password)
            except ValueError as e:
                raise UpstreamRejected(f"account {account.name}: {e}") from None
    except ServerError as e:
        raise login_refused(e, client.peer) from None
    client.logged_in = True


async def open_session(
    account: Account,
    provider: Provider,
    *,
    reactor: Any,
    endpoint_factory: EndpointFactory = hostname_endpoint,
    tokens: TokenSource | None = None,
) -> POP3Client:
    """Connect and log in as `account`; the client is in the TRANSACTION state."""
    client = await connect(provider, reactor=reactor, endpoint_factory=endpoint_factory)
    try:
        await login(client, account, provider, tokens=tokens)
    except BaseException:
        client.abort("login failed")
        raise
    return client
