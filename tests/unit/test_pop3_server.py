"""The device-facing POP3 state machine, on in-memory transports with a fake clock."""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from gateway.command_queue import CLOSE_GRACE
from gateway.devices import DeviceAuthenticator
from gateway.dotstuff import unstuff
from gateway.locks import AccountLocks
from gateway.maildrop import MailboxInUse, UpstreamRejected, UpstreamUnavailable
from gateway.maildrop.memory import MemoryMaildrop
from gateway.model import Account, Device, Listener, Secret
from gateway.pop3.server import POP3ServerFactory
from tests.helpers.front_end import (
    FAST_HASHER,
    TLSRecordingTransport,
    UnreadTransport,
    connect_in_memory,
    pipeline_until_paused,
    run_now,
)
from tests.helpers.log_lines import captured_log, fail2ban_hosts
from tests.helpers.tls_pair import tls_pair

MSG1 = b"Subject: one\r\n\r\nhello\r\n.dot line\r\n"
MSG2 = b"Subject: two\r\n\r\nline 1\r\nline 2\r\nline 3\r\n"


class Gateway:
    """One gateway front end with two devices on one account, in memory."""

    def __init__(
        self,
        messages: list[bytes] | None = None,
        tls: str = "implicit",
        allow_plaintext_auth: bool = False,
    ) -> None:
        self.clock = MemoryReactorClock()
        self.maildrops: list[MemoryMaildrop] = []
        self.messages = messages if messages is not None else [MSG1, MSG2]
        self.open_error: Exception | None = None
        devices = {
            name: Device(
                name=name,
                password_hash=Secret(FAST_HASHER.hash(f"{name}-pw")),
                account="scanner",
                allow_from=(ipaddress.ip_network("10.0.0.0/8"),),
            )
            for name in ("printer", "copier")
        }
        devices["fax"] = Device(
            name="fax",
            password_hash=Secret(FAST_HASHER.hash("fax-pw")),
            account="scanner-alias",
        )
        self.tls_marker = object()
        self.factory = POP3ServerFactory(
            listener=Listener(
                "pop3",
                110 if tls == "starttls" else 995,
                tls,  # type: ignore[arg-type]
                allow_plaintext_auth=allow_plaintext_auth,
            ),
            tls_options=self.tls_marker if tls == "starttls" else None,  # type: ignore[arg-type]
            authenticator=DeviceAuthenticator(devices, run_in_thread=run_now),
            accounts={
                "scanner": Account("scanner", "corp", "scanner@example.com"),
                # The same upstream mailbox under another name.
                "scanner-alias": Account("scanner-alias", "corp", "Scanner@Example.com"),
            },
            open_maildrop=self._open,
            locks=AccountLocks(),
            clock=self.clock,
        )

    async def _open(self, account: Account) -> MemoryMaildrop:
        if self.open_error is not None:
            raise self.open_error
        drop = MemoryMaildrop(list(self.messages), chunk_size=7)
        self.maildrops.append(drop)
        return drop

    def connect(
        self,
        peer: str = "10.1.2.3",
        transport_class: type[TLSRecordingTransport] = TLSRecordingTransport,
    ) -> Device_:
        proto, transport = connect_in_memory(self.factory, peer, transport_class)
        client = Device_(proto, transport, self.clock)
        assert client.read() == b"+OK POP3 gateway ready\r\n"
        return client


