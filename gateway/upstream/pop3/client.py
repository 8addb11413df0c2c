"""Our own POP3 client for upstream mailboxes: the Twisted protocol.

Twisted's `AdvancedPOP3Client` is not used: it starts STLS unverified, has no
SASL, no back-pressure and a line limit.

`POP3Client` turns the parser's events (`gateway.upstream.pop3.parser`) into
answers to commands; the command queue, the idle timeout and back-pressure
are the shared `Pipeline` it holds. Session set-up (TLS, CAPA, login) is in
`gateway.upstream.pop3.session`.

Failures mean what the maildrop contract says: before login a broken
connection is `UpstreamUnavailable` (try again later), after it `UpstreamLost`.
Upstream texts only ever reach `detail` (for the log), never the device, and
no command line is ever echoed into a message, because PASS and AUTH carry the
account's secret.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IOpenSSLClientConnectionCreator, IReactorTime

from gateway.model import Secret
from gateway.upstream.errors import UpstreamLost
from gateway.upstream.pipeline import Command, Pipeline, PipelinedClient, verb_of
from gateway.upstream.pop3.parser import (
    BodyChunk,
    Capabilities,
    Event,
    Expect,
    POP3ProtocolError,
    ResponseParser,
    ServerError,
    Status,
)
from gateway.upstream.sasl import SASLMechanism

# LIST/UIDL/CAPA bodies are collected in memory; a mailbox of a million
# messages lists in ~20 MB. Anything larger is an upstream gone wrong.
MAX_LISTING = 64 * 1024 * 1024
# RFC 2449 section 4: a command line, CRLF included, is at most 255 octets.
# RFC 5034 section 4: an AUTH initial response that would overflow it is sent
# after an empty challenge instead.
MAX_COMMAND = 255


@dataclass(frozen=True, slots=True)
class Listing:
    """A collected multi-line answer (CAPA, LIST, UIDL)."""

    status: Status
    body: bytes


@dataclass(eq=False)
class _Command(Command):
    expect: Expect = Expect.SINGLE
    sink: IConsumer | None = None
    on_continuation: Callable[[bytes], None] | None = None
    status: Status | None = None
    chunks: list[bytes] = field(default_factory=list)
    collected: int = 0


class POP3Client(PipelinedClient[_Command]):
    """One upstream POP3 connection; commands return Deferreds.

    Commands are queued and sent one at a time; `DELE`/`QUIT` go out together
    when the server announced PIPELINING. Every command has an idle timeout:
    it fails if the upstream sends nothing for `timeout` seconds while an
    answer is due (not while the sink holds the upstream paused).

    When the connection breaks, times out, or `abort()` is called, every
    pending and later command fails with `UpstreamLost` (after login) or
    `UpstreamUnavailable` (before), so no Deferred is left unfired.
    """

    _parser: ResponseParser

    def __init__(self, clock: IReactorTime, timeout: float, *, peer: str = "upstream") -> None:
        self.peer = peer
        self.capabilities = Capabilities()
        self._parser = ResponseParser()
        self._pipe: Pipeline[_Command] = Pipeline(
            clock,
            timeout,
            peer=peer,
            error=self._error_type,
            closing_error=UpstreamLost,
            mid_answer=lambda: self._parser.in_body,
            can_pipeline=lambda: "PIPELINING" in self.capabilities,
            read_ahead=lambda: self._parser.buffered > 0,
            process=self._process,
        )
        self._greeting = self._pipe.expect(_Command("greeting", self._pipe.new_deferred()))

    # -- public API

    def greeting(self) -> Deferred[Status]:
        """Fires with the server's +OK greeting (once; later calls get nothing new)."""
        return self._greeting

    def command(
        self, line: bytes, *, expect: Expect = Expect.SINGLE, pipelinable: bool = False
    ) -> Deferred[Any]:
        """Send one command; fires with `Status` or, for MULTI, a `Listing`.

        Fails with `ServerError` on -ERR and with an `UpstreamError` if the
        connection ends first.
        """
        return self._enqueue(line, expect=expect, pipelinable=pipelinable)

    def retrieve(self, line: bytes, sink: IConsumer) -> Deferred[Status]:
        """Send RETR/TOP and stream the body to `sink` in wire form, as received.

        Fires after the terminator, once the throttle is unregistered from the
        sink and the upstream reads again. Fails with `ServerError` on -ERR
        (nothing written) and with `UpstreamLost` if the connection ends
        mid-body (the held-back tail is never written).
        """
        return self._enqueue(line, expect=Expect.MULTI, sink=sink)

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
                self._pipe.end(f"{self.peer} sent data after the STLS answer")
                return
            self.capabilities = Capabilities()
            self.transport.startTLS(options)  # type: ignore[union-attr]

        return self._enqueue(b"STLS", on_ok=start)

    def authenticate(
        self, mechanism: SASLMechanism, *, pipelinable: bool = False
    ) -> Deferred[Status]:
        """AUTH with a SASL mechanism (RFC 5034), answering its challenges.

        `pipelinable`: commands queued next may go out with it (PIPELINING),
        for a mechanism done in one line (its initial response); a challenge
        then ends the session, as the server has read the next line as its answer.
        """
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
            if pipelinable:
                self._pipe.end(f"{self.peer} sent a challenge to a pipelined AUTH")
                return
            if pending and payload.strip() == b"":
                self._pipe.write(pending.pop() + b"\r\n")
                return
            try:
                challenge = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                response = None
            else:
                response = mechanism.respond(challenge)
            self._pipe.write(b"*\r\n" if response is None else base64.b64encode(response) + b"\r\n")

        pipelinable = pipelinable and not pending
        return self._enqueue(
            line, expect=Expect.SASL, on_continuation=answer, pipelinable=pipelinable
        )

    async def user_pass(self, username: str, password: Secret) -> Status:
        """RFC 1939 USER/PASS; the password travels only inside the PASS line."""
        user = username.encode()
        secret = password.reveal().encode()
        if any(c in user for c in (b"\r", b"\n", b"\0")) or not user:
            raise ValueError("the user name cannot be sent with USER")
        if any(c in secret for c in (b"\r", b"\n", b"\0")):
            raise ValueError("the password cannot be sent with PASS")
        await self.command(b"USER " + user)
        status: Status = await self.command(b"PASS " + secret)
        return status

    def quit(self) -> Deferred[Status]:
        """QUIT; at +OK the connection is closed from our side too.

        Nothing can be queued after QUIT; with PIPELINING it follows the DELEs
        still in flight, so an answered QUIT means they were all answered.
        """

        def close() -> None:
            if self.transport is not None:
                self.transport.loseConnection()

        return self._enqueue(b"QUIT", pipelinable=True, on_ok=close, ends_session=True)

    # -- internals

    def _enqueue(self, line: bytes, **options: Any) -> Deferred[Any]:
        cmd = _Command(verb_of(line), self._pipe.new_deferred(), [line + b"\r\n"], **options)
        return self._pipe.enqueue(cmd)

    def _process(self) -> None:
        pipe = self._pipe
        while pipe.inflight and not pipe.ended:
            head = pipe.inflight[0]
            try:
                event = self._parser.next_event(head.expect)
            except POP3ProtocolError as e:
                pipe.fail_protocol(e)
                return
            if event is None:
                return
            self._handle(head, event)

    def _handle(self, cmd: _Command, event: Event) -> None:
        pipe = self._pipe
        if isinstance(event, BodyChunk):
            if cmd.sink is not None:
                if event.data:
                    cmd.sink.write(event.data)
            else:
                cmd.chunks.append(event.data)
                cmd.collected += len(event.data)
                if cmd.collected > MAX_LISTING:
                    pipe.end(f"{self.peer}: {cmd.verb} answer larger than {MAX_LISTING} octets")
                    return
            if event.last:
                assert cmd.status is not None
                if cmd.sink is not None:
                    pipe.stop_stream(resume=True)
                    pipe.finish(cmd, cmd.status, positive=False)
                else:
                    pipe.finish(cmd, Listing(cmd.status, b"".join(cmd.chunks)), positive=False)
        elif isinstance(event, Status):
            if event.ok and cmd.expect is Expect.MULTI:
                cmd.status = event
                if cmd.sink is not None:
                    pipe.start_stream(cmd.sink)
                return
            pipe.finish(cmd, event if event.ok else ServerError(cmd.verb, event), positive=event.ok)
        else:
            assert cmd.on_continuation is not None
            cmd.on_continuation(event.payload)
