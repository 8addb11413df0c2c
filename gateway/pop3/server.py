"""The device-facing POP3 server: RFC 1939 phases, RFC 2449 CAPA and response
codes, RFC 2595 STLS and RFC 5034 AUTH PLAIN.

The command table below is the state machine: which verbs each phase accepts
and which method answers them. Commands are executed strictly one after the
other (RFC 2449 PIPELINING, `gateway.command_queue`): a command that waits on
the upstream holds the queue until its answer is complete. Everything that touches the upstream goes
through a `Maildrop`, whose inside this module does not know.
"""

from __future__ import annotations

import base64
import binascii
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.command_queue import EMPTY, CommandQueue, IDeviceTransport, Step, Work
from gateway.devices import AuthFailed, DeviceAuthenticator
from gateway.limits import LIFETIME_EXCEEDED, ConnectionLimits, Slot
from gateway.locks import MailboxLease, MailboxLocks
from gateway.locks.login import lock_mailbox, released
from gateway.maildrop import (
    Maildrop,
    MaildropError,
    MaildropOpener,
    UpstreamLost,
    UpstreamRejected,
)
from gateway.model import Account, Listener, listener_name
from gateway.net import set_no_delay
from gateway.pop3.parser import (
    BadCommand,
    Command,
    Line,
    LineReader,
    Overlong,
    parse_command,
    parse_line_count,
    parse_message_number,
)
from gateway.pop3.sink import MessageSink
from gateway.sessions import BaseSessionRecord, LoginRefusals, Refused, log_value, peer_host

log = Logger(namespace="gateway.pop3")

_Handler = Callable[["POP3Server", Command], Work | None]

# Stop reading from a device that pipelines more than this many commands.
MAX_QUEUED_COMMANDS = 64


class Phase(Enum):
    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    UPDATE = "update"


@dataclass
class SessionRecord(BaseSessionRecord):
    """What the one log line per session says (beyond `BaseSessionRecord`)."""

    listed: int = 0
    retrieved: int = 0
    deleted: int = 0
    bytes_out: int = 0


