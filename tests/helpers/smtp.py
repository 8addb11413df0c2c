"""In-memory upstream SMTP server and wiring for relay and client unit tests.

`FakeUpstream` is a scripted submission server (it parses with the gateway's
own `SMTPInput`, which has its own tests); `Upstream` connects real
`SMTPClient`s to it through `twisted.internet.testing` iosim pumps, and
`settle()` moves bytes and zero-delay timers until nothing is left to do.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim

from gateway.model import Account, Provider
from gateway.smtp.parser import Line, SMTPInput
from gateway.upstream.smtp import SMTPClient, SMTPUpstreamError, login


@dataclass
class Arrived:
    mail_from: bytes
    recipients: list[bytes]
    content: bytes


@dataclass
class Script:
    """How the fake upstream behaves; tests change it between steps."""

    down: bool = False
    extensions: tuple[str, ...] = ("PIPELINING", "SIZE 50000000", "8BITMIME", "AUTH PLAIN LOGIN")
    password: bytes = b"account-pw"
    # Bearer tokens the server accepts (XOAUTH2).
    tokens: tuple[str, ...] = ()
    mail_reply: bytes = b"250 2.1.0 ok"
    rcpt_replies: dict[bytes, bytes] = field(default_factory=dict)
    data_reply: bytes = b"250 2.0.0 queued"
    # Drop the connection when this many content bytes have arrived.
    drop_after_content: int | None = None
    # Scripted final answers to AUTH, one per attempt (a provider's refusal
    # texts, lines joined with CRLF); when empty, AUTH checks as above.
    auth_replies: list[bytes] = field(default_factory=list)


class FakeUpstream(Protocol):
    def __init__(self, upstream: Upstream) -> None:
        self.up = upstream
        self.input = SMTPInput()
        self.mail: bytes | None = None
        self.rcpts: list[bytes] = []
        self.content: list[bytes] = []
        self.received = 0
        self.auth_stage: str | None = None
        self.login_user = b""

    def connectionMade(self) -> None:
        self.transport.write(b"220 upstream.test ESMTP\r\n")

    def reply(self, line: bytes) -> None:
        self.transport.write(line + b"\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.up.log.append(data)
        self.input.feed(data)
        while True:
            if self.input.in_data:
                chunk = self.input.next_data()
                if chunk is None:
                    return
                self.content.append(chunk.data)
                self.received += len(chunk.data)
                limit = self.up.script.drop_after_content
                if limit is not None and self.received >= limit:
                    self.transport.loseConnection()
                    return
                if chunk.end:
                    self.end_of_data()
                continue
            event = self.input.next_line()
            if event is None:
                return
            assert isinstance(event, Line)
            self.command(event.data)

    def command(self, line: bytes) -> None:
        script = self.up.script
        if self.auth_stage == "xoauth2-error":
            self.auth_stage = None
            return self.reply(b"535 5.7.8 token refused")
        if self.auth_stage == "plain":
            self.auth_stage = None
            return self.check_plain(base64.b64decode(line))
        if self.auth_stage == "login-user":
            self.auth_stage = "login-pw"
            self.login_user = base64.b64decode(line)
            return self.reply(b"334 UGFzc3dvcmQ6")
        if self.auth_stage == "login-pw":
            self.auth_stage = None
            ok = base64.b64decode(line) == script.password
            return self.reply(b"235 2.7.0 ok" if ok else b"535 5.7.8 bad")
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if verb == b"EHLO":
            lines = [b"upstream.test", *(e.encode() for e in script.extensions)]
            for i, text in enumerate(lines):
                self.reply(b"250" + (b" " if i == len(lines) - 1 else b"-") + text)
        elif verb == b"AUTH":
            mech, _, initial = arg.partition(b" ")
            self.up.auth_attempts.append(mech)
            if mech == b"XOAUTH2":
                fields = base64.b64decode(initial).split(b"\x01")
                token = fields[1].removeprefix(b"auth=Bearer ").decode()
            if script.auth_replies:
                if mech == b"XOAUTH2":
                    self.up.tokens_seen.append(token)
                return self.reply(script.auth_replies.pop(0))
            if mech == b"XOAUTH2":
                self.up.tokens_seen.append(token)
                if token in script.tokens:
                    return self.reply(b"235 2.7.0 ok")
                self.auth_stage = "xoauth2-error"
                return self.reply(b"334 " + base64.b64encode(b'{"status":"401"}'))
            if mech == b"PLAIN":
                if initial:
                    return self.check_plain(base64.b64decode(initial))
                self.auth_stage = "plain"
                self.reply(b"334 ")
            else:
                self.auth_stage = "login-user"
                self.reply(b"334 VXNlcm5hbWU6")
        elif verb == b"MAIL":
            self.up.mail_commands.append(line)
            if script.mail_reply.startswith(b"2"):
                self.mail = arg
            self.reply(script.mail_reply)
        elif verb == b"RCPT":
            address = arg.split(b"<", 1)[1].split(b">", 1)[0]
            answer = script.rcpt_replies.get(address, b"250 2.1.5 ok")
            if self.mail is None:
                answer = b"503 5.5.1 need MAIL"
            elif answer.startswith(b"2"):
                self.rcpts.append(address)
            self.reply(answer)
        elif verb == b"DATA":
            if self.mail is None or not self.rcpts:
                return self.reply(b"554 5.5.1 no valid recipients")
            self.reply(b"354 go ahead")
            self.input.start_data()
            self.content = []
        elif verb == b"RSET":
            self.mail, self.rcpts = None, []
            self.reply(b"250 2.0.0 ok")
        elif verb == b"QUIT":
            self.up.quits += 1
            self.reply(b"221 2.0.0 bye")
            self.transport.loseConnection()
        else:
            self.reply(b"500 5.5.2 what")

    def check_plain(self, decoded: bytes) -> None:
        ok = decoded.split(b"\0")[2] == self.up.script.password
        self.reply(b"235 2.7.0 ok" if ok else b"535 5.7.8 bad credentials")

    def end_of_data(self) -> None:
        reply = self.up.script.data_reply
        if reply.startswith(b"2"):
            assert self.mail is not None
            self.up.arrived.append(Arrived(self.mail, list(self.rcpts), b"".join(self.content)))
        self.mail, self.rcpts = None, []
        self.reply(reply)


class Upstream:
    """Hands out SMTPClients connected in memory to a FakeUpstream each."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self.script = Script()
        self.pumps: list[iosim.IOPump] = []
        self.arrived: list[Arrived] = []
        self.mail_commands: list[bytes] = []
        self.log: list[bytes] = []
        self.connections = 0
        self.tokens_seen: list[str] = []
        self.auth_attempts: list[bytes] = []
        self.quits = 0

    def connect(self) -> tuple[SMTPClient, iosim.IOPump]:
        client = SMTPClient(self.clock, 30.0, peer="fake upstream")
        server = FakeUpstream(self)
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            greet=False,
            clock=self.clock,
        )
        self.pumps.append(pump)
        self.connections += 1
        return client, pump

    async def open_session(
        self, account: Account, provider: Provider, tokens: Any = None
    ) -> SMTPClient:
        """Stands in for `gateway.upstream.smtp.open_session` (no TLS in memory)."""
        if self.script.down:
            raise SMTPUpstreamError("cannot connect to fake upstream: connection refused")
        client, pump = self.connect()
        pump.flush()
        greeting = await client.greeting()
        assert greeting.code == 220
        await self.run(client.ehlo("gw.test"), pump)
        await self.run(login(client, account, provider, tokens), pump)
        return client

    @staticmethod
    async def run(coroutine: Any, pump: iosim.IOPump) -> Any:
        d = Deferred.fromCoroutine(coroutine)
        pump.flush()
        return await d

    def settle(self, rounds: int = 200) -> None:
        """Deliver every byte and run every due timer until nothing moves."""
        for _ in range(rounds):
            moved = any([pump.pump() for pump in self.pumps])
            self.clock.advance(0)
            if not moved and not any(
                c.getTime() <= self.clock.seconds() for c in self.clock.getDelayedCalls()
            ):
                return
