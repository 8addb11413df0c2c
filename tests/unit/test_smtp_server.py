"""The device-facing ESMTP state machine, on in-memory transports with a fake clock."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from gateway.devices import DeviceAuthenticator
from gateway.model import ANY_ADDRESS, Account, Device, Endpoint, Listener, Provider, Secret
from gateway.smtp.server import SMTPServerFactory
from gateway.smtp.spool import QueueEntry, Spool, SpoolDir
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


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class Gateway:
    """One SMTP front end with a spool in `tmp_path`, in memory otherwise."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        tls: str = "implicit",
        allow_plaintext_auth: bool = False,
        account: Account | None = None,
        max_size: int = 100_000,
        max_recipients: int = 3,
    ) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_700_000_000)
        self.queued: list[QueueEntry] = []
        devices = {
            "printer": Device(
                name="printer",
                password_hash=Secret(FAST_HASHER.hash("printer-pw")),
                account="scanner",
                allow_from=(ipaddress.ip_network("10.0.0.0/8"),),
            ),
            "copier": Device(
                name="copier",
                password_hash=Secret(FAST_HASHER.hash("copier-pw")),
                account="scanner",
                allow_from=(ipaddress.ip_network("192.168.7.0/24"),),
                relay_without_auth=True,
            ),
            "careless": Device(
                name="careless",
                password_hash=Secret(FAST_HASHER.hash("careless-pw")),
                account="scanner",
                allow_from=ANY_ADDRESS,
                relay_without_auth=True,
            ),
            "popper": Device(
                name="popper",
                password_hash=Secret(FAST_HASHER.hash("popper-pw")),
                account="scanner",
                protocols=frozenset({"pop3"}),
            ),
        }
        self.account = account or Account(
            "scanner",
            "corp",
            "scanner@example.com",
            allowed_senders=("*@scan.example.com",),
        )
        self.tls_marker = object()
        self.spool = Spool(SpoolDir(tmp_path / "spool").prepare(), run_in_thread=run_now)
        self.factory = SMTPServerFactory(
            listener=Listener(
                "smtp",
                587 if tls == "starttls" else 465,
                tls,  # type: ignore[arg-type]
                allow_plaintext_auth=allow_plaintext_auth,
            ),
            tls_options=self.tls_marker if tls == "starttls" else None,  # type: ignore[arg-type]
            authenticator=DeviceAuthenticator(devices, run_in_thread=run_now),
            devices=devices,
            accounts={"scanner": self.account},
            providers={"corp": Provider("corp", smtp=Endpoint("smtp.example.com", 587))},
            spool=self.spool,
            on_queued=self.queued.append,
            clock=self.clock,
            hostname="gw.test",
            max_message_size=max_size,
            max_recipients=max_recipients,
        )

    def connect(
        self,
        peer: str = "10.1.2.3",
        transport_class: type[TLSRecordingTransport] = TLSRecordingTransport,
    ) -> Client:
        proto, transport = connect_in_memory(self.factory, peer, transport_class)
        client = Client(proto, transport, self.clock)
        assert client.read() == b"220 gw.test ESMTP mail gateway ready\r\n"
        return client

    def message(self, entry: QueueEntry) -> bytes:
        with self.spool.dir.open_message(entry) as f:
            return f.read(entry.envelope.size)