class POP3Server(Protocol):
    factory: POP3ServerFactory
    transport: IDeviceTransport
    _queue: CommandQueue
    _refusals: LoginRefusals
    _slot: Slot

    def __init__(self) -> None:
        self.phase = Phase.AUTHORIZATION
        self._reader = LineReader()
        self._pending: deque[Line | Overlong] = deque()
        self._connected = False
        self._tls = False
        self._tls_described = False
        self._user: str | None = None
        self._sasl_pending = False
        self._maildrop: Maildrop | None = None
        self._mailbox_lock: MailboxLease | None = None
        self._deleted: set[int] = set()
        self.record = SessionRecord(peer="-", started=0.0)

    # -- Twisted glue ----------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        self._connected = True
        self.record = SessionRecord(peer=peer_host(self.transport), started=factory.clock.seconds())
        self._refusals = LoginRefusals(
            "pop3", log, self.record, factory.clock, factory.auth_failure_delay
        )
        self._queue = CommandQueue(
            self.transport,
            factory.clock,
            idle_timeout=factory.idle_timeout,
            stall_timeout=factory.stall_timeout,
            line_timeout=factory.line_timeout,
            next_command=self._next_command,
            partial_line=lambda: self._reader.partial,
            connected=lambda: self._connected,
            backlog=lambda: len(self._pending),
            max_backlog=MAX_QUEUED_COMMANDS,
            on_idle=self.timeoutConnection,
            on_stalled=self._stalled,
            on_line_timeout=self._line_timeout,
            on_error=self._unexpected_error,
        )
        self._tls = factory.listener.tls == "implicit"
        set_no_delay(self.transport)
        self._slot = factory.limits.admit("pop3", self.record.peer, factory.clock, self._expired)
        if self._slot.refused is not None:
            return self._close_for(self._slot.refused)
        self._write_line(b"+OK POP3 gateway ready")

    def dataReceived(self, data: bytes) -> None:
        if self._tls and not self._tls_described:
            self._describe_tls()
        self._pending.extend(self._reader.feed(data))
        self._queue.received(data)

    def timeoutConnection(self) -> None:
        self.record.outcome = "idle timeout"
        self._write_line(b"-ERR idle timeout, closing connection")
        self.transport.abortConnection()

    def _line_timeout(self) -> None:
        self.record.outcome = "command line not completed in time"
        self._write_line(b"-ERR command line not completed in time, closing connection")
        self._queue.lose_connection()

    def _expired(self) -> None:
        if self.phase is Phase.UPDATE:
            return  # the device's QUIT is being carried out: the session is ending
        if self._queue.busy:
            # A reply may be half sent (RETR): no -ERR in the middle of it.
            self.record.outcome = LIFETIME_EXCEEDED
            return self.transport.abortConnection()
        self._close_for(LIFETIME_EXCEEDED)

    def _close_for(self, reason: str) -> None:
        """Refuse or end the session for a limit: a drop, never QUIT, so nothing
        is deleted upstream (`connectionLost` aborts the maildrop)."""
        self.record.outcome = reason
        self._err(f"{reason}, closing connection", "SYS/TEMP")
        self._connected = False
        self._queue.lose_connection()
        self._slot.closing(self.transport.abortConnection)

    def _stalled(self) -> None:
        # Nothing more can be sent to a device that does not read.
        self.record.outcome = "not reading replies"
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._connected = False
        self._queue.stop()
        self._slot.close()
        if self.phase is not Phase.UPDATE:
            # RFC 1939: a session that ends without QUIT never enters UPDATE;
            # the upstream is dropped without QUIT so nothing is deleted.
            self._release_maildrop(abort=True)
        self._log_session()

    # -- commands --------------------------------------------------------

    def _next_command(self) -> Step:
        if not self._pending:
            return EMPTY
        return self._handle(self._pending.popleft())

    def _unexpected_error(self, failure: Failure) -> None:
        log.failure(
            "pop3 internal error for device {device}", failure, device=log_value(self.record.device)
        )
        self.record.outcome = "internal error"
        if self._connected:
            self._write_line(b"-ERR [SYS/TEMP] internal error, closing connection")
            self._queue.lose_connection()

    def _handle(self, event: Line | Overlong) -> Work | None:
        if self._sasl_pending:
            self._sasl_pending = False
            if isinstance(event, Overlong):
                self._err("authentication response too long")
                return None
            return self._sasl_plain_response(event.data)
        if isinstance(event, Overlong):
            self._err("command line too long")
            return None
        command = parse_command(event.data)
        if isinstance(command, BadCommand):
            self._err(command.reason)
            return None
        handler = _COMMANDS[self.phase].get(command.verb)
        if handler is None:
            known = any(command.verb in table for table in _COMMANDS.values())
            self._err("command not valid in this state" if known else "unknown command")
            return None
        return handler(self, command)

    # -- replies ---------------------------------------------------------

    def _write_line(self, line: bytes) -> None:
        self.transport.write(line + b"\r\n")

    def _ok(self, text: str = "") -> None:
        self._write_line(b"+OK " + text.encode() if text else b"+OK")

    def _err(self, text: str, code: str | None = None) -> None:
        prefix = f"[{code}] " if code else ""
        self._write_line(f"-ERR {prefix}{text}".encode())

    def _multiline(self, status: str, lines: list[str]) -> None:
        body = "".join(f"{line}\r\n" for line in lines)
        self.transport.write(f"+OK {status}\r\n{body}.\r\n".encode())

    # -- AUTHORIZATION ---------------------------------------------------

    def _auth_allowed(self) -> bool:
        return self._tls or self.factory.listener.allow_plaintext_auth

    def do_capa(self, command: Command) -> None:
        caps = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.phase is Phase.AUTHORIZATION:
            if self._auth_allowed():
                caps += ["USER", "SASL PLAIN"]
            if not self._tls and self.factory.tls_options is not None:
                caps.append("STLS")
        caps.append("IMPLEMENTATION mail-gateway")
        self._multiline("capability list follows", caps)

    def do_stls(self, command: Command) -> None:
        if self._tls:
            return self._err("TLS already active")
        if self.factory.tls_options is None:
            return self._err("STLS not available on this port")
        self._ok("begin TLS negotiation")
        # RFC 2595: nothing the client sent in clear after STLS may be run
        # inside the TLS session (command injection).
        self._reader.discard()
        self._pending.clear()
        self._user = None
        self.transport.startTLS(self.factory.tls_options)
        self._tls = True

    def do_user(self, command: Command) -> None:
        if not self._auth_allowed():
            return self._err("log in only after STLS")
        if len(command.args) != 1:
            return self._err("USER takes exactly one argument, the device name")
        self._user = command.args[0]
        self._ok("send PASS")

    def do_pass(self, command: Command) -> Work | None:
        if not self._auth_allowed():
            self._err("log in only after STLS")
        elif self._user is None:
            self._err("send USER first")
        elif not command.rest:
            self._err("PASS needs a password")
        else:
            user, self._user = self._user, None
            return self._login(user, command.rest.encode())
        return None

    def do_auth(self, command: Command) -> Work | None:
        if not self._auth_allowed():
            self._err("log in only after STLS")
            return None
        if not command.args:
            self._multiline("methods follow", ["PLAIN"])
            return None
        if command.args[0].upper() != "PLAIN" or len(command.args) > 2:
            self._err("unsupported authentication mechanism, use PLAIN")
            return None
        if len(command.args) == 2:
            return self._sasl_plain_response(command.args[1].encode())
        self._sasl_pending = True
        self._write_line(b"+ ")
        return None

    def _sasl_plain_response(self, response: bytes) -> Work | None:
        if response == b"*":
            self._err("authentication cancelled")
            return None
        try:
            decoded = base64.b64decode(b"" if response == b"=" else response, validate=True)
            authzid, authcid, password = decoded.split(b"\0")
            user = authcid.decode("utf-8")
        except (binascii.Error, ValueError):
            self._err("malformed AUTH PLAIN response")
            return None
        if authzid and authzid != authcid:
            self._err("authorization identity must match the user", "AUTH")
            return None
        return self._login(user, password)

    async def _login(self, user: str, password: bytes) -> None:
        factory = self.factory
        try:
            device = await factory.authenticator.authenticate(
                user, password, self.record.peer, "pop3"
            )
        except AuthFailed as refusal:
            await self._refuse_login(user, refusal)
            return
        if not self._connected:
            return
        account = factory.accounts[device.account]
        self.record.device, self.record.account = device.name, account.name
        if (over := self._slot.login(device.name)) is not None:
            return self._close_for(over)
        lock = await lock_mailbox(factory.locks, account, device.name, self.record.peer)
        if not isinstance(lock, MailboxLease):
            return self._err(*lock) if self._connected else None
        self._mailbox_lock = lock
        if not self._connected:
            return self._release_maildrop(abort=False)

        def lock_lost() -> None:
            # The state lease lapsed: a drop, never QUIT, so nothing is
            # deleted; a QUIT being carried out (UPDATE) is let finish.
            if self._connected and self.phase is not Phase.UPDATE:
                if self._queue.busy:  # no -ERR inside a half-sent reply
                    self.record.outcome = "mailbox lock lost"
                    return self.transport.abortConnection()
                self._close_for("mailbox lock lost")

        lock.on_lost(lock_lost)
        try:
            maildrop = await factory.open_maildrop(account)
        except MaildropError as e:
            self._release_maildrop(abort=False)
            self._log_upstream_error(e, "login")
            if self._connected:
                self._err(str(e), e.code)
            return
        if not self._connected:
            self._maildrop = maildrop
            self._release_maildrop(abort=True)
            return
        self._maildrop = maildrop
        self.phase = Phase.TRANSACTION
        count, octets = self._totals()
        self._ok(f"maildrop has {count} messages ({octets} octets)")

    async def _refuse_login(self, user: str, refusal: AuthFailed) -> None:
        verdict = await self._refusals.refuse(user, refusal, lambda: self._connected)
        if verdict is Refused.GONE:
            return
        self._err("invalid user name or password", "AUTH")
        if verdict is Refused.CLOSE:
            self._queue.lose_connection()

    def do_quit_authorization(self, command: Command) -> None:
        self.record.outcome = "quit before login"
        self._ok("bye")
        self._queue.lose_connection()

    # -- TRANSACTION -----------------------------------------------------

    @property
    def _drop(self) -> Maildrop:
        assert self._maildrop is not None
        return self._maildrop

    def _totals(self) -> tuple[int, int]:
        sizes = self._drop.sizes
        deleted = [sizes[n - 1] for n in self._deleted]
        return len(sizes) - len(deleted), sum(sizes) - sum(deleted)

    def _message(self, arg: str) -> int | None:
        """The message number `arg` names, or None after replying -ERR."""
        parsed = parse_message_number(arg, len(self._drop.sizes))
        if isinstance(parsed, str):
            self._err(parsed)
            return None
        if parsed in self._deleted:
            self._err(f"message {parsed} already deleted")
            return None
        return parsed

    def do_stat(self, command: Command) -> None:
        count, octets = self._totals()
        self._ok(f"{count} {octets}")

    def do_noop(self, command: Command) -> None:
        self._ok()

    def do_list(self, command: Command) -> None:
        sizes = self._drop.sizes
        if command.args:
            if (msg := self._message(command.args[0])) is not None:
                self._ok(f"{msg} {sizes[msg - 1]}")
            return
        count, octets = self._totals()
        self.record.listed = max(self.record.listed, count)
        lines = [f"{n} {size}" for n, size in enumerate(sizes, 1) if n not in self._deleted]
        self._multiline(f"{count} messages ({octets} octets)", lines)

    async def do_uidl(self, command: Command) -> None:
        msg = None
        if command.args and (msg := self._message(command.args[0])) is None:
            return
        try:
            uids = await self._drop.unique_ids()
        except MaildropError as e:
            return self._upstream_failed(e, "UIDL", started=False)
        if msg is not None:
            return self._ok(f"{msg} {uids[msg - 1]}")
        lines = [f"{n} {uid}" for n, uid in enumerate(uids, 1) if n not in self._deleted]
        self._multiline("unique-id listing follows", lines)

    def do_retr(self, command: Command) -> Work | None:
        if len(command.args) != 1:
            self._err("RETR takes one message number")
            return None
        msg = self._message(command.args[0])
        return None if msg is None else self._send(msg, None)

    def do_top(self, command: Command) -> Work | None:
        if len(command.args) != 2:
            self._err("TOP takes a message number and a line count")
            return None
        lines = parse_line_count(command.args[1])
        if isinstance(lines, str):
            self._err(lines)
            return None
        msg = self._message(command.args[0])
        return None if msg is None else self._send(msg, lines)

    async def _send(self, msg: int, lines: int | None) -> None:
        sink = MessageSink(self.transport, self._queue.output)
        try:
            await self._drop.retrieve(msg, sink, lines)
        except MaildropError as e:
            return self._upstream_failed(e, "TOP" if lines is not None else "RETR", sink.started)
        if not self._connected:
            return
        sink.finish()
        self.record.bytes_out += sink.octets
        if lines is None:
            self.record.retrieved += 1

    def do_dele(self, command: Command) -> None:
        if len(command.args) != 1:
            return self._err("DELE takes one message number")
        if (msg := self._message(command.args[0])) is not None:
            self._deleted.add(msg)
            self._ok(f"message {msg} deleted")

    def do_rset(self, command: Command) -> None:
        self._deleted.clear()
        count, octets = self._totals()
        self._ok(f"maildrop has {count} messages ({octets} octets)")

    async def do_quit_transaction(self, command: Command) -> None:
        self.phase = Phase.UPDATE
        deleted = sorted(self._deleted)
        try:
            await self._drop.commit(deleted)
        except MaildropError as e:
            self._log_upstream_error(e, "QUIT")
            self.record.outcome = "quit, upstream commit failed"
            self._release_maildrop(abort=True)
            if self._connected:
                self._err("some deleted messages were not removed", "SYS/TEMP")
                self._queue.lose_connection()
            return
        self.record.deleted = len(deleted)
        self.record.outcome = "quit"
        await released(self._release_maildrop(abort=False), self.factory.clock)
        if self._connected:
            self._ok(f"bye, {len(deleted)} messages deleted")
            self._queue.lose_connection()

    # -- upstream trouble and cleanup -----------------------------------

    def _upstream_failed(self, error: MaildropError, step: str, started: bool) -> None:
        self._log_upstream_error(error, step)
        if not self._connected:
            return
        if started:
            # Part of the message is already on the wire: ending it with "."
            # would hand the device a truncated message as if it were whole.
            self.record.outcome = f"upstream failed during {step}, connection dropped"
            self.transport.abortConnection()
            return
        self._err(str(error), error.code)
        if isinstance(error, UpstreamLost):
            self.record.outcome = f"upstream lost during {step}"
            self._queue.lose_connection()

    def _log_upstream_error(self, error: MaildropError, step: str) -> None:
        emit = log.error if isinstance(error, UpstreamRejected) else log.warn
        emit(
            "pop3 upstream {step} failed for account {account} (device {device}): {kind}: {detail}",
            step=step,
            account=log_value(self.record.account),
            device=log_value(self.record.device),
            kind=type(error).__name__,
            detail=error.detail or str(error),
        )

    def _release_maildrop(self, abort: bool) -> Deferred[None]:
        if self._maildrop is not None and abort:
            self._maildrop.abort()
        self._maildrop = None
        lock, self._mailbox_lock = self._mailbox_lock, None
        return succeed(None) if lock is None else self.factory.locks.release(lock)

    def _describe_tls(self) -> None:
        self._tls_described = True
        self.record.note_tls(self.transport)

    def _log_session(self) -> None:
        r = self.record
        log.info(
            "pop3 session device={device} peer={peer} account={account} tls={tls_version} "
            "cipher={tls_cipher} listed={listed} retrieved={retrieved} deleted={deleted} "
            "bytes={bytes_out} duration={duration:.3f}s outcome={outcome}",
            **r.log_fields(self.factory.clock.seconds()),
            listener=listener_name(self.factory.listener),
            listed=r.listed,
            retrieved=r.retrieved,
            deleted=r.deleted,
            bytes_out=r.bytes_out,
        )


