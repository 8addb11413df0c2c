"""The device-facing ESMTP server: RFC 5321 with STARTTLS (3207), AUTH PLAIN and
LOGIN (4954), SIZE (1870), 8BITMIME (6152), PIPELINING (2920) and enhanced
status codes (2034, 3463).

The command tables below are the state machine: which verbs each phase of a
session accepts and which method answers them. Commands run strictly in order
(`gateway.command_queue`); one that waits (a password check, the spool's
fsync) holds the queue, and replies to a pipelined group go out in one write
(up to 64 of them). SASL decoding is `gateway.smtp.sasl`. Framing belongs to
`gateway.smtp.parser.SMTPInput`; this module only switches it, at `354` (data)
and at `220` to STARTTLS (discard what was sent in clear, forget the session).

Nothing is relayed except for a device: one that authenticated, or one that
`relay_without_auth` identifies by its source network. Everything else gets
`550 5.7.1` at MAIL. A message is acknowledged with `250` only once it is in
the spool and fsynced; the relay takes it from there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.command_queue import EMPTY, CommandQueue, IDeviceTransport, Step, Work
from gateway.devices import AuthFailed, DeviceAuthenticator
from gateway.limits import LIFETIME_EXCEEDED, ConnectionLimits
from gateway.model import Account, Device, Listener, LongLines, Provider, listener_name
from gateway.net import set_no_delay
from gateway.sessions import LoginRefusals, Refused, log_value, peer_host
from gateway.smtp import sasl
from gateway.smtp.intake import MessageIntake, Transaction
from gateway.smtp.parser import (
    MAX_TEXT_LINE,
    BadCommand,
    Command,
    Line,
    Overlong,
    PathCommand,
    SMTPInput,
    mail_params_problem,
    parse_command,
    parse_path_command,
)
from gateway.smtp.policy import (
    NetworkDevices,
    envelope_sender,
    relay_device,
    sender_allowed,
)
from gateway.smtp.record import LINE as session_line
from gateway.smtp.record import SessionRecord
from gateway.smtp.relay_path import can_relay, device_size_limit
from gateway.smtp.spool_store import QueueEntry, SpoolStore

log = Logger(namespace="gateway.smtp")

_Handler = Callable[["SMTPServer", Command], Work | None]

# Unknown or out-of-sequence commands before the session is closed: a client
# that keeps getting them wrong is not a mail client (or is an attack).
MAX_ERRORS = 20
# Stop reading from a client that pipelines more than this while a command waits.
MAX_PIPELINED = 256 * 1024
# Replies of one pipelined run held back for a single write, at most.
FLUSH_REPLIES = 64


class Phase(Enum):
    CONNECTED = "connected"  # before EHLO/HELO
    READY = "ready"  # greeted, no mail transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted


class SMTPServer(Protocol):
    factory: SMTPServerFactory
    transport: IDeviceTransport
    _queue: CommandQueue
    _refusals: LoginRefusals

    def __init__(self) -> None:
        self.phase = Phase.CONNECTED
        self._input = SMTPInput()
        self._out: list[bytes] = []
        self._connected = False
        self._tls = False
        self._tls_described = False
        self._helo: str | None = None
        self._authenticated: Device | None = None
        self._network_device: Device | None = None
        self._sasl: Callable[[bytes], sasl.Outcome] | None = None
        self._txn: Transaction | None = None
        self._intake: MessageIntake | None = None
        self._errors = 0
        self.record = SessionRecord(peer="-", started=0.0)

    # -- Twisted glue ----------------------------------------------------

    def connectionMade(self) -> None:
        factory = self.factory
        self._connected = True
        self.record = SessionRecord(peer=peer_host(self.transport), started=factory.clock.seconds())
        self._refusals = LoginRefusals(
            "smtp", log, self.record, factory.clock, factory.auth_failure_delay
        )
        self._queue = CommandQueue(
            self.transport,
            factory.clock,
            idle_timeout=factory.idle_timeout,
            stall_timeout=factory.stall_timeout,
            line_timeout=factory.line_timeout,
            next_command=self._next_command,
            partial_line=lambda: self._input.partial_line,
            connected=lambda: self._connected,
            backlog=lambda: self._input.buffered,
            max_backlog=MAX_PIPELINED,
            on_idle=self.timeoutConnection,
            on_stalled=self._stalled,
            on_line_timeout=self._line_timeout,
            on_error=self._unexpected_error,
            # One write per batch: a pipelined group's replies share a TLS record.
            after_batch=self._flush,
        )
        self._tls = factory.listener.tls == "implicit"
        self._network_device = factory.network_devices.find(self.record.peer)
        set_no_delay(self.transport)
        self._slot = factory.limits.admit("smtp", self.record.peer, factory.clock, self._close_for)
        if self._slot.refused is not None:
            return self._close_for(self._slot.refused)
        self._reply(220, None, f"{factory.hostname} ESMTP mail gateway ready")
        self._flush()

    def dataReceived(self, data: bytes) -> None:
        if self._tls and not self._tls_described:
            self._describe_tls()
        self._input.feed(data)
        self._queue.received(data)

    def timeoutConnection(self) -> None:
        self.record.outcome = "idle timeout"
        self._reply(421, "4.4.2", f"{self.factory.hostname} idle timeout, closing connection")
        self._flush()
        self.transport.abortConnection()

    def _line_timeout(self) -> None:
        self.record.outcome = "command line not completed in time"
        self._reply(421, "4.4.2", "command line not completed in time, closing connection")
        self._close()

    def _close_for(self, reason: str = LIFETIME_EXCEEDED) -> None:
        if reason == LIFETIME_EXCEEDED and self._queue.busy:  # a password check, an fsync
            return self._slot.postpone(1.0)  # gets its answer first
        self.record.outcome = reason
        self._reply(421, "4.7.0", f"{reason}, closing connection")
        self._close()
        self._slot.closing(self.transport.abortConnection)

    def _stalled(self) -> None:
        # Nothing more can be sent to a client that does not read.
        self.record.outcome = "not reading replies"
        self._out.clear()
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._connected = False
        self._queue.stop()
        self._slot.close()
        if self._intake is not None:
            # Cut off in the middle of DATA: no 250 was sent, nothing is kept.
            self._intake.incoming.abort()
            self._intake = None
            self.record.outcome = "dropped during DATA"
        self._log_session()

    # -- input -------------------------------------------------------------

    def _next_command(self) -> Step:
        """The next thing to do with what arrived: a command line, or message data."""
        if len(self._out) >= FLUSH_REPLIES:
            # A long pipelined run goes out in parts, so that a client that
            # does not read is noticed (the transport pauses the queue) early.
            self._flush()
        if self._input.in_data:
            chunk = self._input.next_data()
            if chunk is None:
                return EMPTY
            assert self._intake is not None
            self._intake.feed(chunk.data)
            return self._end_of_data() if chunk.end else None
        event = self._input.next_line()
        return EMPTY if event is None else self._handle(event)

    def _unexpected_error(self, failure: Failure) -> None:
        log.failure(
            "smtp internal error for device {device}", failure, device=log_value(self.record.device)
        )
        self.record.outcome = "internal error"
        if self._connected:
            self._reply(421, "4.3.0", "internal error, closing connection")
            self._flush()
            self._queue.lose_connection()

    def _handle(self, event: Line | Overlong) -> Work | None:
        if self._sasl is not None:
            answer, self._sasl = self._sasl, None
            if isinstance(event, Overlong):
                self._error(500, "5.5.6", "authentication response too long")
                return None
            return self._sasl_step(answer(event.data))
        if isinstance(event, Overlong):
            self._error(500, "5.5.6", "line too long")
            return None
        command = parse_command(event.data)
        if isinstance(command, BadCommand):
            self._error(500, "5.5.2", command.reason)
            return None
        handler = _COMMANDS[self.phase].get(command.verb)
        if handler is None:
            self._out_of_sequence(command.verb)
            return None
        return handler(self, command)

    def _out_of_sequence(self, verb: str) -> None:
        if not any(verb in table for table in _COMMANDS.values()):
            return self._error(500, "5.5.2", "command not recognized")
        if self.phase is Phase.CONNECTED:
            return self._error(503, "5.5.1", "send EHLO or HELO first")
        if verb == "MAIL":
            return self._error(503, "5.5.1", "nested MAIL command")
        if verb == "DATA" and self.phase is Phase.MAIL:
            return self._error(554, "5.5.1", "no valid recipients")
        if verb in ("RCPT", "DATA"):
            return self._error(503, "5.5.1", "send MAIL first")
        return self._error(503, "5.5.1", f"{verb} is not allowed during a mail transaction")

    # -- replies -----------------------------------------------------------

    def _reply(self, code: int, enhanced: str | None, text: str) -> None:
        prefix = f"{code} {enhanced} " if enhanced else f"{code} "
        self._out.append(f"{prefix}{text}\r\n".encode())

    def _reply_lines(self, code: int, lines: list[str]) -> None:
        last = len(lines) - 1
        self._out += [
            f"{code}{' ' if i == last else '-'}{x}\r\n".encode() for i, x in enumerate(lines)
        ]

    def _flush(self) -> None:
        """One write per batch: a pipelined group's replies share a TLS record."""
        if self._out and self._connected:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def _error(self, code: int, enhanced: str, text: str) -> None:
        self._reply(code, enhanced, text)
        self._errors += 1
        if self._errors >= MAX_ERRORS:
            self.record.outcome = "too many errors"
            self._reply(421, "4.7.0", "too many errors, closing connection")
            self._close()

    def _close(self) -> None:
        self._flush()
        self._input.discard()
        self._queue.lose_connection()
        self._connected = False

    # -- greeting and session ------------------------------------------------

    def _auth_allowed(self) -> bool:
        return self._tls or self.factory.listener.allow_plaintext_auth

    def do_ehlo(self, command: Command) -> None:
        if not command.arg:
            return self._error(501, "5.5.4", "EHLO needs the client's domain or address")
        self._reset_transaction()
        self._helo = command.arg.split()[0]
        self.phase = Phase.READY
        lines = [
            f"{self.factory.hostname} greets {self._helo}",
            "PIPELINING",
            f"SIZE {self._size_limit(self._network_device)}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]
        if not self._tls and self.factory.tls_options is not None:
            lines.append("STARTTLS")
        if self._auth_allowed() and self._authenticated is None:
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        self._reply_lines(250, lines)

    def _size_limit(self, device: Device | None) -> int:
        f = self.factory
        return device_size_limit(device, f.accounts, f.providers, f.max_message_size)

    def do_helo(self, command: Command) -> None:
        if not command.arg:
            return self._error(501, "5.5.4", "HELO needs the client's domain")
        self._reset_transaction()
        self._helo = command.arg.split()[0]
        self.phase = Phase.READY
        self._reply(250, None, f"{self.factory.hostname} greets {self._helo}")

    def do_starttls(self, command: Command) -> None:
        if command.arg:
            return self._error(501, "5.5.4", "STARTTLS takes no argument")
        if self._tls:
            return self._error(503, "5.5.1", "TLS already active")
        if self.factory.tls_options is None:
            return self._error(502, "5.5.1", "STARTTLS not offered on this port")
        self._reply(220, "2.0.0", "ready to start TLS")
        self._flush()
        # RFC 3207 section 4.2: whatever the client sent after STARTTLS in
        # clear must not be executed inside TLS (command injection), and the
        # session starts over: EHLO again, no AUTH, no transaction.
        self._input.discard()
        self._reset_transaction()
        self._helo = None
        self._authenticated = None
        self.phase = Phase.CONNECTED
        self.transport.startTLS(self.factory.tls_options)
        self._tls = True
        self._tls_described = False

    def do_noop(self, command: Command) -> None:
        self._reply(250, "2.0.0", "OK")

    def do_rset(self, command: Command) -> None:
        self._reset_transaction()
        self._reply(250, "2.0.0", "OK")

    def do_vrfy(self, command: Command) -> None:
        self._reply(252, "2.5.2", "cannot verify addresses, but will relay the message")

    def do_expn(self, command: Command) -> None:
        self._reply(502, "5.5.1", "EXPN is not available")

    def do_help(self, command: Command) -> None:
        self._reply(214, "2.0.0", "mail gateway: see RFC 5321 for the commands")

    def do_quit(self, command: Command) -> None:
        if self.record.outcome == "dropped":
            self.record.outcome = "quit"
        self._reply(221, "2.0.0", "bye")
        self._close()

    def _reset_transaction(self) -> None:
        self._txn = None
        if self.phase in (Phase.MAIL, Phase.RCPT):
            self.phase = Phase.READY

    # -- AUTH ----------------------------------------------------------------

    def do_auth(self, command: Command) -> Work | None:
        if self._authenticated is not None:
            self._error(503, "5.5.1", "already authenticated")
            return None
        if not self._auth_allowed():
            self._error(538, "5.7.11", "encryption required: send STARTTLS first")
            return None
        mechanism, _, initial = command.arg.partition(" ")
        return self._sasl_step(sasl.start(mechanism, initial.strip()))

    def _sasl_step(self, outcome: sasl.Outcome) -> Work | None:
        if isinstance(outcome, sasl.Challenge):
            self._out.append(b"334 " + outcome.prompt + b"\r\n")
            self._sasl = outcome.answer
        elif isinstance(outcome, sasl.SASLError):
            reply = self._error if outcome.counted else self._reply
            reply(outcome.code, outcome.enhanced, outcome.text)
        else:
            return self._login(outcome.user, outcome.password)
        return None

    async def _login(self, user: str, password: bytes) -> None:
        try:
            device = await self.factory.authenticator.authenticate(
                user, password, self.record.peer, "smtp"
            )
        except AuthFailed as refusal:
            await self._refuse_login(user, refusal)
            return
        if not self._connected:
            return
        self.record.device, self.record.account = device.name, device.account
        if (over := self._slot.login(device.name)) is not None:
            return self._close_for(over)
        self._authenticated = device
        self.record.identified_by = "password"
        self._reply(235, "2.7.0", "authentication successful")

    async def _refuse_login(self, user: str, refusal: AuthFailed) -> None:
        verdict = await self._refusals.refuse(user, refusal, lambda: self._connected)
        if verdict is Refused.GONE:
            return
        self._reply(535, "5.7.8", "authentication credentials invalid")
        if verdict is Refused.CLOSE:
            self._reply(421, "4.7.0", "too many failed logins, closing connection")
            self._close()

    # -- the mail transaction --------------------------------------------------

    def do_mail(self, command: Command) -> None:
        parsed = parse_path_command(command.arg, "FROM")
        if not isinstance(parsed, PathCommand):
            return self._error(parsed.code, parsed.enhanced, parsed.reason)
        who = relay_device(self._authenticated, self._network_device)
        if who is None:
            self.record.refused += 1
            log.info(
                "smtp relay refused for {peer}: not authenticated and not an allowed network",
                peer=log_value(self.record.peer),
            )
            hint = "authenticate first" if self._auth_allowed() else "STARTTLS and authenticate"
            return self._reply(550, "5.7.1", f"relaying denied: {hint}")
        device, identified_by = who
        account = self.factory.accounts.get(device.account)
        if account is None:
            # Removed by a config reload (gateway.reload) since this session began.
            return self._reply(451, "4.3.0", "configuration changed, try again later")
        provider = self.factory.providers.get(account.provider)
        if provider is None or not can_relay(account, provider):
            log.error(
                "smtp device {device}: account {account} has no upstream smtp endpoint",
                device=log_value(device.name),
                account=log_value(account.name),
            )
            return self._reply(554, "5.3.5", "relaying is not configured for this device")
        problem = mail_params_problem(parsed.params, self._size_limit(device))
        if problem is not None:
            return self._error(problem.code, problem.enhanced, problem.reason)
        if not sender_allowed(account, parsed.address):
            self.record.refused += 1
            log.info(
                "smtp sender <{sender}> refused for device {device} (account {account})",
                sender=log_value(parsed.address),
                device=log_value(device.name),
                account=log_value(account.name),
            )
            return self._reply(550, "5.7.1", f"sender <{parsed.address}> not allowed")
        self.record.device, self.record.account = device.name, account.name
        self.record.identified_by = identified_by
        self._txn = Transaction(
            device=device,
            account=account,
            identified_by=identified_by,
            original_sender=parsed.address,
            sender=envelope_sender(account, parsed.address),
            body=parsed.params.get("BODY"),
        )
        self.phase = Phase.MAIL
        self._reply(250, "2.1.0", "sender OK")

    def do_rcpt(self, command: Command) -> None:
        assert self._txn is not None
        parsed = parse_path_command(command.arg, "TO")
        if not isinstance(parsed, PathCommand):
            return self._error(parsed.code, parsed.enhanced, parsed.reason)
        if parsed.params:
            return self._error(555, "5.5.4", "RCPT parameters are not supported")
        recipients = self._txn.recipients
        if parsed.address in recipients:
            return self._reply(250, "2.1.5", "recipient OK")
        if len(recipients) >= self.factory.max_recipients:
            return self._reply(452, "4.5.3", "too many recipients")
        recipients.append(parsed.address)
        self.phase = Phase.RCPT
        self._reply(250, "2.1.5", "recipient OK")

    def do_data(self, command: Command) -> None:
        assert self._txn is not None
        if command.arg:
            return self._error(501, "5.5.4", "DATA takes no argument")
        try:
            incoming = self.factory.spool.incoming(self.factory.clock.seconds())
        except OSError as e:
            log.error("smtp spool cannot take a message: {error}", error=e)
            return self._reply(451, "4.3.0", "cannot store messages now, try again later")
        self._intake = MessageIntake(
            incoming,
            self._txn,
            max_size=self._size_limit(self._txn.device),
            max_line=self.factory.max_line_length,
            long_lines=self.factory.long_lines,
        )
        self._input.start_data()
        self._reply(354, None, "end data with <CR><LF>.<CR><LF>")

    async def _end_of_data(self) -> None:
        intake, txn = self._intake, self._txn
        assert intake is not None and txn is not None
        self._intake = None
        intake.finish()
        self.record.bytes_in += intake.received
        if intake.refusal is not None:
            self.record.refused += 1
            refusal = intake.refusal
            log.info(
                "smtp message refused for device {device}: {reason}",
                device=log_value(txn.device.name),
                reason=refusal.text,
            )
            self._reset_transaction()
            self._reply(refusal.code, refusal.enhanced, refusal.text)
            return
        incoming = intake.incoming
        envelope = txn.envelope(intake, self.record.peer, self.factory.clock.seconds())
        try:
            entry = await self.factory.spool.commit(incoming, envelope)
        except OSError as e:
            incoming.abort()
            log.error("smtp spool could not store a message: {error}", error=e)
            self._reset_transaction()
            if self._connected:
                self._reply(451, "4.3.0", "could not store the message, try again later")
            return
        # From here the message is the relay's, whether or not the client
        # is still there to see the 250 (if not, it may send it again).
        self.factory.on_queued(entry)
        # Logged in the session line and, with its envelope, when relayed: a
        # line per message here as well costs more CPU than the rest of its
        # acceptance (twistd's log file writer is not cheap).
        self.record.queued.append(envelope.id)
        self.record.recipients += len(envelope.recipients)
        self._reset_transaction()
        if self._connected:
            self._reply(250, "2.0.0", f"OK queued as {envelope.id}")

    # -- the log line -----------------------------------------------------------

    def _describe_tls(self) -> None:
        self._tls_described = True
        self.record.note_tls(self.transport)

    def _log_session(self) -> None:
        fields = self.record.log_fields(self.factory.clock.seconds())
        log.info(session_line, **fields, listener=listener_name(self.factory.listener))


_ALWAYS: Mapping[str, _Handler] = {
    "EHLO": SMTPServer.do_ehlo,
    "HELO": SMTPServer.do_helo,
    "NOOP": SMTPServer.do_noop,
    "RSET": SMTPServer.do_rset,
    "VRFY": SMTPServer.do_vrfy,
    "EXPN": SMTPServer.do_expn,
    "HELP": SMTPServer.do_help,
    "QUIT": SMTPServer.do_quit,
}

_COMMANDS: Mapping[Phase, Mapping[str, _Handler]] = {
    Phase.CONNECTED: {**_ALWAYS, "STARTTLS": SMTPServer.do_starttls},
    Phase.READY: {
        **_ALWAYS,
        "STARTTLS": SMTPServer.do_starttls,
        "AUTH": SMTPServer.do_auth,
        "MAIL": SMTPServer.do_mail,
    },
    Phase.MAIL: {**_ALWAYS, "RCPT": SMTPServer.do_rcpt},
    Phase.RCPT: {**_ALWAYS, "RCPT": SMTPServer.do_rcpt, "DATA": SMTPServer.do_data},
}


@dataclass(eq=False, kw_only=True)
class SMTPServerFactory(Factory[SMTPServer]):
    """Everything a device session needs, injected: tests pass a memory clock,
    a synchronous authenticator and a spool whose fsync runs inline."""

    protocol = SMTPServer

    listener: Listener
    tls_options: IOpenSSLServerConnectionCreator | None
    authenticator: DeviceAuthenticator
    devices: Mapping[str, Device]
    accounts: Mapping[str, Account]
    providers: Mapping[str, Provider]
    spool: SpoolStore
    on_queued: Callable[[QueueEntry], None]
    clock: IReactorTime
    hostname: str
    idle_timeout: float = 300.0
    stall_timeout: float = 120.0
    line_timeout: float = 60.0
    max_message_size: int = 35 * 1024 * 1024
    max_recipients: int = 100
    max_line_length: int = MAX_TEXT_LINE
    long_lines: LongLines = "fold"
    auth_failure_delay: float = 1.0
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)  # the runtime's

    def __post_init__(self) -> None:
        self.network_devices = NetworkDevices.from_devices(self.devices.values())
