"""Our own SMTP submission client for relaying to the provider: the Twisted protocol.

Twisted's `ESMTPSender` is not used: it dot-stuffs per 16 KiB chunk (a "."
line at a chunk boundary truncated the message and the rest ran as commands),
leaves its Deferred unfired after a failed TLS handshake, and does not insist
on TLS.

`SMTPClient` answers commands in order, pipelined when the server offers
PIPELINING (RFC 2920), and streams message content from a file through the
shared `DotStuffer` (the rule that holds at every byte offset) under the
transport's back-pressure. The command queue and the idle timeout are the
shared `Pipeline` it holds; replies are parsed by the pure `parser`; the
session set-up and the transaction are `session`.

Failures of the connection are `SMTPUpstreamError` (the relay retries them);
what the server says about a message comes back as `Reply` objects for the
relay to judge. No command carrying a secret is ever logged or put into an
error text.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from gateway.dotstuff import DotStuffer
from gateway.upstream.errors import describe_error
from gateway.upstream.pipeline import Command, Pipeline, PipelinedClient, verb_of
from gateway.upstream.sasl import SASLMechanism
from gateway.upstream.smtp.parser import Reply, ReplyParser, SMTPProtocolError

# RFC 5321 4.5.3.2.6: wait up to 10 minutes for the reply to the final ".".
DATA_END_TIMEOUT = 600.0
# Read this much of the spool file per write; the transport's back-pressure
# decides how fast.
CHUNK_SIZE = 256 * 1024


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


@dataclass(eq=False)
class _Command(Command):
    # Answers 334 continuations (AUTH); the command stays in flight.
    on_continuation: Callable[[Reply], None] | None = None


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


class SMTPClient(PipelinedClient[_Command]):
    """One upstream SMTP connection; every command returns a Deferred[Reply].

    When the connection breaks, times out, or `abort()` is called, every
    pending and later command fails with `SMTPUpstreamError`, so no Deferred
    is ever left unfired.
    """

    _parser: ReplyParser

    # Any end of the connection says how it ended: a relay session is never idle by design.
    _quiet_close_when_idle = False

    def __init__(self, clock: IReactorTime, timeout: float, *, peer: str = "upstream") -> None:
        self.peer = peer
        self.extensions: dict[str, str] = {}
        self._parser = ReplyParser()
        self._pipe: Pipeline[_Command] = Pipeline(
            clock,
            timeout,
            peer=peer,
            error=lambda: SMTPUpstreamError,
            closing_error=SMTPUpstreamError,
            mid_answer=lambda: False,
            can_pipeline=lambda: self.pipelining,
            process=self._process,
        )
        self._greeting = self._pipe.expect(_Command("greeting", self._pipe.new_deferred()))

    # -- public API

    def greeting(self) -> Deferred[Reply]:
        return self._greeting

    @property
    def ended(self) -> bool:
        """No more commands can be sent (failed, aborted, or QUIT sent)."""
        return self._pipe.ended or self._pipe.closing

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
        return self._enqueue(line, pipelinable=pipelined, timeout=timeout)

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
                self._pipe.end(f"{self.peer} sent data after its STARTTLS answer")
                return
            self.extensions = {}
            self.transport.startTLS(options)  # type: ignore[union-attr]

        return self._enqueue(b"STARTTLS", on_ok=start)

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
            self._pipe.write(b"*\r\n" if response is None else base64.b64encode(response) + b"\r\n")

        return self._enqueue(line, on_continuation=answer)

    def send_content(self, source: BinaryIO, size: int) -> Deferred[Reply]:
        """After `354`: the message, dot-stuffed, then ".", and the final reply."""
        pipe = self._pipe
        pending = _Command("DATA content", pipe.new_deferred(), timeout=DATA_END_TIMEOUT)
        stuffer = DotStuffer()
        if size <= CHUNK_SIZE:
            # Most messages: one write, one TLS record run, no producer round trips.
            data = _Bounded(source, size).read()
            return pipe.send_now(pending, stuffer.feed(data) + stuffer.close() + b".\r\n")
        d = pipe.send_now(pending, b"")
        if pipe.ended:
            return d

        def transform(chunk: bytes) -> bytes:
            pipe.note_activity()
            return stuffer.feed(chunk)

        sender = FileSender()
        sender.CHUNK_SIZE = CHUNK_SIZE
        sent = sender.beginFileTransfer(_Bounded(source, size), self.transport, transform)

        def finished(_: object) -> None:
            if not pipe.ended:
                pipe.write(stuffer.close() + b".\r\n")
                pipe.arm_timer()

        def failed(reason: Failure) -> None:
            pipe.end(f"sending the message to {self.peer} failed: {describe_error(reason.value)}")

        sent.addCallbacks(finished, failed)
        return d

    def quit(self) -> Deferred[Reply]:
        def close() -> None:
            if self.transport is not None:
                self.transport.loseConnection()

        return self._enqueue(b"QUIT", on_ok=close, ends_session=True)

    # -- internals

    def _enqueue(self, line: bytes, **options: Any) -> Deferred[Reply]:
        cmd = _Command(verb_of(line), self._pipe.new_deferred(), [line + b"\r\n"], **options)
        return self._pipe.enqueue(cmd)

    def _process(self) -> None:
        pipe = self._pipe
        while pipe.inflight and not pipe.ended:
            try:
                reply = self._parser.next_reply()
            except SMTPProtocolError as e:
                pipe.fail_protocol(e)
                return
            if reply is None:
                return
            head = pipe.inflight[0]
            if reply.code == 334 and head.on_continuation is not None:
                head.on_continuation(reply)
                continue
            pipe.finish(head, reply, positive=reply.positive)
        if not pipe.inflight and self._parser.buffered and not pipe.ended:
            pipe.end(f"{self.peer} sent data nobody asked for")
