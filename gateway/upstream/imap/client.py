"""Our own IMAP4rev1 client for upstream folders: the Twisted protocol.

Twisted's `IMAP4Client` is not used: it buffers every literal whole (a 50 MB
message costs hundreds of MB), base64-encodes SASL responses with embedded
newlines (so OAuth tokens fail), fetches with `RFC822` (which sets `\\Seen`)
and may fall back to unverified STARTTLS.

`IMAPClient` sends tagged commands (pipelined where the caller allows it),
routes untagged responses to the command they answer and streams body
literals to a `BodyReceiver`. The command queue, the idle timeout and
back-pressure are the shared `Pipeline` it holds; the parser and the command
writers are pure modules next to it, the session set-up is `session`.

Upstream texts only ever reach `detail` (for the log). No command line is ever
echoed into a message or log: LOGIN and AUTHENTICATE carry secrets.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IConsumer, IOpenSSLClientConnectionCreator, IReactorTime
from twisted.python.failure import Failure

from gateway.model import Secret
from gateway.upstream.errors import UpstreamLost, printable
from gateway.upstream.imap.commands import Argument, Literal, astring, wire_pieces
from gateway.upstream.imap.parser import (
    Continuation,
    Event,
    IMAPProtocolError,
    LiteralData,
    LiteralStart,
    Response,
    ResponseParser,
)
from gateway.upstream.imap.responses import Capabilities, ServerError, Status, parse_status
from gateway.upstream.pipeline import Command, Pipeline, PipelinedClient
from gateway.upstream.sasl import SASLMechanism

# Untagged responses a command collects (when it has no callback of its own).
MAX_COLLECTED = 8 * 1024 * 1024
# IDLE waits this long for anything before the connection counts as dead;
# RFC 2177 servers may drop an IDLE after 30 minutes, so it is renewed sooner.
IDLE_SILENCE = 31 * 60.0
# Untagged responses that say the folder changed (RFC 3501 7.3, 7.4; RFC 7162 VANISHED).
_CHANGE_WORDS = frozenset({b"EXISTS", b"EXPUNGE", b"VANISHED"})


@dataclass(frozen=True, slots=True)
class Tagged:
    """A completed command: its tagged OK and the untagged responses it collected."""

    status: Status
    untagged: tuple[Response, ...]


class BodyReceiver(TypingProtocol):
    """Takes the body literals of one streaming command (RETR, TOP)."""

    @property
    def consumer(self) -> IConsumer:
        """Where the data ends up: a producer is registered here while it streams."""
        ...

    def body_start(self, line: bytes, size: int) -> None:
        """A literal starts; `line` is the text announcing it. Raise to refuse it."""
        ...

    def body_data(self, data: bytes) -> None: ...

    def body_end(self) -> None: ...


@dataclass(eq=False)
class _Command(Command):
    tag: bytes | None = None
    on_untagged: Callable[[Response], None] | None = None
    receiver: BodyReceiver | None = None
    # SASL: the decoded answer to each challenge, None to cancel.
    on_challenge: Callable[[bytes], bytes | None] | None = None
    untagged: list[Response] = field(default_factory=list)
    collected: int = 0
    # IDLE: the server said "+ idling"; DONE is due (sent at once if idling).
    idling: bool = False
    done_due: bool = False


class IMAPClient(PipelinedClient[_Command]):
    """One upstream IMAP connection; commands return Deferreds.

    Commands are sent one at a time, except that a `pipelinable` command
    goes out while only pipelinable ones are in flight. Every command has an
    idle timeout: it fails if the upstream sends nothing for `timeout` seconds
    while an answer is due (not while the consumer holds the upstream paused).

    When the connection breaks, times out, or `abort()` is called, every
    pending and later command fails with `UpstreamLost` (after login) or
    `UpstreamUnavailable` (before), so no Deferred is left unfired.
    """

    _parser: ResponseParser

    def __init__(self, clock: IReactorTime, timeout: float, *, peer: str = "upstream") -> None:
        self.peer = peer
        self.capabilities = Capabilities()
        # True when the server has not said what it offers since login.
        self.capabilities_stale = False
        self._parser = ResponseParser()
        self._next_tag = 1
        self._bye: Status | None = None
        # How many change notices (EXISTS, EXPUNGE, VANISHED, flag updates)
        # arrived outside SELECT/EXAMINE: a kept connection compares it with
        # the value at its last snapshot (`gateway.maildrop.imap_keeper`).
        self.changes = 0
        self._idle: _Command | None = None
        self._pipe: Pipeline[_Command] = Pipeline(
            clock,
            timeout,
            peer=peer,
            error=self._error_type,
            closing_error=UpstreamLost,
            mid_answer=lambda: self._parser.in_literal,
            process=self._process,
        )
        self._greeting = self._pipe.expect(_Command("greeting", self._pipe.new_deferred()))

    # -- public API

    def greeting(self) -> Deferred[Status]:
        """Fires with the server's untagged OK greeting."""
        return self._greeting

    def command(
        self,
        verb: bytes,
        *args: Argument,
        pipelinable: bool = False,
        on_untagged: Callable[[Response], None] | None = None,
        receiver: BodyReceiver | None = None,
    ) -> Deferred[Tagged]:
        """Send one command; fires with `Tagged` on OK.

        Untagged responses that arrive while this command is at the head go
        to `on_untagged`, or are collected in `Tagged.untagged`. Body
        literals stream to `receiver`. Fails with `ServerError` on NO/BAD and
        with a `MaildropError` if the connection ends first.
        """
        cmd = _Command(
            verb.decode("ascii").upper(),
            self._pipe.new_deferred(),
            pipelinable=pipelinable and not any(isinstance(a, Literal) for a in args),
            on_untagged=on_untagged,
            receiver=receiver,
        )
        return self._enqueue(cmd, verb, args)

    async def capability(self) -> Capabilities:
        """CAPABILITY; the answer replaces what was known."""
        await self.command(b"CAPABILITY")
        return self.capabilities

    def starttls(self, options: IOpenSSLClientConnectionCreator) -> Deferred[Tagged]:
        """STARTTLS, then TLS on this connection (RFC 3501 6.2.1).

        TLS starts synchronously at the OK: any byte that arrived with or
        after that answer in clear could only be injected by a man in the
        middle, so it ends the session instead of being read as a response.
        """

        def start() -> None:
            if self._parser.buffered:
                self._pipe.end(f"{self.peer} sent data after the STARTTLS answer")
                return
            self.capabilities = Capabilities()
            self.transport.startTLS(options)  # type: ignore[union-attr]

        cmd = _Command("STARTTLS", self._pipe.new_deferred(), on_ok=start)
        return self._enqueue(cmd, b"STARTTLS", ())

    def authenticate(self, mechanism: SASLMechanism) -> Deferred[Tagged]:
        """AUTHENTICATE with a SASL mechanism, answering its challenges.

        The initial response rides on the command with SASL-IR (RFC 4959),
        else it answers the server's first, empty challenge. Responses are
        base64 without line breaks, whatever their length.
        """
        args: list[Argument] = [mechanism.name.encode("ascii")]
        pending: list[bytes] = []
        initial = mechanism.initial_response()
        if initial is not None:
            if "SASL-IR" in self.capabilities:
                args.append(base64.b64encode(initial) or b"=")
            else:
                pending.append(initial)

        def answer(challenge: bytes) -> bytes | None:
            if pending and challenge == b"":
                return pending.pop()
            pending.clear()
            return mechanism.respond(challenge)

        cmd = _Command("AUTHENTICATE", self._pipe.new_deferred(), on_challenge=answer)
        return self._enqueue(cmd, b"AUTHENTICATE", args)

    def login(self, username: str, password: Secret) -> Deferred[Tagged]:
        """LOGIN (RFC 3501 6.2.3); the password travels only in this command."""
        try:
            args = [astring(username.encode()), astring(password.reveal().encode())]
        except ValueError:
            return fail(ValueError("the user name or password cannot be sent with LOGIN"))
        return self.command(b"LOGIN", *args)

    def logout(self) -> Deferred[Tagged]:
        """LOGOUT; the server's BYE and the close that follow are expected.

        Nothing can be queued after it. LOGOUT never expunges (CLOSE would).
        """

        def close() -> None:
            if self.transport is not None:
                self.transport.loseConnection()

        cmd = _Command(
            "LOGOUT",
            self._pipe.new_deferred(),
            pipelinable=True,
            on_ok=close,
            ends_session=True,
            answered_by_close=True,
        )
        return self._enqueue(cmd, b"LOGOUT", ())

    def idle(self, on_untagged: Callable[[Response], None] | None = None) -> Deferred[Tagged]:
        """IDLE (RFC 2177) until `done()`; fires with its tagged OK after DONE.

        Untagged responses meanwhile go to `on_untagged`. No command may be
        queued behind it except after `done()`, which lets a pipelinable one
        follow DONE in the same round trip.
        """
        cmd = _Command(
            "IDLE", self._pipe.new_deferred(), on_untagged=on_untagged, timeout=IDLE_SILENCE
        )
        self._idle = cmd
        return self._enqueue(cmd, b"IDLE", ())

    def done(self) -> None:
        """End an IDLE: DONE now if the server is idling, else as soon as it says so."""
        cmd = self._idle
        if cmd is None:
            return
        cmd.done_due = True
        if cmd.idling:
            self._send_done(cmd)

    def _send_done(self, cmd: _Command) -> None:
        self._idle = None
        self._pipe.write(b"DONE\r\n")
        # The tagged OK is due now, within the ordinary timeout; what waits
        # behind IDLE may go out right after DONE.
        cmd.timeout = None
        cmd.pipelinable = True
        self._pipe.cancel_timer()
        self._pipe.send_queued()

    @property
    def busy(self) -> bool:
        """Whether a command is pending: the connection is not at rest between commands."""
        return bool(self._pipe.inflight or self._pipe.queue)

    def _describe_loss(self, reason: Failure) -> str:
        if self._bye is not None and not reason.check(SSL.Error, VerificationError):
            return f"{self.peer} said {self._bye.describe()} and closed the connection"
        return super()._describe_loss(reason)

    # -- internals

    def _enqueue(self, cmd: _Command, verb: bytes, args: Sequence[Argument]) -> Deferred[Any]:
        if not self._pipe.ended and not self._pipe.closing:
            cmd.tag = b"g%d" % self._next_tag
            self._next_tag += 1
            cmd.pieces = wire_pieces(cmd.tag, verb, args, self.capabilities)
        return self._pipe.enqueue(cmd)

    def _process(self) -> None:
        pipe = self._pipe
        while not pipe.ended:
            head = pipe.head
            stream = head is not None and head.receiver is not None
            try:
                event = self._parser.next_event(stream)
                if event is None:
                    return
                self._handle(event)
            except IMAPProtocolError as e:
                pipe.fail_protocol(e)
                return

    def _handle(self, event: Event) -> None:
        head = self._pipe.head
        if isinstance(event, LiteralData):
            assert head is not None and head.receiver is not None
            if event.data:
                head.receiver.body_data(event.data)
            if event.last:
                head.receiver.body_end()
                self._pipe.stop_stream(resume=True)
        elif isinstance(event, LiteralStart):
            assert head is not None and head.receiver is not None
            self._pipe.start_stream(head.receiver.consumer)
            head.receiver.body_start(event.line, event.size)
        elif isinstance(event, Continuation):
            self._continue(head, event)
        elif head is not None and head.verb == "greeting":
            self._greeted(head, event)
        elif event.tag is None:
            self._untagged(head, event)
        else:
            self._tagged(event)

    def _greeted(self, head: _Command, response: Response) -> None:
        status = parse_status(response)
        if status is None or response.tag is not None or status.condition not in ("OK", "BYE"):
            raise IMAPProtocolError(f"not an IMAP greeting: {printable(response.first_line)!r}")
        if status.code == "CAPABILITY":
            self.capabilities = Capabilities.parse(status.code_data)
        if status.condition == "OK":
            self._pipe.finish(head, status, positive=True)
        else:
            self._bye = status
            self._pipe.finish(head, ServerError("greeting", status), positive=False)

    def _continue(self, head: _Command | None, event: Continuation) -> None:
        if head is None or head.tag is None:
            raise IMAPProtocolError("continuation request while no command waits for one")
        if head.pieces:
            self._pipe.write(head.pieces.pop(0))
            return
        if head.verb == "IDLE" and not head.idling:
            head.idling = True
            if head.done_due:
                self._send_done(head)
            return
        if head.on_challenge is None:
            raise IMAPProtocolError(f"unexpected continuation request during {head.verb}")
        try:
            challenge = base64.b64decode(event.text, validate=True)
        except (binascii.Error, ValueError):
            response = None
        else:
            response = head.on_challenge(challenge)
        self._pipe.write(b"*\r\n" if response is None else base64.b64encode(response) + b"\r\n")

    def _untagged(self, head: _Command | None, response: Response) -> None:
        words = response.words(1)
        kind = words[0] if words else b""
        if kind == b"BYE":
            self._bye = parse_status(response)
            return
        self._note_change(head, response)
        if kind == b"CAPABILITY":
            parts = response.first_line.split(b" ", 2)
            self.capabilities = Capabilities.parse(parts[2] if len(parts) > 2 else b"")
        elif kind == b"OK":
            status = parse_status(response)
            if status is not None and status.code == "CAPABILITY":
                self.capabilities = Capabilities.parse(status.code_data)
        if head is None or head.tag is None:
            return  # unsolicited (EXISTS, EXPUNGE, FETCH FLAGS): nothing here needs it
        if head.on_untagged is not None:
            head.on_untagged(response)
            return
        head.collected += sum(map(len, response.segments)) + sum(
            len(x) for x in response.literals if isinstance(x, bytes)
        )
        if head.collected > MAX_COLLECTED:
            raise IMAPProtocolError(f"{head.verb} answer larger than {MAX_COLLECTED} octets")
        head.untagged.append(response)

    def _note_change(self, head: _Command | None, response: Response) -> None:
        """Count what says the folder changed; SELECT/EXAMINE's own answer does not.

        A FETCH counts when it is a flag update (FLAGS without the size, date
        or body a command asked for): `* 3 FETCH (FLAGS (...))` after another
        client set `$POP3Deleted`, say.
        """
        words = response.words(2)
        if len(words) < 2:
            return
        if words[1] in _CHANGE_WORDS or words[0] == b"VANISHED":
            if head is None or head.verb not in ("SELECT", "EXAMINE"):
                self.changes += 1
        elif words[1] == b"FETCH" and not response.literals:
            line = response.first_line.upper()
            if b"FLAGS" in line and b"RFC822.SIZE" not in line and b"INTERNALDATE" not in line:
                self.changes += 1

    def _tagged(self, response: Response) -> None:
        cmd = next((c for c in self._pipe.inflight if c.tag == response.tag), None)
        if cmd is None:
            raise IMAPProtocolError(
                f"tagged response for an unknown tag {printable(response.tag or b'')!r}"
            )
        status = parse_status(response)
        if status is None:
            raise IMAPProtocolError(f"malformed tagged response to {cmd.verb}")
        if status.code == "CAPABILITY":
            self.capabilities = Capabilities.parse(status.code_data)
        if status.ok:
            self._pipe.finish(cmd, Tagged(status, tuple(cmd.untagged)), positive=True)
        else:
            self._pipe.finish(cmd, ServerError(cmd.verb, status), positive=False)