class Device_:
    def __init__(self, proto: Any, transport: TLSRecordingTransport, clock: MemoryReactorClock):
        self.proto, self.transport, self.clock = proto, transport, clock

    def read(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def send(self, *lines: bytes) -> bytes:
        self.proto.dataReceived(b"".join(line + b"\r\n" for line in lines))
        self.clock.advance(1.0)  # any failed-login pause
        return self.read()

    def login(self, name: str = "printer") -> bytes:
        self.send(b"USER " + name.encode())
        return self.send(b"PASS " + name.encode() + b"-pw")

    def drop(self) -> None:
        self.transport.loseConnection()
        self.proto.connectionLost(None)

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting or self.transport.disconnected


def test_login_stat_list_uidl() -> None:
    gw = Gateway()
    dev = gw.connect()
    total = len(MSG1) + len(MSG2)
    assert dev.login() == f"+OK maildrop has 2 messages ({total} octets)\r\n".encode()
    assert dev.send(b"STAT") == f"+OK 2 {total}\r\n".encode()
    assert dev.send(b"LIST") == (
        f"+OK 2 messages ({total} octets)\r\n1 {len(MSG1)}\r\n2 {len(MSG2)}\r\n.\r\n".encode()
    )
    assert dev.send(b"LIST 2") == f"+OK 2 {len(MSG2)}\r\n".encode()
    listing = dev.send(b"UIDL").split(b"\r\n")
    assert listing[0].startswith(b"+OK") and listing[1].startswith(b"1 ") and listing[3] == b"."
    assert dev.send(b"UIDL 2") == b"+OK 2 " + listing[2].split()[1] + b"\r\n"


def test_retr_and_top_are_stuffed_and_terminated() -> None:
    dev = Gateway().connect()
    dev.login()
    assert dev.send(b"RETR 1") == (
        b"+OK message follows\r\nSubject: one\r\n\r\nhello\r\n..dot line\r\n.\r\n"
    )
    assert dev.send(b"TOP 2 1") == b"+OK message follows\r\nSubject: two\r\n\r\nline 1\r\n.\r\n"
    assert dev.send(b"TOP 2 0") == b"+OK message follows\r\nSubject: two\r\n\r\n.\r\n"


def test_argument_errors_keep_the_session() -> None:
    dev = Gateway().connect()
    dev.login()
    assert dev.send(b"RETR 0") == b"-ERR no such message\r\n"
    assert dev.send(b"RETR 99999999999999999999") == b"-ERR no such message\r\n"
    assert dev.send(b"LIST x") == b"-ERR invalid message number\r\n"
    assert dev.send(b"TOP 1 x") == b"-ERR invalid line count\r\n"
    assert dev.send(b"RETR") == b"-ERR RETR takes one message number\r\n"
    assert dev.send(b"RE\x00TR 1") == b"-ERR NUL byte in command\r\n"
    assert dev.send(b"NOOP " + b"x" * 300) == b"-ERR command line too long\r\n"
    assert dev.send(b"X" * 20000) == b"-ERR command line too long\r\n"
    assert dev.send(b"PASS x") == b"-ERR command not valid in this state\r\n"
    assert dev.send(b"FROB") == b"-ERR unknown command\r\n"
    assert dev.send(b"DELE 1") == b"+OK message 1 deleted\r\n"
    assert dev.send(b"RETR 1") == b"-ERR message 1 already deleted\r\n"
    assert dev.send(b"DELE 1") == b"-ERR message 1 already deleted\r\n"
    assert dev.send(b"NOOP") == b"+OK\r\n"
    assert not dev.closed


def test_overlong_line_split_across_packets_is_discarded_whole() -> None:
    dev = Gateway().connect()
    dev.login()
    dev.proto.dataReceived(b"RETR 1" + b"9" * 5000)
    dev.proto.dataReceived(b"9" * 5000)
    assert dev.read() == b"-ERR command line too long\r\n"
    assert dev.send(b"2\r\nSTAT").startswith(b"+OK 2 ")


def test_wrong_phase_commands() -> None:
    dev = Gateway().connect()
    assert dev.send(b"STAT") == b"-ERR command not valid in this state\r\n"
    assert dev.send(b"PASS x") == b"-ERR send USER first\r\n"


def test_dele_then_quit_commits_exactly_the_marked_messages() -> None:
    gw = Gateway(messages=[MSG1, MSG2, MSG1])
    dev = gw.connect()
    dev.login()
    dev.send(b"DELE 1")
    dev.send(b"DELE 3")
    assert dev.send(b"STAT") == f"+OK 1 {len(MSG2)}\r\n".encode()
    assert dev.send(b"QUIT") == b"+OK bye, 2 messages deleted\r\n"
    assert gw.maildrops[0].committed == [1, 3]
    assert not gw.maildrops[0].aborted
    assert dev.closed


def test_dropped_connection_deletes_nothing() -> None:
    gw = Gateway()
    dev = gw.connect()
    dev.login()
    dev.send(b"DELE 1")
    dev.drop()
    assert gw.maildrops[0].committed is None
    assert gw.maildrops[0].aborted
    # The account is free again for the next session.
    assert gw.connect().login().startswith(b"+OK maildrop")


def test_rset_clears_marks() -> None:
    gw = Gateway()
    dev = gw.connect()
    dev.login()
    dev.send(b"DELE 1")
    assert dev.send(b"RSET").startswith(b"+OK maildrop has 2 messages")
    dev.send(b"QUIT")
    assert gw.maildrops[0].committed == []


def test_bad_logins_look_alike_to_the_device() -> None:
    gw = Gateway()
    dev = gw.connect()
    dev.send(b"USER printer")
    wrong_password = dev.send(b"PASS nope")
    dev.send(b"USER nobody")
    unknown_device = dev.send(b"PASS nobody-pw")
    assert wrong_password == unknown_device == b"-ERR [AUTH] invalid user name or password\r\n"
    elsewhere = gw.connect(peer="192.0.2.9")
    assert elsewhere.login() == wrong_password
    assert not gw.maildrops


def test_failed_login_waits_before_answering() -> None:
    gw = Gateway()
    dev = gw.connect()
    dev.proto.dataReceived(b"USER printer\r\nPASS nope\r\n")
    assert dev.read() == b"+OK send PASS\r\n"
    gw.clock.advance(0.9)
    assert dev.read() == b""
    gw.clock.advance(0.2)
    assert dev.read().startswith(b"-ERR [AUTH]")


def test_three_failures_close_the_connection() -> None:
    dev = Gateway().connect()
    for _ in range(3):
        dev.send(b"USER printer")
        dev.send(b"PASS nope")
    assert dev.closed


class LingeringTransport(TLSRecordingTransport):
    """A TLS peer that never answers the close: the connection stays until aborted."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


def test_a_closed_connection_the_peer_holds_open_is_cut_after_a_grace() -> None:
    """Over TLS a close waits for the peer's close_notify; a peer that never
    sends it must not keep its socket (and slot) for ever."""
    gw = Gateway()
    dev = gw.connect(transport_class=LingeringTransport)
    for _ in range(3):
        dev.send(b"USER printer")
        dev.send(b"PASS nope")
    assert dev.closed
    transport = dev.transport
    assert isinstance(transport, LingeringTransport)
    gw.clock.advance(CLOSE_GRACE - 0.1)
    assert not transport.aborted
    gw.clock.advance(0.2)
    assert transport.aborted


def test_auth_plain_initial_response_and_continuation() -> None:
    gw = Gateway()
    token = base64.b64encode(b"\0printer\0printer-pw")
    dev = gw.connect()
    assert dev.send(b"AUTH PLAIN " + token).startswith(b"+OK maildrop has 2")
    dev.send(b"QUIT")
    dev = gw.connect()
    assert dev.send(b"AUTH PLAIN") == b"+ \r\n"
    assert dev.send(token).startswith(b"+OK maildrop has 2")


def test_auth_plain_cancel_and_garbage() -> None:
    dev = Gateway().connect()
    dev.send(b"AUTH PLAIN")
    assert dev.send(b"*") == b"-ERR authentication cancelled\r\n"
    assert dev.send(b"AUTH PLAIN !!!") == b"-ERR malformed AUTH PLAIN response\r\n"
    assert dev.send(b"AUTH CRAM-MD5").startswith(b"-ERR unsupported")
    assert dev.send(b"AUTH") == b"+OK methods follow\r\nPLAIN\r\n.\r\n"


def test_second_device_on_the_same_account_gets_in_use() -> None:
    gw = Gateway()
    first = gw.connect()
    first.login("printer")
    second = gw.connect()
    assert second.login("copier") == b"-ERR [IN-USE] mailbox in use by another session\r\n"
    assert len(gw.maildrops) == 1
    first.send(b"QUIT")
    assert second.login("copier").startswith(b"+OK maildrop")


def test_two_accounts_for_one_upstream_mailbox_exclude_each_other() -> None:
    gw = Gateway()
    first = gw.connect()
    first.login("printer")
    assert gw.connect().login("fax") == b"-ERR [IN-USE] mailbox in use by another session\r\n"


def test_upstream_errors_map_to_response_codes() -> None:
    gw = Gateway()
    for error, code in [
        (UpstreamRejected("upstream said -ERR [AUTH] bad"), b"SYS/PERM"),
        (UpstreamUnavailable("connection refused"), b"SYS/TEMP"),
        (MailboxInUse("upstream [IN-USE]"), b"IN-USE"),
    ]:
        gw.open_error = error
        reply = gw.connect().login()
        assert reply.startswith(b"-ERR [" + code + b"] ")
        assert b"upstream" not in reply


def test_upstream_drop_mid_message_drops_the_device() -> None:
    big = b"Subject: big\r\n\r\n" + b"x" * 200 + b"\r\n"
    gw = Gateway(messages=[big])
    dev = gw.connect()
    dev.login()
    gw.maildrops[0].fail_after = 100
    out = dev.send(b"RETR 1")
    assert out.startswith(b"+OK message follows\r\n")
    assert not out.endswith(b".\r\n")
    assert dev.transport.disconnected or dev.closed


def test_pipelined_commands_are_answered_in_order() -> None:
    dev = Gateway().connect()
    out = dev.send(b"USER printer", b"PASS printer-pw", b"STAT", b"RETR 2", b"NOOP", b"QUIT")
    replies = out.split(b"\r\n")
    assert replies[0] == b"+OK send PASS"
    assert replies[1].startswith(b"+OK maildrop")
    assert replies[2].startswith(b"+OK 2 ")
    assert replies[3] == b"+OK message follows"
    assert out.endswith(b"line 3\r\n.\r\n+OK\r\n+OK bye, 0 messages deleted\r\n")


def test_idle_timeout_closes_without_commit() -> None:
    gw = Gateway()
    dev = gw.connect()
    dev.login()
    dev.send(b"DELE 1")  # the helper lets 1 s pass after each command
    gw.clock.advance(598)
    assert not dev.closed
    gw.clock.advance(2)
    assert dev.closed
    dev.proto.connectionLost(None)
    assert gw.maildrops[0].aborted and gw.maildrops[0].committed is None


def test_plaintext_listener_refuses_auth_before_stls() -> None:
    gw = Gateway(tls="starttls")
    dev = gw.connect()
    capa = dev.send(b"CAPA")
    assert b"STLS\r\n" in capa and b"USER" not in capa and b"SASL" not in capa
    assert dev.send(b"USER printer") == b"-ERR log in only after STLS\r\n"
    assert dev.send(b"AUTH PLAIN x") == b"-ERR log in only after STLS\r\n"
    # Commands pipelined after STLS in the same packet must not run.
    out = dev.send(b"STLS", b"USER printer", b"PASS printer-pw")
    assert out == b"+OK begin TLS negotiation\r\n"
    assert dev.transport.tls_started_with is gw.tls_marker
    capa = dev.send(b"CAPA")
    assert b"USER\r\n" in capa and b"SASL PLAIN\r\n" in capa and b"STLS" not in capa
    assert dev.send(b"STLS") == b"-ERR TLS already active\r\n"
    assert dev.login().startswith(b"+OK maildrop")


def test_plaintext_auth_when_listener_allows_it() -> None:
    dev = Gateway(tls="starttls", allow_plaintext_auth=True).connect()
    assert dev.login().startswith(b"+OK maildrop")


def test_passwords_never_reach_the_log() -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        gw = Gateway()
        dev = gw.connect()
        dev.send(b"USER printer")
        dev.send(b"PASS hunter2-secret")
        dev.login()
        dev.send(b"QUIT")
        dev.proto.connectionLost(None)
    finally:
        globalLogPublisher.removeObserver(events.append)
    from twisted.logger import formatEvent

    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert "hunter2-secret" not in text and "printer-pw" not in text
    assert "$argon2" not in text
    assert "wrong password" in text
    assert "outcome=quit" in text and "device=printer" in text


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(
        st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        max_size=12,
    ),
    dots=st.lists(st.sampled_from([b".", b"..", b".\r\n", b""]), max_size=12),
    chunk=st.integers(min_value=1, max_value=20),
)
def test_retr_unstuffs_to_the_original(lines: list[bytes], dots: list[bytes], chunk: int) -> None:
    body = b"".join(d + line + b"\r\n" for d, line in zip(dots, lines, strict=False))
    message = b"Subject: x\r\n\r\n" + body
    gw = Gateway(messages=[message])
    dev = gw.connect()
    dev.login()
    gw.maildrops[0].chunk_size = chunk
    out = dev.send(b"RETR 1")
    status, _, rest = out.partition(b"\r\n")
    assert status == b"+OK message follows"
    assert rest.endswith(b"\r\n.\r\n")
    wire = rest[: -len(b".\r\n")]
    assert b"\r\n.\r\n" not in b"\r\n" + wire
    assert unstuff(wire) == message


def test_session_duration_comes_from_the_injected_clock() -> None:
    with captured_log() as text:
        gw = Gateway()
        dev = gw.connect()
        gw.clock.advance(42.25)
        dev.send(b"QUIT")  # and one more second
        dev.proto.connectionLost(None)
    (line,) = [t for t in text if "pop3 session" in t]
    assert "duration=43.250s" in line


def test_a_client_that_never_reads_replies_is_not_read_and_then_closed() -> None:
    gw = Gateway()
    dev = gw.connect(transport_class=UnreadTransport)
    transport = dev.transport
    assert isinstance(transport, UnreadTransport)
    sent = pipeline_until_paused(transport, dev.proto, b"CAPA\r\n")
    # Reading stopped after the first packet; what waits to be sent stays
    # within the transport's buffer plus one reply.
    assert transport.producerState == "paused"
    assert sent == 65536 - 65536 % 6
    assert transport.unread <= 65536 + 200
    # Stuck for less than the deadline, then it reads a little: not closed.
    gw.clock.advance(100)
    assert transport.peer_reads().count(b"+OK capability list follows") > 100
    assert not transport.disconnecting and transport.unread <= 65536 + 200
    gw.clock.advance(100)
    assert not transport.disconnecting
    # Stuck past the deadline: closed, and the session line says why.
    gw.clock.advance(20)
    assert transport.disconnecting
    assert dev.proto.record.outcome == "not reading replies"


def test_a_pipelining_client_that_reads_gets_every_reply() -> None:
    gw = Gateway()
    dev = gw.connect(transport_class=UnreadTransport)
    transport = dev.transport
    assert isinstance(transport, UnreadTransport)
    dev.proto.dataReceived(b"CAPA\r\n" * 3000)
    replies = b""
    while chunk := transport.peer_reads():
        replies += chunk
    assert replies.count(b"+OK capability list follows\r\n") == 3000
    assert replies.endswith(b"IMPLEMENTATION mail-gateway\r\n.\r\n")
    assert transport.producerState == "producing" and not transport.disconnecting
    dev.proto.dataReceived(b"USER printer\r\nPASS printer-pw\r\nSTAT\r\n")
    gw.clock.advance(1)
    assert transport.peer_reads().endswith(b"+OK 2 74\r\n")


def test_paused_output_alone_does_not_stop_reading() -> None:
    # A TLS layer pauses its producer while the handshake is under way, and
    # must go on reading to finish it: reading stops only once a command waits.
    gw = Gateway()
    dev = gw.connect()
    dev.transport.producer.pauseProducing()
    assert dev.transport.producerState == "producing"
    dev.proto.dataReceived(b"CAPA\r\n")
    assert dev.read() == b"" and dev.transport.producerState == "paused"
    dev.transport.producer.resumeProducing()
    assert dev.read().startswith(b"+OK capability list follows\r\n")
    assert dev.transport.producerState == "producing"


INJECTED_NAMES = [
    "ghost from 10.77.77.77: wrong password",
    "x\n2026-12-05T10:00:00+0000 [gateway.pop3#warn] pop3 login refused for device y"
    " from 10.66.66.66: wrong password",
    'q" from 10.55.55.55: wrong password',
    "z\\",
]


def test_an_injected_user_name_cannot_choose_whom_fail2ban_bans() -> None:
    gw = Gateway()
    with captured_log() as text:
        for name in INJECTED_NAMES:
            dev = gw.connect(peer="10.1.2.3")
            dev.send(b"AUTH PLAIN")
            reply = dev.send(base64.b64encode(b"\0" + name.encode() + b"\0pw"))
            assert reply == b"-ERR [AUTH] invalid user name or password\r\n"
    refusals = [line for line in text if "login refused" in line]
    # One line per refusal, each with the real peer, found only by the filter.
    assert len(refusals) == len(INJECTED_NAMES)
    assert all(line.count("\n") == 1 for line in refusals)
    assert all(" from 10.1.2.3: unknown device\n" in line for line in refusals)
    assert fail2ban_hosts("".join(text).splitlines()) == ["10.1.2.3"] * len(INJECTED_NAMES)


def test_quit_over_tls_closes_the_connection() -> None:
    # A TLS transport shuts down only once no producer is registered on it.
    gw = Gateway()
    peer, server, pump = tls_pair(gw.factory, gw.clock)
    proto = server.wrappedProtocol
    assert peer.take() == b"+OK POP3 gateway ready\r\n"
    peer.transport.write(b"CAPA\r\nQUIT\r\n")
    pump.flush()
    assert peer.take().endswith(b".\r\n+OK bye\r\n")
    assert peer.closed and proto.record.outcome == "quit before login"


def test_a_trickled_command_line_is_cut_at_its_deadline() -> None:
    gw = Gateway()
    dev = gw.connect()
    # One byte every 10 s: each resets the idle timer, none ends the line.
    for byte in b"USER printe":
        dev.proto.dataReceived(bytes([byte]))
        gw.clock.advance(5)
        if dev.transport.disconnecting:
            break
        gw.clock.advance(5)
    assert dev.read() == b"-ERR command line not completed in time, closing connection\r\n"
    # Still open 55 s after the first byte (the loop went on), closed by 65 s.
    assert dev.transport.disconnecting and gw.clock.seconds() == 65
    assert dev.proto.record.outcome == "command line not completed in time"


def test_each_line_has_its_own_deadline() -> None:
    gw = Gateway()
    dev = gw.connect()
    dev.proto.dataReceived(b"NO")
    gw.clock.advance(50)
    dev.proto.dataReceived(b"OP\r\nCA")  # the next line starts now: 60 s from here
    gw.clock.advance(50)
    dev.proto.dataReceived(b"PA\r\n")
    gw.clock.advance(59)
    assert not dev.transport.disconnecting
    assert dev.read().endswith(b"IMPLEMENTATION mail-gateway\r\n.\r\n")
    # An overlong line trickled in is cut as well.
    dev.proto.dataReceived(b"X" * 9000)
    gw.clock.advance(60)
    assert dev.transport.disconnecting


@implementer(IPushProducer)
class UpstreamStandIn:
    """The push producer a maildrop registers while it streams a message."""

    def __init__(self) -> None:
        self.state = "producing"

    def pauseProducing(self) -> None:
        self.state = "paused"

    def resumeProducing(self) -> None:
        self.state = "producing"

    def stopProducing(self) -> None:
        self.state = "stopped"


class StreamingMaildrop(MemoryMaildrop):
    """Streams one big message under a producer, then waits for `more`."""

    def __init__(self) -> None:
        super().__init__([b"x" * 100_000 + b"\r\n"])
        self.producer = UpstreamStandIn()
        self.more: Deferred[None] = Deferred()

    async def retrieve(self, msg: int, sink: IConsumer, lines: int | None = None) -> None:
        sink.registerProducer(self.producer, True)
        sink.write(self.messages[0])
        await self.more
        sink.unregisterProducer()


def test_a_device_that_stops_reading_mid_message_pauses_the_upstream_then_is_closed() -> None:
    gw = Gateway()
    drop = StreamingMaildrop()

    async def open_streaming(account: Account) -> StreamingMaildrop:
        return drop

    gw.factory.open_maildrop = open_streaming
    dev = gw.connect(transport_class=UnreadTransport)
    transport = dev.transport
    assert isinstance(transport, UnreadTransport)
    dev.login()
    dev.proto.dataReceived(b"RETR 1\r\n")
    # More than the transport's buffer went out: the upstream is paused with it.
    assert drop.producer.state == "paused"
    assert transport.peer_reads().startswith(b"+OK message follows\r\nxxx")
    assert drop.producer.state == "producing"
    transport.write(b"y" * 70_000)  # stuck again, and for good
    assert drop.producer.state == "paused"
    gw.clock.advance(120)
    assert transport.disconnecting and dev.proto.record.outcome == "not reading replies"
    dev.proto.connectionLost(None)
    assert drop.aborted and drop.committed is None
