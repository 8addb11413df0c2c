"""The upstream POP3 client and maildrop, on in-memory connections with a fake clock.

Most tests script the upstream by hand on a `StringTransport` (the test is
the server: it checks each command byte for byte and answers it). STLS is
recorded, not performed, there; the implicit-TLS tests run real OpenSSL in
memory through `iosim` against a small fake POP3 server.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import (
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim

from gateway.maildrop import (
    MailboxInUse,
    MaildropError,
    NoSuchMessage,
    UpstreamLost,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.maildrop.pop3 import POP3Maildrop, open_pop3_maildrop
from gateway.model import Account, Endpoint, Listener, Provider, Secret, TLSFiles
from gateway.tls import load_server_identity, server_context_factory
from gateway.upstream.pop3 import POP3Client, ServerError, Status
from gateway.upstream.sasl import OAuthBearer, Plain, XOAuth2
from tests.harness.certs import TLSMaterial, make_tls_material
from tests.helpers.upstream import (
    ScriptedUpstream,
    UpstreamTransport,
    failed,
    pending,
    succeeded,
    unhandled_errors,
)

TIMEOUT = 10.0
PASSWORD = "s3cret-Pa55"
ACCOUNT = Account(
    "shop", provider="example", username="shop@example.test", password=Secret(PASSWORD)
)
PLAIN_IR = base64.b64encode(f"\0shop@example.test\0{PASSWORD}".encode())


def provider(**overrides: Any) -> Provider:
    settings: dict[str, Any] = {
        "name": "example",
        "pop3": Endpoint("pop.example.test", 110, "starttls"),
        "timeout": TIMEOUT,
        "pop3_auth": "auto",
    }
    settings.update(overrides)
    return Provider(**settings)


# --- harness ---------------------------------------------------------------------------


no_unhandled_errors = pytest.fixture(autouse=True)(unhandled_errors)


class Upstream(ScriptedUpstream):
    """The far end of one in-memory POP3 connection, played by the test."""

    client = POP3Client
    port = 110
    protocol: POP3Client | None

    def open(self, prov: Provider | None = None, account: Account = ACCOUNT) -> Deferred[Any]:
        return Deferred.fromCoroutine(
            open_pop3_maildrop(
                account,
                prov or provider(),
                reactor=self.clock,
                endpoint_factory=self.endpoint_factory,
            )
        )

    def log_in(
        self,
        capa: bytes = b"SASL PLAIN\r\nUIDL\r\n",
        listing: bytes = b"1 120\r\n2 2000\r\n3 30\r\n",
    ) -> POP3Maildrop:
        """Run a whole STLS + AUTH PLAIN + LIST opening; return the maildrop."""
        d = self.open()
        self.say(b"+OK Dovecot ready.\r\n")
        self.expect(b"CAPA\r\n", b"+OK\r\nSTLS\r\n" + capa + b".\r\n")
        self.expect(b"STLS\r\n", b"+OK Begin TLS negotiation now.\r\n")
        self.expect(b"CAPA\r\n", b"+OK\r\n" + capa + b".\r\n")
        auth = b"AUTH PLAIN " + PLAIN_IR + b"\r\n"
        listed = b"+OK 3 messages\r\n" + listing + b".\r\n"
        if b"PIPELINING" in capa:
            # RFC 2449: the LIST goes out with the login, in one write.
            self.expect(auth + b"LIST\r\n", b"+OK Logged in.\r\n" + listed)
        else:
            self.expect(auth, b"+OK Logged in.\r\n")
            self.expect(b"LIST\r\n", listed)
        maildrop = succeeded(d)
        assert isinstance(maildrop, POP3Maildrop)
        return maildrop


class Sink(StringTransport):
    """The device side: an IConsumer that can push back."""


# --- connecting and TLS ---------------------------------------------------------------


def test_open_over_stls_with_plain_auth_takes_the_list_snapshot() -> None:
    up = Upstream()
    maildrop = up.log_in()
    assert maildrop.sizes == (120, 2000, 30)
    assert up.connected_to == ("pop.example.test", 110, TIMEOUT)
    # TLS started right after STLS's +OK, before anything else was written.
    assert up.transport.tls_options is not None
    assert up.transport.written_before_tls == b""
    assert up.transport.no_delay is True
    assert up.clock.getDelayedCalls() == []


def test_nothing_is_sent_before_the_greeting() -> None:
    up = Upstream()
    d = up.open()
    assert up.sent() == b""
    up.say(b"+OK ready\r\n")
    assert up.sent() == b"CAPA\r\n"
    pending(d)
    up.protocol.abort()  # type: ignore[union-attr]
    failed(d, UpstreamUnavailable)


@pytest.mark.parametrize(
    ("capa", "stls_answer"),
    [
        (b"+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n", None),  # not offered
        (b"-ERR unknown command\r\n", None),  # no CAPA at all
        (b"+OK\r\nSTLS\r\n.\r\n", b"-ERR TLS not available\r\n"),  # refused
    ],
)
def test_no_stls_means_no_login_in_clear(capa: bytes, stls_answer: bytes | None) -> None:
    up = Upstream()
    d = up.open()
    up.say(b"+OK ready\r\n")
    up.expect(b"CAPA\r\n", capa)
    if stls_answer is not None:
        up.expect(b"STLS\r\n", stls_answer)
    error = failed(d, UpstreamUnavailable)
    assert "STLS" in error.detail
    assert up.sent() == b""
    assert up.transport.tls_options is None
    assert up.aborted
    assert up.clock.getDelayedCalls() == []


def test_bytes_after_stls_answer_are_treated_as_injection() -> None:
    up = Upstream()
    d = up.open()
    up.say(b"+OK ready\r\n")
    up.expect(b"CAPA\r\n", b"+OK\r\nSTLS\r\n.\r\n")
    up.expect(b"STLS\r\n", b"+OK go ahead\r\n+OK\r\nSASL PLAIN\r\n.\r\n")
    error = failed(d, UpstreamUnavailable)
    assert "after the STLS answer" in error.detail
    assert up.transport.tls_options is None
    assert up.sent() == b""
    assert up.aborted


@pytest.mark.parametrize(
    "greeting", [b"-ERR [SYS/TEMP] too many connections\r\n", b"* OK IMAP4rev1 ready\r\n"]
)
def test_bad_greeting(greeting: bytes) -> None:
    up = Upstream()
    d = up.open()
    up.say(greeting)
    failed(d, UpstreamUnavailable)
    assert up.sent() == b""
    assert up.aborted


@pytest.mark.parametrize(
    "error", [ConnectionRefusedError(), DNSLookupError("no such host"), OSError("unreachable")]
)
def test_connect_failures_are_unavailable(error: Exception) -> None:
    up = Upstream(connecting=fail(error))
    failure = failed(up.open(), UpstreamUnavailable)
    assert "pop.example.test:110" in failure.detail
    assert up.clock.getDelayedCalls() == []


def test_connect_timeout() -> None:
    cancelled: list[bool] = []
    up = Upstream(connecting=Deferred(lambda d: cancelled.append(True)))
    d = up.open()
    up.clock.advance(TIMEOUT - 0.5)
    pending(d)
    up.clock.advance(0.5)
    error = failed(d, UpstreamUnavailable)
    assert "no connection within" in error.detail
    assert cancelled == [True]
    assert up.clock.getDelayedCalls() == []


def test_missing_pop3_endpoint_or_unreadable_ca_file(tmp_path: Path) -> None:
    up = Upstream()
    failed(up.open(provider(pop3=None)), UpstreamUnavailable)
    error = failed(up.open(provider(ca_file=tmp_path / "missing.pem")), UpstreamUnavailable)
    assert "missing.pem" in error.detail
    assert up.protocol is None


# --- logging in -----------------------------------------------------------------------


def _reach_login(up: Upstream, prov: Provider, capa: bytes) -> Deferred[Any]:
    d = up.open(prov)
    up.say(b"+OK ready\r\n")
    up.expect(b"CAPA\r\n", b"+OK\r\nSTLS\r\n.\r\n")
    up.expect(b"STLS\r\n", b"+OK\r\n")
    up.expect(b"CAPA\r\n", b"+OK\r\n" + capa + b".\r\n")
    return d


USER_PASS = b"USER shop@example.test\r\n"


@pytest.mark.parametrize(
    ("method", "capa", "first"),
    [
        ("auto", b"SASL PLAIN LOGIN\r\n", b"AUTH PLAIN " + PLAIN_IR + b"\r\n"),
        ("auto", b"SASL LOGIN\r\nUSER\r\n", USER_PASS),
        ("auto", b"", USER_PASS),
        ("user", b"SASL PLAIN\r\n", USER_PASS),
        ("plain", b"", b"AUTH PLAIN " + PLAIN_IR + b"\r\n"),
    ],
)
def test_login_methods(method: str, capa: bytes, first: bytes) -> None:
    up = Upstream()
    d = _reach_login(up, provider(pop3_auth=method), capa)
    if first == USER_PASS:
        up.expect(USER_PASS, b"+OK\r\n")
        up.expect(f"PASS {PASSWORD}\r\n".encode(), b"+OK Logged in.\r\n")
    else:
        up.expect(first, b"+OK Logged in.\r\n")
    up.expect(b"LIST\r\n", b"+OK\r\n.\r\n")
    assert succeeded(d).sizes == ()


def test_auth_plain_too_long_for_one_line_waits_for_the_empty_challenge() -> None:
    account = Account("a", "example", "u" * 200, password=Secret("p" * 40))
    up = Upstream()
    d = up.open(provider(pop3_auth="plain"), account=account)
    up.say(b"+OK ready\r\n")
    up.expect(b"CAPA\r\n", b"+OK\r\nSTLS\r\n.\r\n")
    up.expect(b"STLS\r\n", b"+OK\r\n")
    up.expect(b"CAPA\r\n", b"+OK\r\n.\r\n")
    up.expect(b"AUTH PLAIN\r\n", b"+ \r\n")
    ir = base64.b64encode(b"\0" + b"u" * 200 + b"\0" + b"p" * 40)
    up.expect(ir + b"\r\n", b"+OK\r\n")
    up.expect(b"LIST\r\n", b"+OK\r\n1 5\r\n.\r\n")
    assert succeeded(d).sizes == (5,)


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (b"-ERR [AUTH] Authentication failed.\r\n", UpstreamRejected),
        (b"-ERR Authentication failed.\r\n", UpstreamRejected),
        (b"-ERR [SYS/PERM] account disabled\r\n", UpstreamRejected),
        (b"-ERR [IN-USE] Mailbox is locked by another POP3 session\r\n", MailboxInUse),
        (b"-ERR [SYS/TEMP] Temporary authentication failure\r\n", UpstreamUnavailable),
        (b"-ERR [LOGIN-DELAY] wait\r\n", UpstreamUnavailable),
    ],
)
@pytest.mark.parametrize("method", ["plain", "user"])
def test_login_refusals(answer: bytes, kind: type[MaildropError], method: str) -> None:
    up = Upstream()
    d = _reach_login(up, provider(pop3_auth=method), b"SASL PLAIN\r\n")
    if method == "user":
        up.expect(USER_PASS, b"+OK\r\n")
    up.sent()
    up.say(answer)
    error = failed(d, kind)
    # Upstream words go to the log detail, never to the device; no secret anywhere.
    upstream_words = answer.decode().split("] ")[-1].strip()
    assert upstream_words in error.detail
    assert upstream_words not in str(error)
    assert str(error) == kind.device_text
    for text in (error.detail, str(error), repr(error)):
        assert PASSWORD not in text
        assert PLAIN_IR.decode() not in text
    assert up.aborted
    assert up.clock.getDelayedCalls() == []


def test_user_refused_stops_before_pass() -> None:
    up = Upstream()
    d = _reach_login(up, provider(pop3_auth="user"), b"")
    up.expect(USER_PASS, b"-ERR [AUTH] Plaintext authentication disallowed\r\n")
    failed(d, UpstreamRejected)
    assert up.sent() == b""


def test_credentials_that_would_break_the_command_line_are_not_sent() -> None:
    account = Account("a", "example", "shop", password=Secret("evil\r\nDELE 1"))
    up = Upstream()
    d = up.open(provider(pop3_auth="user"), account=account)
    up.say(b"+OK\r\n")
    up.expect(b"CAPA\r\n", b"+OK\r\nSTLS\r\n.\r\n")
    up.expect(b"STLS\r\n", b"+OK\r\n")
    up.expect(b"CAPA\r\n", b"+OK\r\n.\r\n")
    error = failed(d, UpstreamRejected)
    assert "evil" not in error.detail
    assert up.sent() == b""


def test_account_without_password_is_rejected_without_sending() -> None:
    account = Account("a", "example", "shop", password=None)
    up = Upstream()
    d = up.open(account=account)
    up.say(b"+OK\r\n")
    up.expect(b"CAPA\r\n", b"+OK\r\nSTLS\r\n.\r\n")
    up.expect(b"STLS\r\n", b"+OK\r\n")
    up.expect(b"CAPA\r\n", b"+OK\r\n.\r\n")
    failed(d, UpstreamRejected)
    assert up.sent() == b""
    assert up.aborted


# --- SASL exchanges (the shape later OAuth2 logins use) -------------------------------


def connected_client() -> tuple[POP3Client, UpstreamTransport, MemoryReactorClock]:
    clock = MemoryReactorClock()
    transport = UpstreamTransport()
    client = POP3Client(clock, TIMEOUT, peer="test")
    client.makeConnection(transport)
    client.dataReceived(b"+OK hello\r\n")
    assert succeeded(client.greeting()) == Status(True, None, b"hello")
    return client, transport, clock


def take(transport: StringTransport) -> bytes:
    data = transport.value()
    transport.clear()
    return data


@pytest.mark.parametrize(
    ("mechanism", "reply"),
    [(XOAuth2("u@x", Secret("tok")), b"\r\n"), (OAuthBearer("u@x", Secret("tok")), b"AQ==\r\n")],
)
def test_oauth_error_challenge_is_answered_then_fails(mechanism: Any, reply: bytes) -> None:
    client, transport, _ = connected_client()
    d = client.authenticate(mechanism)
    line = take(transport)
    assert line.startswith(b"AUTH " + mechanism.name.encode() + b" ")
    challenge = base64.b64encode(b'{"status":"401","schemes":"bearer"}')
    client.dataReceived(b"+ " + challenge + b"\r\n")
    assert take(transport) == reply
    pending(d)
    client.dataReceived(b"-ERR [AUTH] Invalid token\r\n")
    error = failed(d, ServerError)
    assert error.status.code == "AUTH"
    # The session is still in sync: the next command works.
    d2 = client.command(b"NOOP")
    assert take(transport) == b"NOOP\r\n"
    client.dataReceived(b"+OK\r\n")
    succeeded(d2)


def test_plain_cancels_an_unexpected_challenge() -> None:
    client, transport, _ = connected_client()
    d = client.authenticate(Plain("u", Secret("p")))
    take(transport)
    client.dataReceived(b"+ " + base64.b64encode(b"what?") + b"\r\n")
    assert take(transport) == b"*\r\n"
    client.dataReceived(b"-ERR cancelled\r\n")
    failed(d, ServerError)


def test_sasl_mechanisms_never_show_secrets() -> None:
    for mech in (Plain("u", Secret("hunter2")), XOAuth2("u", Secret("hunter2"))):
        assert "hunter2" not in repr(mech)


# --- timeouts -------------------------------------------------------------------------

# (what the upstream has been sent when it falls silent, error before/after login)
_OPENING = [
    b"+OK ready\r\n",
    b"+OK\r\nSTLS\r\nSASL PLAIN\r\n.\r\n",
    b"+OK\r\n",
    b"+OK\r\nSASL PLAIN\r\n.\r\n",
    b"+OK Logged in.\r\n",
    b"+OK\r\n1 10\r\n.\r\n",
]


@pytest.mark.parametrize("step", range(len(_OPENING)))
def test_timeout_at_each_opening_step(step: int) -> None:
    """Silence at greeting, CAPA, STLS, CAPA, AUTH, LIST: each one times out."""
    up = Upstream()
    d = up.open()
    for answer in _OPENING[:step]:
        up.say(answer)
    up.clock.advance(TIMEOUT - 0.1)
    pending(d)
    up.clock.advance(0.1)
    error = failed(d, UpstreamUnavailable)
    assert f"nothing for {TIMEOUT:g} s" in error.detail
    assert up.aborted
    assert up.clock.getDelayedCalls() == []


def test_activity_keeps_a_slow_answer_alive() -> None:
    up = Upstream()
    maildrop = up.log_in()
    sink = Sink()
    d = Deferred.fromCoroutine(maildrop.retrieve(1, sink))
    up.sent()
    up.say(b"+OK\r\n")
    for _ in range(5):
        up.clock.advance(TIMEOUT * 0.9)
        up.say(b"more\r\n")
    pending(d)
    up.say(b".\r\n")
    succeeded(d)
    assert sink.value() == b"more\r\n" * 5
    assert up.clock.getDelayedCalls() == []


@pytest.mark.parametrize("operation", ["uidl", "retr", "retr-mid-body", "quit"])
def test_timeout_after_login_is_upstream_lost(operation: str) -> None:
    up = Upstream()
    maildrop = up.log_in()
    sink = Sink()
    if operation == "uidl":
        d = Deferred.fromCoroutine(maildrop.unique_ids())
    elif operation == "quit":
        d = Deferred.fromCoroutine(maildrop.commit([]))
    else:
        d = Deferred.fromCoroutine(maildrop.retrieve(1, sink))
        if operation == "retr-mid-body":
            up.say(b"+OK\r\nSubject: partial\r\n")
    up.clock.advance(TIMEOUT)
    error = failed(d, UpstreamLost)
    assert "sent nothing" in error.detail
    assert up.aborted
    assert sink.producer is None
    assert up.clock.getDelayedCalls() == []


def test_no_timer_while_idle_between_commands() -> None:
    up = Upstream()
    maildrop = up.log_in()
    up.clock.advance(TIMEOUT * 100)
    assert not up.aborted
    d = Deferred.fromCoroutine(maildrop.unique_ids())
    up.expect(b"UIDL\r\n", b"+OK\r\n1 a\r\n2 b\r\n3 c\r\n.\r\n")
    assert succeeded(d) == ("a", "b", "c")


# --- retrieving -----------------------------------------------------------------------


def test_retr_streams_the_wire_form_verbatim() -> None:
    up = Upstream()
    maildrop = up.log_in()
    sink = Sink()
    d = Deferred.fromCoroutine(maildrop.retrieve(2, sink))
    assert up.sent() == b"RETR 2\r\n"
    body = b"Subject: dots\r\n\r\n..stuffed\r\n.\r\r\nend\r\n"
    up.say(b"+OK 2000 octets\r\n" + body[:20])
    assert sink.producer is not None and sink.streaming
    up.say(body[20:] + b".")
    pending(d)
    up.say(b"\r\n")
    assert succeeded(d) is None
    assert sink.value() == body
    assert sink.producer is None


def test_top_and_empty_body() -> None:
    up = Upstream()
    maildrop = up.log_in()
    sink = Sink()
    d = Deferred.fromCoroutine(maildrop.retrieve(3, sink, lines=0))
    up.expect(b"TOP 3 0\r\n", b"+OK\r\n.\r\n")
    succeeded(d)
    assert sink.value() == b""
    assert sink.producer is None


def test_err_to_retr_is_no_such_message_and_writes_nothing() -> None:
    up = Upstream()
    maildrop = up.log_in()
    sink = Sink()
    d = Deferred.fromCoroutine(maildrop.retrieve(1, sink))
    up.expect(b"RETR 1\r\n", b"-ERR Message was deleted.\r\n")
    error = failed(d, NoSuchMessage)
    assert "Message was deleted" in error.detail
    assert sink.value() == b""
    assert sink.producer is None
    # The session goes on.
    d = Deferred.fromCoroutine(maildrop.retrieve(9, sink))
    failed(d, NoSuchMessage)
    assert up.sent() == b""


def test_bytes_after_the_terminator_answer_the_next_command() -> None:
    up = Upstream()
    maildrop = up.log_in()
    sink = Sink()
    d = Deferred.fromCoroutine(maildrop.retrieve(1, sink))
    up.sent()
    # An over-eager server (or a splice) delivers the next answer early.
    up.say(b"+OK\r\nbody\r\n.\r\n+OK\r\n1 a\r\n2 b\r\n3 c\r\n.\r\n")
    succeeded(d)
    assert sink.value() == b"body\r\n"
    uids = Deferred.fromCoroutine(maildrop.unique_ids())
    assert up.sent() == b"UIDL\r\n"
    assert succeeded(uids) == ("a", "b", "c")


def test_drop_mid_retr_is_upstream_lost_and_writes_nothing_more() -> None:
    up = Upstream()
    maildrop = up.log_in()
    sink = Sink()
    d = Deferred.fromCoroutine(maildrop.retrieve(1, sink))
    up.sent()
    up.say(b"+OK\r\nline one\r\nline two\r\n.")
    written = sink.value()
    # The last bytes are held back: they could be the start of the terminator.
    assert written == b"line one\r\nline two"
    up.drop(ConnectionDone())
    error = failed(d, UpstreamLost)
    assert "in the middle of the RETR answer" in error.detail
    assert sink.value() == written
    assert sink.producer is None
    # Everything after fails at once, without touching the wire.
    failed(Deferred.fromCoroutine(maildrop.unique_ids()), UpstreamLost)
    failed(Deferred.fromCoroutine(maildrop.commit([1])), UpstreamLost)
    assert up.sent() == b""
    assert up.clock.getDelayedCalls() == []


def test_back_pressure_pauses_and_finally_resumes_the_upstream() -> None:
    up = Upstream()
    maildrop = up.log_in()
    sink = Sink()
    d = Deferred.fromCoroutine(maildrop.retrieve(2, sink))
    up.sent()
    up.say(b"+OK\r\n" + b"a" * 1000 + b"\r\n")
    throttle = sink.producer
    throttle.pauseProducing()
    assert up.transport.producerState == "paused"
    # A device that is slow to read is not an upstream timeout.
    up.clock.advance(TIMEOUT * 10)
    pending(d)
    throttle.resumeProducing()
    assert up.transport.producerState == "producing"
    up.say(b"b" * 1000 + b"\r\n")
    throttle.pauseProducing()
    # The rest of what the socket already read still goes to the sink.
    up.say(b"c\r\n.\r\n")
    succeeded(d)
    assert sink.value() == b"a" * 1000 + b"\r\n" + b"b" * 1000 + b"\r\nc\r\n"
    assert sink.producer is None
    # unregisterProducer alone would leave the upstream paused for good.
    assert up.transport.producerState == "producing"
    # A stale throttle can no longer touch the upstream.
    throttle.pauseProducing()
    assert up.transport.producerState == "producing"
    d = Deferred.fromCoroutine(maildrop.unique_ids())
    up.expect(b"UIDL\r\n", b"+OK\r\n1 a\r\n2 b\r\n3 c\r\n.\r\n")
    succeeded(d)


def test_sink_pausing_from_inside_write_is_honoured() -> None:
    class EagerSink(Sink):
        def write(self, data: bytes) -> None:
            super().write(data)
            if len(self.value()) > 100 and self.producer is not None:
                self.producer.pauseProducing()

    up = Upstream()
    maildrop = up.log_in()
    sink = EagerSink()
    d = Deferred.fromCoroutine(maildrop.retrieve(1, sink))
    up.sent()
    up.say(b"+OK\r\n" + b"x" * 200 + b"\r\n")
    assert up.transport.producerState == "paused"
    up.say(b".\r\n")
    succeeded(d)
    assert up.transport.producerState == "producing"


def test_device_going_away_mid_retr_aborts_the_upstream() -> None:
    up = Upstream()
    maildrop = up.log_in()
    sink = Sink()
    d = Deferred.fromCoroutine(maildrop.retrieve(1, sink))
    up.sent()
    up.say(b"+OK\r\nsome\r\n")
    sink.producer.stopProducing()
    failed(d, UpstreamLost)
    assert up.aborted
    assert b"QUIT" not in up.sent()
    assert sink.producer is None


# --- abort and commit -----------------------------------------------------------------


def test_abort_drops_without_quit_and_fails_what_is_pending() -> None:
    up = Upstream()
    maildrop = up.log_in()
    d = Deferred.fromCoroutine(maildrop.unique_ids())
    assert up.sent() == b"UIDL\r\n"
    maildrop.abort()
    maildrop.abort()
    error = failed(d, UpstreamLost)
    assert str(error) == UpstreamLost.device_text
    assert up.aborted
    assert up.sent() == b""
    up.say(b"+OK\r\n1 a\r\n.\r\n")  # late bytes are ignored
    up.drop()
    maildrop.abort()
    failed(Deferred.fromCoroutine(maildrop.commit([])), UpstreamLost)
    assert up.sent() == b""
    assert up.clock.getDelayedCalls() == []


def test_abort_with_nothing_pending_logs_nothing() -> None:
    up = Upstream()
    maildrop = up.log_in()
    maildrop.abort()
    assert up.aborted
    assert up.sent() == b""


def test_cancelling_the_open_aborts_the_connection() -> None:
    up = Upstream()
    d = up.open()
    up.say(b"+OK ready\r\n")
    d.cancel()
    failed(d, MaildropError)
    assert up.aborted
    assert up.clock.getDelayedCalls() == []


def test_commit_deletes_then_quits() -> None:
    up = Upstream()
    maildrop = up.log_in()
    d = Deferred.fromCoroutine(maildrop.commit({3, 1}))
    up.expect(b"DELE 1\r\n", b"+OK Marked to be deleted.\r\n")
    up.expect(b"DELE 3\r\n", b"+OK Marked to be deleted.\r\n")
    up.expect(b"QUIT\r\n")
    assert not up.transport.disconnecting
    pending(d)
    up.say(b"+OK Logging out, messages deleted.\r\n")
    succeeded(d)
    assert up.transport.disconnecting and not up.aborted
    up.drop(ConnectionDone())
    maildrop.abort()  # a front end's clean-up after commit is harmless
    assert up.clock.getDelayedCalls() == []


def test_commit_pipelines_when_offered() -> None:
    up = Upstream()
    maildrop = up.log_in(capa=b"SASL PLAIN\r\nPIPELINING\r\n")
    d = Deferred.fromCoroutine(maildrop.commit([2, 1]))
    assert up.sent() == b"DELE 1\r\nDELE 2\r\nQUIT\r\n"
    up.say(b"+OK\r\n+OK\r\n+OK bye\r\n")
    succeeded(d)


def test_commit_with_nothing_deleted_just_quits() -> None:
    up = Upstream()
    maildrop = up.log_in()
    d = Deferred.fromCoroutine(maildrop.commit([]))
    up.expect(b"QUIT\r\n", b"+OK\r\n")
    succeeded(d)


def test_quit_refused_is_an_error_for_the_device() -> None:
    up = Upstream()
    maildrop = up.log_in()
    d = Deferred.fromCoroutine(maildrop.commit([1]))
    up.expect(b"DELE 1\r\n", b"+OK\r\n")
    up.expect(b"QUIT\r\n", b"-ERR [SYS/TEMP] expunge failed\r\n")
    error = failed(d, UpstreamUnavailable)
    assert "expunge failed" in error.detail
    assert "expunge failed" not in str(error)


def test_refused_dele_still_quits_but_reports() -> None:
    up = Upstream()
    maildrop = up.log_in()
    d = Deferred.fromCoroutine(maildrop.commit([1, 2]))
    up.expect(b"DELE 1\r\n", b"-ERR Message is already deleted\r\n")
    up.expect(b"DELE 2\r\n", b"+OK\r\n")
    up.expect(b"QUIT\r\n", b"+OK\r\n")
    error = failed(d, UpstreamUnavailable)
    assert "DELE of 1" in error.detail


def test_connection_lost_before_quit_answer() -> None:
    up = Upstream()
    maildrop = up.log_in()
    d = Deferred.fromCoroutine(maildrop.commit([1]))
    up.expect(b"DELE 1\r\n", b"+OK\r\n")
    up.expect(b"QUIT\r\n")
    up.drop()
    failed(d, UpstreamLost)


def test_commit_of_a_number_outside_the_snapshot_aborts() -> None:
    up = Upstream()
    maildrop = up.log_in()
    failed(Deferred.fromCoroutine(maildrop.commit([4])), NoSuchMessage)
    assert up.aborted
    assert up.sent() == b""


# --- UIDL and LIST ---------------------------------------------------------------------


def test_uidl_is_sent_once_and_cached() -> None:
    up = Upstream()
    maildrop = up.log_in()
    d = Deferred.fromCoroutine(maildrop.unique_ids())
    up.expect(b"UIDL\r\n", b"+OK\r\n1 000001a\r\n2 000001b\r\n3 x.y\r\n.\r\n")
    assert succeeded(d) == ("000001a", "000001b", "x.y")
    assert succeeded(Deferred.fromCoroutine(maildrop.unique_ids())) == (
        "000001a",
        "000001b",
        "x.y",
    )
    assert up.sent() == b""


@pytest.mark.parametrize(
    "answer", [b"-ERR not supported\r\n", b"+OK\r\n1 a\r\n.\r\n", b"+OK\r\n1\r\n.\r\n"]
)
def test_uidl_refused_or_incomplete(answer: bytes) -> None:
    up = Upstream()
    maildrop = up.log_in()
    d = Deferred.fromCoroutine(maildrop.unique_ids())
    up.expect(b"UIDL\r\n", answer)
    failed(d, UpstreamUnavailable)


@pytest.mark.parametrize("listing", [b"2 10\r\n", b"1 ten\r\n", b"1 10\r\n1 10\r\n", b"-ERR"])
def test_malformed_list_at_open(listing: bytes) -> None:
    up = Upstream()
    d = up.open()
    up.say(b"+OK\r\n")
    up.expect(b"CAPA\r\n", b"+OK\r\nSTLS\r\nSASL PLAIN\r\n.\r\n")
    up.expect(b"STLS\r\n", b"+OK\r\n")
    up.expect(b"CAPA\r\n", b"+OK\r\nSASL PLAIN\r\n.\r\n")
    up.expect(b"AUTH PLAIN " + PLAIN_IR + b"\r\n", b"+OK\r\n")
    if listing == b"-ERR":
        up.expect(b"LIST\r\n", b"-ERR [SYS/TEMP] busy\r\n")
    else:
        up.expect(b"LIST\r\n", b"+OK\r\n" + listing + b".\r\n")
    failed(d, UpstreamUnavailable)
    assert up.aborted


def test_garbage_after_login_is_upstream_lost() -> None:
    up = Upstream()
    maildrop = up.log_in()
    d = Deferred.fromCoroutine(maildrop.unique_ids())
    up.sent()
    up.say(b"HTTP/1.1 200 OK\r\n")
    error = failed(d, UpstreamLost)
    assert "not a POP3 response" in error.detail
    assert up.aborted


# --- implicit TLS, real OpenSSL in memory --------------------------------------------


class FakePOP3Server(LineReceiver):
    """Just enough of a POP3 server to run a whole session against."""

    delimiter = b"\r\n"

    def __init__(self, messages: list[bytes], password: str) -> None:
        self.messages = messages  # wire form, dot-stuffed, CRLF-terminated
        self.password = password
        self.deleted: set[int] = set()
        self.committed: list[int] | None = None

    def connectionMade(self) -> None:
        self.sendLine(b"+OK fake ready")

    def lineReceived(self, line: bytes) -> None:
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if verb == b"CAPA":
            self.transport.write(b"+OK\r\nSASL PLAIN\r\nUIDL\r\nTOP\r\n.\r\n")
        elif verb == b"AUTH":
            ok = base64.b64decode(arg.split(b" ")[1]).split(b"\0")[2] == self.password.encode()
            self.sendLine(b"+OK" if ok else b"-ERR [AUTH] Authentication failed.")
        elif verb == b"LIST":
            lines = b"".join(b"%d %d\r\n" % (i, len(m)) for i, m in enumerate(self.messages, 1))
            self.transport.write(b"+OK\r\n" + lines + b".\r\n")
        elif verb == b"UIDL":
            lines = b"".join(b"%d uid%d\r\n" % (i, i) for i in range(1, len(self.messages) + 1))
            self.transport.write(b"+OK\r\n" + lines + b".\r\n")
        elif verb == b"RETR":
            self.transport.write(b"+OK\r\n" + self.messages[int(arg) - 1] + b".\r\n")
        elif verb == b"DELE":
            self.deleted.add(int(arg))
            self.sendLine(b"+OK")
        elif verb == b"QUIT":
            self.committed = sorted(self.deleted)
            self.sendLine(b"+OK bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"-ERR unknown command")


class MemoryTLSUpstream:
    """An endpoint factory whose connections reach a FakePOP3Server over real TLS."""

    def __init__(self, server_tls: TLSMaterial, messages: list[bytes]) -> None:
        self.clock = MemoryReactorClock()
        self.server: FakePOP3Server | None = None
        self.pump: iosim.IOPump | None = None
        self._messages = messages
        identity = load_server_identity(TLSFiles(server_tls.certificate, server_tls.private_key))
        self._server_options = server_context_factory(identity, Listener("pop3", 995, "implicit"))

    def endpoint_factory(self, reactor: Any, host: str, port: int, timeout: float) -> Any:
        return self

    def connect(self, factory: Factory) -> Deferred[Any]:
        address = IPv4Address("TCP", "127.0.0.1", 995)
        client = factory.buildProtocol(address)

        def make_server() -> Protocol:
            self.server = FakePOP3Server(self._messages, PASSWORD)
            return self.server

        server_factory = TLSMemoryBIOFactory(
            self._server_options, False, Factory.forProtocol(make_server), clock=self.clock
        )
        server = server_factory.buildProtocol(address)
        self.pump = iosim.connect(
            server,
            iosim.FakeTransport(server, isServer=True),
            client,
            iosim.FakeTransport(client, isServer=False),
            greet=False,
            clock=self.clock,
        )
        return succeed(client)

    def run(self, d: Deferred[Any]) -> None:
        assert self.pump is not None
        self.pump.flush()


@pytest.fixture(scope="module")
def server_tls(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    return make_tls_material(tmp_path_factory.mktemp("pop-tls"), names=("pop.example.test",))


def _implicit(ca_file: Path, host: str = "pop.example.test") -> Provider:
    return provider(pop3=Endpoint(host, 995, "implicit"), ca_file=ca_file)


def test_implicit_tls_whole_session(server_tls: TLSMaterial) -> None:
    messages = [b"Subject: one\r\n\r\n..dot\r\n", b"Subject: two\r\n\r\n" + b"y" * 100000 + b"\r\n"]
    upstream = MemoryTLSUpstream(server_tls, messages)
    d = Deferred.fromCoroutine(
        open_pop3_maildrop(
            ACCOUNT,
            _implicit(server_tls.ca_file),
            reactor=upstream.clock,
            endpoint_factory=upstream.endpoint_factory,
        )
    )
    upstream.run(d)
    maildrop = succeeded(d)
    assert maildrop.sizes == tuple(len(m) for m in messages)
    uids = Deferred.fromCoroutine(maildrop.unique_ids())
    upstream.run(uids)
    assert succeeded(uids) == ("uid1", "uid2")
    for number, message in enumerate(messages, 1):
        sink = Sink()
        r = Deferred.fromCoroutine(maildrop.retrieve(number, sink))
        upstream.run(r)
        succeeded(r)
        assert sink.value() == message
    c = Deferred.fromCoroutine(maildrop.commit([2]))
    upstream.run(c)
    succeeded(c)
    assert upstream.server is not None and upstream.server.committed == [2]


@pytest.mark.parametrize("case", ["other CA", "other host name"])
def test_implicit_tls_verification_failure_is_unavailable(
    case: str, server_tls: TLSMaterial, tmp_path: Path
) -> None:
    if case == "other CA":
        prov = _implicit(make_tls_material(tmp_path, names=("pop.example.test",)).ca_file)
    else:
        prov = _implicit(server_tls.ca_file, host="imposter.example.test")
    upstream = MemoryTLSUpstream(server_tls, [])
    d = Deferred.fromCoroutine(
        open_pop3_maildrop(
            ACCOUNT, prov, reactor=upstream.clock, endpoint_factory=upstream.endpoint_factory
        )
    )
    upstream.run(d)
    error = failed(d, UpstreamUnavailable)
    assert error.detail.startswith("TLS with provider example")
    assert "while waiting for the greeting" in error.detail
    # The fake server never saw a command, let alone credentials.
    assert upstream.server is None or upstream.server.committed is None
    assert upstream.clock.getDelayedCalls() == []


# --- unit-level client behaviour --------------------------------------------------------


def test_commands_wait_for_the_previous_answer() -> None:
    client, transport, _ = connected_client()
    d1 = client.command(b"NOOP")
    d2 = client.command(b"STAT")
    assert take(transport) == b"NOOP\r\n"
    client.dataReceived(b"+OK\r\n")
    assert take(transport) == b"STAT\r\n"
    client.dataReceived(b"+OK 2 320\r\n")
    assert succeeded(d1) == Status(True, None, b"")
    assert succeeded(d2) == Status(True, None, b"2 320")


def test_a_callback_queueing_the_next_command_sees_its_answer() -> None:
    client, transport, _ = connected_client()
    seen: list[Any] = []

    def then(_: object) -> Deferred[Any]:
        return client.command(b"STAT").addCallback(seen.append)

    client.command(b"NOOP").addCallback(then)
    take(transport)
    client.dataReceived(b"+OK\r\n+OK 1 10\r\n")
    assert take(transport) == b"STAT\r\n"
    assert seen == [Status(True, None, b"1 10")]


def test_dead_client_fails_fast() -> None:
    client, transport, _ = connected_client()
    client.connectionLost(Failure(ConnectionDone()))
    d = client.command(b"NOOP")
    failed(d, UpstreamUnavailable)  # never logged in
    assert take(transport) == b""


def test_when_closed() -> None:
    client, _, _ = connected_client()
    d = client.when_closed()
    pending(d)
    client.connectionLost(Failure(ConnectionDone()))
    assert succeeded(d) is None
    assert succeeded(client.when_closed()) is None