_COMMANDS: Mapping[Phase, Mapping[str, _Handler]] = {
    Phase.AUTHORIZATION: {
        "CAPA": POP3Server.do_capa,
        "STLS": POP3Server.do_stls,
        "USER": POP3Server.do_user,
        "PASS": POP3Server.do_pass,
        "AUTH": POP3Server.do_auth,
        "QUIT": POP3Server.do_quit_authorization,
    },
    Phase.TRANSACTION: {
        "CAPA": POP3Server.do_capa,
        "STAT": POP3Server.do_stat,
        "LIST": POP3Server.do_list,
        "RETR": POP3Server.do_retr,
        "DELE": POP3Server.do_dele,
        "NOOP": POP3Server.do_noop,
        "RSET": POP3Server.do_rset,
        "TOP": POP3Server.do_top,
        "UIDL": POP3Server.do_uidl,
        "QUIT": POP3Server.do_quit_transaction,
    },
    Phase.UPDATE: {},
}


@dataclass(eq=False, kw_only=True)
class POP3ServerFactory(Factory[POP3Server]):
    """Everything a device session needs, injected, so unit tests can pass a
    fake clock, an in-memory maildrop opener and a synchronous authenticator."""

    protocol = POP3Server

    listener: Listener
    tls_options: IOpenSSLServerConnectionCreator | None
    authenticator: DeviceAuthenticator
    accounts: Mapping[str, Account]
    open_maildrop: MaildropOpener
    locks: MailboxLocks
    clock: IReactorTime
    idle_timeout: float = 600.0
    stall_timeout: float = 120.0
    line_timeout: float = 60.0
    auth_failure_delay: float = 1.0
    # Shared with every listener of both protocols (the runtime's).
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