class Client:
    def __init__(self, proto: Any, transport: TLSRecordingTransport, clock: MemoryReactorClock):
        self.proto, self.transport, self.clock = proto, transport, clock

    def read(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def raw(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        self.clock.advance(1.0)  # any failed-login pause
        return self.read()

    def send(self, *lines: bytes) -> bytes:
        return self.raw(b"".join(line + b"\r\n" for line in lines))

    def codes(self, *lines: bytes) -> list[bytes]:
        return [line[:3] for line in self.send(*lines).splitlines() if line[3:4] == b" "]

    def login(self, name: str = "printer") -> None:
        self.send(b"EHLO dev.local")
        reply = self.send(
            b"AUTH PLAIN " + b64(b"\0" + name.encode() + b"\0" + name.encode() + b"-pw")
        )
        assert reply.startswith(b"235 2.7.0"), reply

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


@pytest.fixture
def gw(tmp_path: Path) -> Gateway:
    return Gateway(tmp_path)


def test_ehlo_lists_extensions_on_implicit_tls(gw: Gateway) -> None:
    reply = gw.connect().send(b"EHLO printer.local")
    assert reply.splitlines() == [
        b"250-gw.test greets printer.local",
        b"250-PIPELINING",
        b"250-SIZE 100000",
        b"250-8BITMIME",
        b"250-ENHANCEDSTATUSCODES",
        b"250-AUTH PLAIN LOGIN",
        b"250 HELP",
    ]


def test_starttls_listener_hides_auth_until_tls(tmp_path: Path) -> None:
    gw = Gateway(tmp_path, tls="starttls")
    client = gw.connect()
    reply = client.send(b"EHLO printer.local")
    assert b"STARTTLS" in reply and b"AUTH" not in reply
    assert client.send(b"AUTH PLAIN " + b64(b"\0printer\0printer-pw")).startswith(b"538 5.7.11")
    assert client.send(b"MAIL FROM:<a@scan.example.com>").startswith(b"550 5.7.1")


def test_plaintext_auth_when_the_listener_allows(tmp_path: Path) -> None:
    gw = Gateway(tmp_path, tls="starttls", allow_plaintext_auth=True)
    client = gw.connect()
    assert b"AUTH PLAIN LOGIN" in client.send(b"EHLO x")
    client.login()


def test_starttls_discards_pipelined_plaintext_and_resets(tmp_path: Path) -> None:
    gw = Gateway(tmp_path, tls="starttls", allow_plaintext_auth=True)
    client = gw.connect()
    client.login()
    # The injection: commands after STARTTLS in the same packet.
    reply = client.raw(b"STARTTLS\r\nMAIL FROM:<a@scan.example.com>\r\nRCPT TO:<v@example.org>\r\n")
    assert reply == b"220 2.0.0 ready to start TLS\r\n"
    assert client.transport.tls_started_with is gw.tls_marker
    # Session forgotten: no EHLO, no AUTH.
    assert client.send(b"MAIL FROM:<a@scan.example.com>").startswith(b"503 5.5.1")
    reply = client.send(b"EHLO again")
    assert b"STARTTLS" not in reply and b"AUTH PLAIN LOGIN" in reply
    assert client.send(b"MAIL FROM:<a@scan.example.com>").startswith(b"550 5.7.1")
    assert client.send(b"STARTTLS").startswith(b"503 5.5.1")


def test_auth_plain_and_login(gw: Gateway) -> None:
    client = gw.connect()
    client.send(b"EHLO x")
    assert client.send(b"AUTH PLAIN").startswith(b"334 ")
    assert client.send(b64(b"\0printer\0printer-pw")).startswith(b"235")
    assert client.send(b"AUTH PLAIN x").startswith(b"503 5.5.1")

    client = gw.connect()
    client.send(b"EHLO x")
    assert client.send(b"AUTH LOGIN") == b"334 VXNlcm5hbWU6\r\n"
    assert client.send(b64(b"printer")) == b"334 UGFzc3dvcmQ6\r\n"
    assert client.send(b64(b"printer-pw")).startswith(b"235 2.7.0")

    client = gw.connect()
    client.send(b"EHLO x")
    assert client.send(b"AUTH LOGIN " + b64(b"printer")) == b"334 UGFzc3dvcmQ6\r\n"
    assert client.send(b64(b"printer-pw")).startswith(b"235")


def test_auth_failures_pause_then_close(gw: Gateway) -> None:
    client = gw.connect()
    client.send(b"EHLO x")
    client.proto.dataReceived(b"AUTH PLAIN " + b64(b"\0printer\0wrong") + b"\r\n")
    assert client.read() == b""  # the pause
    client.clock.advance(1.0)
    assert client.read().startswith(b"535 5.7.8")
    assert client.send(b"AUTH LOGIN " + b64(b"nobody"), b64(b"x")).endswith(
        b"535 5.7.8 authentication credentials invalid\r\n"
    )
    reply = client.send(b"AUTH PLAIN " + b64(b"\0popper\0popper-pw"))  # no smtp for it
    assert reply.startswith(b"535") and b"421 4.7.0" in reply
    assert client.closed


def test_auth_cancel_and_garbage(gw: Gateway) -> None:
    client = gw.connect()
    client.send(b"EHLO x")
    client.send(b"AUTH LOGIN")
    assert client.send(b"*").startswith(b"501 5.0.0")
    assert client.send(b"AUTH PLAIN !!!").startswith(b"501 5.5.2")
    assert client.send(b"AUTH PLAIN " + b64(b"no-nuls")).startswith(b"501")
    assert client.send(b"AUTH CRAM-MD5").startswith(b"504")
    assert not client.closed


def test_pipelined_transaction_is_spooled_byte_for_byte(gw: Gateway) -> None:
    client = gw.connect()
    client.login()
    body = b"Subject: hi\r\n\r\n.leading dot\r\n..two\r\n.\xe9\r\nend\r\n"
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    reply = client.raw(
        b"MAIL FROM:<Printer@Scan.Example.com> BODY=8BITMIME SIZE=100\r\n"
        b"RCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
    )
    assert reply == (
        b"250 2.1.0 sender OK\r\n250 2.1.5 recipient OK\r\n250 2.1.5 recipient OK\r\n"
        b"354 end data with <CR><LF>.<CR><LF>\r\n"
    )
    reply = client.raw(stuffed + b".\r\nQUIT\r\n")
    assert reply.startswith(b"250 2.0.0 OK queued as ") and reply.endswith(b"221 2.0.0 bye\r\n")
    [entry] = gw.queued
    assert gw.message(entry) == body
    env = entry.envelope
    assert env.original_sender == env.sender == "Printer@Scan.Example.com"
    assert env.recipients == ("a@example.org", "b@example.org")
    assert (env.device, env.account, env.identified_by) == ("printer", "scanner", "password")
    assert env.eight_bit and env.body == "8BITMIME" and env.size == len(body)
    assert entry.id.encode() in reply
    assert gw.spool.dir.scan()[0].envelope == env
    assert list(gw.spool.dir.tmp.iterdir()) == []


def test_network_device_relays_without_auth(gw: Gateway) -> None:
    client = gw.connect(peer="192.168.7.20")
    assert client.codes(
        b"HELO printer", b"MAIL FROM:<copier@scan.example.com>", b"RCPT TO:<x@example.org>", b"DATA"
    ) == [b"250", b"250", b"250", b"354"]
    assert client.send(b"hi", b".").startswith(b"250 2.0.0")
    assert gw.queued[0].envelope.device == "copier"
    assert gw.queued[0].envelope.identified_by == "network"


def test_stranger_and_any_address_device_are_refused(gw: Gateway) -> None:
    # "careless" has relay_without_auth with allow_from = everything: ignored.
    client = gw.connect(peer="203.0.113.9")
    client.send(b"EHLO x")
    assert client.send(b"MAIL FROM:<a@scan.example.com>").startswith(b"550 5.7.1 relaying denied")
    assert client.send(b"RCPT TO:<x@example.org>").startswith(b"503")
    assert client.send(b"DATA").startswith(b"503")
    assert gw.queued == []


def test_sender_policy(gw: Gateway) -> None:
    client = gw.connect()
    client.login()
    assert client.send(b"MAIL FROM:<boss@example.com>").startswith(b"550 5.7.1 sender")
    assert client.send(b"MAIL FROM:<>").startswith(b"550 5.7.1")
    assert client.send(b"MAIL FROM:<scanner@example.com>").startswith(b"250")
    client.send(b"RSET")
    assert client.send(b"MAIL FROM:<x@SCAN.example.com>").startswith(b"250")


def test_sender_and_from_header_rewrite(tmp_path: Path) -> None:
    account = Account(
        "scanner",
        "corp",
        "scanner@example.com",
        allowed_senders=("*@scan.example.com",),
        rewrite_sender=True,
        rewrite_from_header=True,
    )
    gw = Gateway(tmp_path, account=account)
    client = gw.connect()
    client.login()
    client.send(b"MAIL FROM:<floor3@scan.example.com>", b"RCPT TO:<x@example.org>", b"DATA")
    body = b'From: "Floor 3" <floor3@scan.example.com>\r\nSubject: s\r\n\r\nFrom: body\r\n'
    assert client.send(body + b".").startswith(b"250")
    [entry] = gw.queued
    assert entry.envelope.original_sender == "floor3@scan.example.com"
    assert entry.envelope.sender == "scanner@example.com"
    assert gw.message(entry) == (
        b"From: Floor 3 <scanner@example.com>\r\nSubject: s\r\n\r\nFrom: body\r\n"
    )
    # With rewriting, the null sender becomes the account too.
    assert client.send(b"MAIL FROM:<>").startswith(b"250")


def test_size_limits(tmp_path: Path) -> None:
    gw = Gateway(tmp_path, max_size=1000)
    client = gw.connect()
    client.login()
    assert client.send(b"MAIL FROM:<a@scan.example.com> SIZE=1001").startswith(b"552 5.3.4")
    client.send(b"MAIL FROM:<a@scan.example.com>", b"RCPT TO:<x@example.org>", b"DATA")
    reply = client.send(b"x" * 500, b"RSET", b"MAIL FROM:<evil@x>", b"x" * 600, b".")
    assert reply.startswith(b"552 5.3.4") and reply.count(b"\r\n") == 1
    assert gw.queued == [] and list(gw.spool.dir.tmp.iterdir()) == []
    assert client.send(b"NOOP") == b"250 2.0.0 OK\r\n"


def test_overlong_data_line_keeps_framing(gw: Gateway) -> None:
    # `long_lines = "refuse"`; folding (the default) is tests/unit/test_smtp_folding.py.
    gw.factory.long_lines = "refuse"
    client = gw.connect()
    client.login()
    client.send(b"MAIL FROM:<a@scan.example.com>", b"RCPT TO:<x@example.org>", b"DATA")
    reply = client.raw(b"A" * 20_000 + b"\r\nQUIT\r\nMAIL FROM:<b@scan.example.com>\r\n")
    assert reply == b""
    reply = client.send(b"RCPT TO:<y@example.org>", b"DATA", b".")
    assert reply == (
        b"554 5.6.0 message has a line longer than 998 octets (RFC 5321 4.5.3.1.6)\r\n"
    )
    assert not client.closed and gw.queued == []
    assert client.send(b"NOOP").startswith(b"250")


def test_a_998_octet_line_is_fine(gw: Gateway) -> None:
    client = gw.connect()
    client.login()
    client.send(b"MAIL FROM:<a@scan.example.com>", b"RCPT TO:<x@example.org>", b"DATA")
    line = b"." + b"y" * 997
    assert client.send(b"." + line, b".").startswith(b"250")
    assert gw.message(gw.queued[0]) == line + b"\r\n"


def test_recipient_limit_and_duplicates(gw: Gateway) -> None:
    client = gw.connect()
    client.login()
    client.send(b"MAIL FROM:<a@scan.example.com>")
    codes = client.codes(*(b"RCPT TO:<r%d@example.org>" % i for i in (1, 2, 2, 3, 4)))
    assert codes == [b"250", b"250", b"250", b"250", b"452"]
    client.send(b"DATA", b"x", b".")
    assert gw.queued[0].envelope.recipients == (
        "r1@example.org",
        "r2@example.org",
        "r3@example.org",
    )


def test_sequence_errors_and_polite_refusals(gw: Gateway) -> None:
    client = gw.connect()
    assert client.send(b"MAIL FROM:<a@b.example>").startswith(b"503 5.5.1 send EHLO")
    assert client.send(b"FOO").startswith(b"500 5.5.2")
    assert client.send(b"VRFY postmaster").startswith(b"252 2.5.2")
    assert client.send(b"EHLO").startswith(b"501")
    client.login()
    assert client.send(b"RCPT TO:<x@example.org>").startswith(b"503 5.5.1 send MAIL")
    client.send(b"MAIL FROM:<a@scan.example.com>")
    assert client.send(b"MAIL FROM:<a@scan.example.com>").startswith(b"503 5.5.1 nested")
    assert client.send(b"DATA").startswith(b"554 5.5.1 no valid recipients")
    assert client.send(b"AUTH PLAIN x").startswith(b"503")
    assert client.send(b"RCPT TO:<x@example.org> NOTIFY=NEVER").startswith(b"555")
    assert client.send(b"MAIL FROM:<a@b.example> FOO=1").startswith(b"503")
    client.send(b"RSET")
    assert client.send(b"MAIL FROM:<a@scan.example.com> FOO=1").startswith(b"555 5.5.4")


def test_too_many_errors_close(gw: Gateway) -> None:
    client = gw.connect()
    reply = client.send(*([b"BOGUS"] * 25))
    assert reply.count(b"500 5.5.2") == 20 and reply.endswith(
        b"421 4.7.0 too many errors, closing connection\r\n"
    )
    assert client.closed


def test_idle_timeout(gw: Gateway) -> None:
    client = gw.connect()
    client.clock.advance(301)
    assert client.read().startswith(b"421 4.4.2")


def test_drop_during_data_keeps_nothing(gw: Gateway) -> None:
    gw.factory.max_message_size = 10_000_000
    client = gw.connect()
    client.login()
    client.send(b"MAIL FROM:<a@scan.example.com>", b"RCPT TO:<x@example.org>", b"DATA")
    client.send(b"partial")
    assert list(gw.spool.dir.tmp.iterdir()) == []  # small messages stay in memory
    client.send(*[b"y" * 900] * 400)  # larger ones spill to tmp/ as they arrive
    assert len(list(gw.spool.dir.tmp.iterdir())) == 1
    client.proto.connectionLost(None)
    assert list(gw.spool.dir.tmp.iterdir()) == [] and gw.queued == []


def test_a_large_message_is_spooled_whole(gw: Gateway) -> None:
    gw.factory.max_message_size = 10_000_000
    client = gw.connect()
    client.login()
    client.send(b"MAIL FROM:<a@scan.example.com>", b"RCPT TO:<x@example.org>", b"DATA")
    lines = [b"%06d " % i + b"z" * 70 for i in range(20_000)]
    assert client.send(*lines, b".").startswith(b"250")
    assert gw.message(gw.queued[0]) == b"".join(line + b"\r\n" for line in lines)


def test_session_duration_comes_from_the_injected_clock(gw: Gateway) -> None:
    with captured_log() as text:
        client = gw.connect()
        gw.clock.advance(42.25)
        client.send(b"QUIT")  # and one more second
        client.proto.connectionLost(None)
    (line,) = [t for t in text if "smtp session" in t]
    assert "duration=43.250s" in line


@pytest.mark.parametrize("command", [b"NOOP\r\n", b"EHLO x\r\n"])
def test_a_client_that_never_reads_replies_is_not_read_and_then_closed(
    gw: Gateway, command: bytes
) -> None:
    client = gw.connect(transport_class=UnreadTransport)
    transport = client.transport
    assert isinstance(transport, UnreadTransport)
    sent = pipeline_until_paused(transport, client.proto, command)
    assert transport.producerState == "paused"
    assert sent <= 65536
    # The transport's buffer plus one batch of replies at most.
    assert transport.unread <= 65536 + 64 * 200
    gw.clock.advance(100)
    assert len(transport.peer_reads()) > 65536
    assert not transport.disconnecting
    gw.clock.advance(100)
    assert not transport.disconnecting
    gw.clock.advance(20)
    assert transport.disconnecting
    assert client.proto.record.outcome == "not reading replies"


def test_a_pipelining_client_that_reads_gets_every_reply(gw: Gateway) -> None:
    client = gw.connect(transport_class=UnreadTransport)
    transport = client.transport
    assert isinstance(transport, UnreadTransport)
    client.proto.dataReceived(b"EHLO x\r\n" + b"NOOP\r\n" * 10000)
    replies = b""
    while chunk := transport.peer_reads():
        replies += chunk
    assert replies.count(b"250 2.0.0 OK\r\n") == 10000
    assert transport.producerState == "producing" and not transport.disconnecting
    client.proto.dataReceived(b"QUIT\r\n")
    assert transport.peer_reads() == b"221 2.0.0 bye\r\n"


INJECTED_NAMES = [
    "ghost from 10.77.77.77: wrong password",
    "x\r\n2026-12-05T10:00:00+0000 [gateway.smtp#warn] smtp login refused for device y"
    " from 10.66.66.66: wrong password",
    'q" from 10.55.55.55: wrong password',
]


def test_an_injected_user_name_cannot_choose_whom_fail2ban_bans(gw: Gateway) -> None:
    with captured_log() as text:
        for name in INJECTED_NAMES:
            client = gw.connect(peer="10.1.2.3")
            client.send(b"EHLO x")
            plain = client.send(b"AUTH PLAIN " + b64(b"\0" + name.encode() + b"\0pw"))
            assert plain.startswith(b"535 5.7.8")
            client.send(b"AUTH LOGIN " + b64(name.encode()))
            assert client.send(b64(b"pw")).startswith(b"535 5.7.8")
    refusals = [line for line in text if "login refused" in line]
    assert len(refusals) == 2 * len(INJECTED_NAMES)
    assert all(line.count("\n") == 1 for line in refusals)
    assert all(" from 10.1.2.3: unknown device\n" in line for line in refusals)
    assert fail2ban_hosts("".join(text).splitlines()) == ["10.1.2.3"] * len(refusals)


def test_a_peer_supplied_sender_is_quoted_in_the_log(gw: Gateway) -> None:
    client = gw.connect()
    client.login()
    with captured_log() as text:
        reply = client.send(b'MAIL FROM:<"x\\" y"@other.example.com>')
    assert reply.startswith(b"550 5.7.1")
    (line,) = [line for line in text if "smtp sender" in line]
    assert 'smtp sender <"\\"x\\\\\\" y\\"@other.example.com"> refused' in line


def test_quit_over_tls_closes_the_connection(gw: Gateway) -> None:
    # A TLS transport shuts down only once no producer is registered on it.
    peer, server, pump = tls_pair(gw.factory, gw.clock)
    proto = server.wrappedProtocol
    assert peer.take() == b"220 gw.test ESMTP mail gateway ready\r\n"
    peer.transport.write(b"EHLO x\r\nQUIT\r\n")
    pump.flush()
    assert peer.take().endswith(b"221 2.0.0 bye\r\n")
    assert peer.closed and proto.record.outcome == "quit"


def test_a_trickled_command_line_is_cut_at_its_deadline(gw: Gateway) -> None:
    client = gw.connect()
    for byte in b"EHLO printer.loc":
        client.proto.dataReceived(bytes([byte]))
        gw.clock.advance(5)
        if client.closed:
            break
        gw.clock.advance(5)
    assert client.read() == (
        b"421 4.4.2 command line not completed in time, closing connection\r\n"
    )
    assert client.closed and client.proto.record.outcome == "command line not completed in time"


def test_message_data_and_quick_lines_have_no_line_deadline(gw: Gateway) -> None:
    client = gw.connect()
    client.login()
    client.send(b"MAIL FROM:<a@scan.example.com>", b"RCPT TO:<b@example.org>")
    assert client.send(b"DATA").startswith(b"354")
    # Message data may come slowly: only the idle timer (300 s) applies to it.
    for _ in range(5):
        client.proto.dataReceived(b"Subject: slow")
        gw.clock.advance(50)
    client.proto.dataReceived(b"\r\n\r\nbody\r\n.\r\n")
    assert client.read().startswith(b"250 2.0.0 OK queued as")
    assert not client.closed


def test_a_long_auth_initial_response_is_accepted(gw: Gateway) -> None:
    client = gw.connect()
    client.send(b"EHLO x")
    # RFC 4954 allows 12288 octets: a long password fits in the initial response.
    response = b64(b"\0printer\0" + b"p" * 9000)
    assert len(b"AUTH PLAIN " + response + b"\r\n") > 12000
    assert client.send(b"AUTH PLAIN " + response).startswith(b"535 5.7.8")
    assert client.send(b"AUTH PLAIN " + b64(b"\0printer\0printer-pw")).startswith(b"235")
    # Beyond 12288 octets, and any other command beyond 512, is too long.
    assert client.send(b"AUTH PLAIN " + b"A" * 12300).startswith(b"500 5.5.6")
    assert client.send(b"NOOP " + b"x" * 600).startswith(b"500 5.5.2 line too long")
