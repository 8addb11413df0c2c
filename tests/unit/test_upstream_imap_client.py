"""The IMAP client and the IMAP-backed maildrop on in-memory connections with a fake clock.

The test plays the upstream server: it checks each command byte for byte and
answers it. STARTTLS is recorded, not performed (the Dovecot tests run real
TLS); time is a `MemoryReactorClock`, so timeouts are tested without waiting.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import StringTransport

from gateway.maildrop import (
    MailboxInUse,
    NoSuchMessage,
    UpstreamLost,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.maildrop.imap import IMAPMaildrop, message_id, open_imap_maildrop
from gateway.maildrop.uidl_map import UIDStore
from gateway.model import Account, Endpoint, Provider, Secret
from gateway.upstream.imap import IMAPClient
from tests.helpers.upstream import ScriptedUpstream, failed, pending, succeeded, unhandled_errors

TIMEOUT = 10.0
PASSWORD = "s3cret-Pa55"
PLAIN_IR = base64.b64encode(f"\0shop@example.test\0{PASSWORD}".encode())
PRE_TLS = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ STARTTLS LOGINDISABLED] ready\r\n"
AFTER_TLS = b"IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN"
LOGGED_IN = b"IMAP4rev1 SASL-IR LITERAL+ UIDPLUS MOVE"
SNAPSHOT = (
    b"* 3 EXISTS\r\n* OK [UIDVALIDITY 777] UIDs valid\r\n* OK [PERMANENTFLAGS ()] ro\r\n"
    b"g4 OK [READ-ONLY] Examine completed\r\n"
    b"* 1 FETCH (UID 10 RFC822.SIZE 120 FLAGS (\\Seen))\r\n"
    b"* 2 FETCH (UID 11 RFC822.SIZE 50 FLAGS ($POP3Deleted))\r\n"
    b"* 3 FETCH (UID 12 RFC822.SIZE 2000 FLAGS ())\r\n"
    b"g5 OK Fetch completed\r\n"
)
SELECTED = (
    b"* 3 EXISTS\r\n* OK [UIDVALIDITY 777] ok\r\n"
    b"* OK [PERMANENTFLAGS (\\Deleted \\Seen \\*)] ok\r\n"
)


def account(**kw: Any) -> Account:
    kw.setdefault("password", Secret(PASSWORD))
    return Account("shop", "example", "shop@example.test", mailbox="imap", **kw)


def provider(**overrides: Any) -> Provider:
    settings: dict[str, Any] = {
        "name": "example",
        "imap": Endpoint("imap.example.test", 143, "starttls"),
        "timeout": TIMEOUT,
    }
    settings.update(overrides)
    return Provider(**settings)


no_unhandled_errors = pytest.fixture(autouse=True)(unhandled_errors)


class Upstream(ScriptedUpstream):
    """The far end of one in-memory IMAP connection, played by the test."""

    client = IMAPClient
    port = 143
    protocol: IMAPClient | None

    def open(
        self,
        prov: Provider | None = None,
        acct: Account | None = None,
        store: UIDStore | None = None,
        tokens: Any = None,
    ) -> Deferred[Any]:
        return Deferred.fromCoroutine(
            open_imap_maildrop(
                acct or account(),
                prov or provider(),
                reactor=self.clock,
                uid_store=store,
                tokens=tokens,
                endpoint_factory=self.endpoint_factory,
            )
        )

    def reach_login(self, d: Deferred[Any], after_tls: bytes = AFTER_TLS) -> None:
        self.say(PRE_TLS)
        self.expect(b"g1 STARTTLS\r\n", b"g1 OK Begin TLS negotiation now.\r\n")
        self.expect(b"g2 CAPABILITY\r\n", b"* CAPABILITY " + after_tls + b"\r\ng2 OK done\r\n")

    def log_in(
        self, acct: Account | None = None, store: UIDStore | None = None, caps: bytes = LOGGED_IN
    ) -> IMAPMaildrop:
        """Run a whole STARTTLS + AUTHENTICATE PLAIN + snapshot opening."""
        d = self.open(acct=acct, store=store)
        self.reach_login(d)
        self.expect(
            b"g3 AUTHENTICATE PLAIN " + PLAIN_IR + b"\r\n",
            b"g3 OK [CAPABILITY " + caps + b"] Logged in\r\n",
        )
        self.expect(b'g4 EXAMINE "INBOX"\r\ng5 UID FETCH 1:* (UID RFC822.SIZE FLAGS)\r\n', SNAPSHOT)
        maildrop = succeeded(d)
        assert isinstance(maildrop, IMAPMaildrop)
        return maildrop


def run(coroutine: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coroutine)


# --- connecting, TLS, snapshot -----------------------------------------------------------


def test_open_over_starttls_then_one_pipelined_round_trip_for_the_snapshot() -> None:
    up = Upstream()
    maildrop = up.log_in()
    assert up.connected_to == ("imap.example.test", 143, TIMEOUT)
    assert up.transport.tls_options is not None
    assert up.transport.no_delay is True
    # The message with $POP3Deleted is hidden; sizes are RFC822.SIZE.
    assert maildrop.sizes == (120, 2000)
    assert maildrop.snapshot.uids == (10, 12)
    assert maildrop.snapshot.uidvalidity == 777
    assert up.clock.getDelayedCalls() == []


def test_nothing_is_sent_before_the_greeting() -> None:
    up = Upstream()
    d = up.open()
    assert up.sent() == b""
    up.protocol.abort()  # type: ignore[union-attr]
    failed(d, UpstreamUnavailable)


@pytest.mark.parametrize(
    ("greeting", "answer"),
    [
        (b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] no tls here\r\n", None),
        (PRE_TLS, b"g1 NO TLS not available\r\n"),
    ],
)
def test_no_starttls_means_no_login_in_clear(greeting: bytes, answer: bytes | None) -> None:
    up = Upstream()
    d = up.open()
    up.say(greeting)
    if answer is not None:
        up.expect(b"g1 STARTTLS\r\n", answer)
    error = failed(d, UpstreamUnavailable)
    assert "STARTTLS" in error.detail
    assert up.sent() == b""
    assert up.transport.tls_options is None
    assert up.aborted


def test_bytes_after_starttls_answer_are_treated_as_injection() -> None:
    up = Upstream()
    d = up.open()
    up.say(PRE_TLS)
    up.expect(b"g1 STARTTLS\r\n", b"g1 OK go\r\n* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n")
    error = failed(d, UpstreamUnavailable)
    assert "after the STARTTLS answer" in error.detail
    assert up.transport.tls_options is None
    assert up.aborted


def test_greeting_without_capabilities_asks_for_them() -> None:
    up = Upstream()
    d = up.open()
    up.say(b"* OK ready\r\n")
    up.expect(b"g1 CAPABILITY\r\n", b"* CAPABILITY IMAP4rev1 STARTTLS\r\ng1 OK\r\n")
    assert up.sent() == b"g2 STARTTLS\r\n"
    up.protocol.abort()  # type: ignore[union-attr]
    failed(d, UpstreamUnavailable)


@pytest.mark.parametrize(
    "greeting", [b"* BYE [UNAVAILABLE] too busy\r\n", b"+OK POP3 ready\r\n", b"* NO go away\r\n"]
)
def test_bad_greeting(greeting: bytes) -> None:
    up = Upstream()
    d = up.open()
    up.say(greeting)
    failed(d, UpstreamUnavailable)
    assert up.sent() == b""
    assert up.aborted


def test_connect_failure_and_timeout() -> None:
    up = Upstream(connecting=fail(ConnectionRefusedError()))
    assert "imap.example.test:143" in failed(up.open(), UpstreamUnavailable).detail
    cancelled: list[bool] = []
    up = Upstream(connecting=Deferred(lambda d: cancelled.append(True)))
    d = up.open()
    up.clock.advance(TIMEOUT)
    assert "no connection within" in failed(d, UpstreamUnavailable).detail
    assert cancelled == [True]
    assert up.clock.getDelayedCalls() == []


def test_no_imap_endpoint_is_an_admin_problem(tmp_path: Path) -> None:
    up = Upstream()
    failed(up.open(provider(imap=None)), UpstreamRejected)
    error = failed(up.open(provider(ca_file=tmp_path / "missing.pem")), UpstreamUnavailable)
    assert "missing.pem" in error.detail
    assert up.protocol is None


def test_greeting_timeout_and_silent_command_timeout() -> None:
    up = Upstream()
    d = up.open()
    up.clock.advance(TIMEOUT - 1)
    up.say(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n")
    assert up.sent() == b"g1 STARTTLS\r\n"
    up.clock.advance(TIMEOUT - 1)
    pending(d)
    up.clock.advance(1)
    error = failed(d, UpstreamUnavailable)
    assert "sent nothing for 10 s while waiting for the STARTTLS answer" in error.detail
    assert up.aborted
    assert up.clock.getDelayedCalls() == []


# --- logging in --------------------------------------------------------------------------------


def test_authenticate_plain_without_sasl_ir_answers_the_empty_challenge() -> None:
    up = Upstream()
    d = up.open()
    up.reach_login(d, after_tls=b"IMAP4rev1 AUTH=PLAIN")
    up.expect(b"g3 AUTHENTICATE PLAIN\r\n", b"+ \r\n")
    up.expect(PLAIN_IR + b"\r\n", b"g3 OK Logged in\r\n")
    # The login answer carried no capabilities: they will be asked for at QUIT.
    assert up.protocol.capabilities_stale  # type: ignore[union-attr]
    up.expect(b'g4 EXAMINE "INBOX"\r\ng5 UID FETCH 1:* (UID RFC822.SIZE FLAGS)\r\n', SNAPSHOT)
    succeeded(d)


def test_login_command_when_plain_is_not_offered() -> None:
    up = Upstream()
    d = up.open(acct=account(password=Secret('pa"ss\\')))
    up.reach_login(d, after_tls=b"IMAP4rev1")
    up.expect(b'g3 LOGIN "shop@example.test" "pa\\"ss\\\\"\r\n', b"g3 OK hi\r\n")
    assert b"EXAMINE" in up.sent()
    up.protocol.abort()  # type: ignore[union-attr]
    failed(d, UpstreamUnavailable)


def test_login_with_an_8bit_password_waits_for_the_continuation() -> None:
    up = Upstream()
    d = up.open(acct=account(password=Secret("pässword")))
    up.reach_login(d, after_tls=b"IMAP4rev1")
    up.expect(b'g3 LOGIN "shop@example.test" {9}\r\n', b"+ go ahead\r\n")
    up.expect("pässword".encode() + b"\r\n", b"g3 OK hi\r\n")
    up.protocol.abort()  # type: ignore[union-attr]
    failed(d, UpstreamUnavailable)


def test_logindisabled_without_plain_is_refused_without_sending_the_password() -> None:
    up = Upstream()
    d = up.open()
    up.reach_login(d, after_tls=b"IMAP4rev1 LOGINDISABLED AUTH=GSSAPI")
    error = failed(d, UpstreamRejected)
    assert "neither AUTH=PLAIN nor LOGIN" in error.detail
    assert up.sent() == b""


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (b"g3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n", UpstreamRejected),
        (b"g3 BAD what\r\n", UpstreamRejected),
        (b"g3 NO [UNAVAILABLE] try later\r\n", UpstreamUnavailable),
        (b"g3 NO [INUSE] busy\r\n", MailboxInUse),
    ],
)
def test_refused_login(answer: bytes, kind: type[Exception]) -> None:
    up = Upstream()
    d = up.open()
    up.reach_login(d)
    up.expect(b"g3 AUTHENTICATE PLAIN " + PLAIN_IR + b"\r\n", answer)
    error = failed(d, kind)
    assert PASSWORD not in error.detail and PLAIN_IR.decode() not in error.detail
    assert up.aborted


class Tokens:
    def __init__(self) -> None:
        self.calls: list[bool] = []

    async def access_token(self, acct: Account, *, force_refresh: bool = False) -> str:
        self.calls.append(force_refresh)
        return "fresh-token" if force_refresh else "stale-token"


def test_xoauth2_refreshes_once_after_a_refused_token() -> None:
    up = Upstream()
    tokens = Tokens()
    d = up.open(acct=account(auth="oauth2", password=None), tokens=tokens)
    up.reach_login(d, after_tls=b"IMAP4rev1 SASL-IR AUTH=XOAUTH2")

    def ir(token: str) -> bytes:
        raw = f"user=shop@example.test\x01auth=Bearer {token}\x01\x01".encode()
        return base64.b64encode(raw)

    error = base64.b64encode(b'{"status":"401","schemes":"bearer"}')
    up.expect(b"g3 AUTHENTICATE XOAUTH2 " + ir("stale-token") + b"\r\n", b"+ " + error + b"\r\n")
    up.expect(b"\r\n", b"g3 NO [AUTHENTICATIONFAILED] nope\r\n")
    up.expect(b"g4 AUTHENTICATE XOAUTH2 " + ir("fresh-token") + b"\r\n", b"g4 OK in\r\n")
    assert tokens.calls == [False, True]
    assert up.sent().startswith(b'g5 EXAMINE "INBOX"')
    up.protocol.abort()  # type: ignore[union-attr]
    failed(d, UpstreamUnavailable)


# --- the snapshot ------------------------------------------------------------------------------


def _to_snapshot(up: Upstream, d: Deferred[Any]) -> None:
    up.reach_login(d)
    up.expect(
        b"g3 AUTHENTICATE PLAIN " + PLAIN_IR + b"\r\n", b"g3 OK [CAPABILITY IMAP4rev1] ok\r\n"
    )
    assert up.sent() == b'g4 EXAMINE "INBOX"\r\ng5 UID FETCH 1:* (UID RFC822.SIZE FLAGS)\r\n'


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (
            b"g4 NO [NONEXISTENT] Mailbox doesn't exist: INBOX\r\ng5 BAD No mailbox selected\r\n",
            UpstreamRejected,
        ),
        (b"g4 NO [UNAVAILABLE] later\r\ng5 BAD No mailbox selected\r\n", UpstreamUnavailable),
        (b"* 0 EXISTS\r\ng4 OK\r\ng5 OK\r\n", UpstreamUnavailable),  # no UIDVALIDITY
        (
            b"* OK [UIDVALIDITY 1] x\r\ng4 OK\r\n* 1 FETCH (UID 3 FLAGS ())\r\ng5 OK\r\n",
            UpstreamUnavailable,
        ),  # no RFC822.SIZE
        (
            b"* OK [UIDVALIDITY 1] x\r\ng4 OK\r\n* 1 FETCH (UID 3 RFC822.SIZE x)\r\ng5 OK\r\n",
            UpstreamUnavailable,
        ),
    ],
)
def test_snapshot_failures(answer: bytes, kind: type[Exception]) -> None:
    up = Upstream()
    d = up.open()
    _to_snapshot(up, d)
    up.say(answer)
    failed(d, kind)
    assert up.aborted


def test_empty_folder_refusing_star_is_an_empty_snapshot() -> None:
    up = Upstream()
    d = up.open()
    _to_snapshot(up, d)
    up.say(b"* 0 EXISTS\r\n* OK [UIDVALIDITY 5] x\r\ng4 OK\r\ng5 BAD Invalid uidset\r\n")
    assert succeeded(d).sizes == ()


def test_unsolicited_updates_during_the_snapshot_are_ignored() -> None:
    up = Upstream()
    d = up.open()
    _to_snapshot(up, d)
    up.say(
        b"* OK [UIDVALIDITY 5] x\r\n* 2 EXISTS\r\ng4 OK\r\n"
        b"* 1 FETCH (FLAGS (\\Seen))\r\n* 1 FETCH (UID 4 RFC822.SIZE 10 FLAGS ())\r\n"
        b"* 2 EXPUNGE\r\n* 5 RECENT\r\ng5 OK\r\n"
    )
    assert succeeded(d).snapshot.uids == (4,)


# --- RETR and TOP ----------------------------------------------------------------------------


class Device(StringTransport):
    """The device side of a RETR: an IConsumer that pushes back when told to."""


def test_retr_streams_body_peek_dot_stuffed_with_back_pressure() -> None:
    up = Upstream()
    maildrop = up.log_in()
    device = Device()
    d = run(maildrop.retrieve(1, device))
    up.expect(b"g6 UID FETCH 10 (BODY.PEEK[])\r\n")
    message = b"Subject: x\r\n\r\n.hidden dot\r\n" + b"y" * 91 + b"\r\n"
    assert len(message) == 120
    up.say(b"* 1 FETCH (UID 10 BODY[] {120}\r\n" + message[:30])
    assert device.producer is not None and device.streaming
    device.producer.pauseProducing()
    assert up.transport.producerState == "paused"
    up.clock.advance(TIMEOUT * 5)  # a paused upstream is not a silent one
    device.producer.resumeProducing()
    assert up.transport.producerState == "producing"
    up.say(message[30:] + b")\r\ng6 OK Fetch completed\r\n")
    succeeded(d)
    assert device.value() == message.replace(b"\r\n.", b"\r\n..")
    assert device.producer is None
    assert up.clock.getDelayedCalls() == []


def test_retr_of_a_message_another_client_expunged() -> None:
    up = Upstream()
    maildrop = up.log_in()
    d = run(maildrop.retrieve(2, Device()))
    up.expect(b"g6 UID FETCH 12 (BODY.PEEK[])\r\n", b"g6 OK Fetch completed\r\n")
    failed(d, NoSuchMessage)
    failed(run(maildrop.retrieve(3, Device())), NoSuchMessage)


def test_upstream_drop_mid_literal_is_upstream_lost_and_nothing_is_finished() -> None:
    up = Upstream()
    maildrop = up.log_in()
    device = Device()
    d = run(maildrop.retrieve(1, device))
    up.sent()
    up.say(b"* 1 FETCH (UID 10 BODY[] {120}\r\nSubject: x\r\n\r\nhalf")
    up.drop()
    error = failed(d, UpstreamLost)
    assert "in the middle of the UID FETCH answer" in error.detail
    assert device.value() == b"Subject: x\r\n\r\nhalf"  # no CRLF added, no terminator
    assert device.producer is None


def test_data_that_was_not_asked_for_ends_the_session() -> None:
    up = Upstream()
    maildrop = up.log_in()
    d = run(maildrop.retrieve(1, Device()))
    up.sent()
    up.say(b"* 1 FETCH (UID 10 BODY[TEXT] {3}\r\n")
    failed(d, UpstreamLost)
    assert up.aborted


def test_device_gone_mid_message_aborts_the_upstream() -> None:
    up = Upstream()
    maildrop = up.log_in()
    device = Device()
    d = run(maildrop.retrieve(1, device))
    up.sent()
    up.say(b"* 1 FETCH (UID 10 BODY[] {120}\r\nSubject")
    device.producer.stopProducing()  # type: ignore[union-attr]
    failed(d, UpstreamLost)
    assert up.aborted


def test_silent_upstream_mid_retr_times_out() -> None:
    up = Upstream()
    maildrop = up.log_in()
    d = run(maildrop.retrieve(1, Device()))
    up.sent()
    up.say(b"* 1 FETCH (UID 10 BODY[] {120}\r\nSub")
    up.clock.advance(TIMEOUT)
    assert "sent nothing for 10 s" in failed(d, UpstreamLost).detail
    assert up.clock.getDelayedCalls() == []


def test_top_fetches_growing_prefixes_until_enough_lines() -> None:
    up = Upstream()
    maildrop = up.log_in()
    header = b"Subject: big header\r\n" + b"X-Long: " + b"h" * 40_000 + b"\r\n\r\n"
    body = b".one\r\ntwo\r\nthree\r\n" + b"rest\r\n" * 100
    message = header + body
    device = Device()
    d = run(maildrop.retrieve(2, device, lines=2))
    up.expect(b"g6 UID FETCH 12 (BODY.PEEK[]<0.32768>)\r\n")
    first = message[:32768]
    up.say(b"* 3 FETCH (UID 12 BODY[]<0> {32768}\r\n" + first + b")\r\ng6 OK done\r\n")
    up.expect(b"g7 UID FETCH 12 (BODY.PEEK[]<32768.131072>)\r\n")
    rest = message[32768:]
    up.say(b"* 3 FETCH (UID 12 BODY[]<32768> {%d}\r\n" % len(rest) + rest + b")\r\ng7 OK\r\n")
    succeeded(d)
    assert device.value() == header + b"..one\r\ntwo\r\n"
    assert up.sent() == b""


@pytest.mark.parametrize(
    ("message", "lines", "expected"),
    [
        (b"A: 1\r\n\r\nx\r\ny\r\n", 0, b"A: 1\r\n\r\n"),
        (b"A: 1\r\n\r\nx\r\ny\r\n", 5, b"A: 1\r\n\r\nx\r\ny\r\n"),
        (b"A: 1\r\nB: 2\r\n", 1, b"A: 1\r\nB: 2\r\n"),  # no body at all
        (b"\r\nbody\r\nmore\r\n", 1, b"\r\nbody\r\n"),  # no header
        (b"A: 1\r\n\r\nno newline", 3, b"A: 1\r\n\r\nno newline\r\n"),
    ],
)
def test_top_edge_cases(message: bytes, lines: int, expected: bytes) -> None:
    up = Upstream()
    maildrop = up.log_in()
    device = Device()
    d = run(maildrop.retrieve(1, device, lines=lines))
    up.expect(b"g6 UID FETCH 10 (BODY.PEEK[]<0.32768>)\r\n")
    up.say(b"* 1 FETCH (UID 10 BODY[]<0> {%d}\r\n" % len(message) + message + b")\r\ng6 OK\r\n")
    succeeded(d)
    assert device.value() == expected


# --- UIDL ----------------------------------------------------------------------------------------


def test_uidls_are_fetched_once_and_only_for_unknown_messages(tmp_path: Path) -> None:
    store = UIDStore.in_state_dir(tmp_path)
    up = Upstream()
    maildrop = up.log_in(store=store)
    d = run(maildrop.unique_ids())
    up.expect(
        b"g6 UID FETCH 10,12 (UID INTERNALDATE BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])\r\n",
        b'* 1 FETCH (UID 10 INTERNALDATE "1-Jan-2026 00:00:00 +0000" '
        b"BODY[HEADER.FIELDS (MESSAGE-ID)] {21}\r\nMessage-ID: <a@b>\r\n\r\n)\r\n"
        b"g6 OK\r\n",
    )
    assert succeeded(d) == ("777.10", "777.12")
    assert succeeded(run(maildrop.unique_ids())) == ("777.10", "777.12")
    assert up.sent() == b""
    maildrop.abort()
    # The next session knows both: no FETCH at all.
    up = Upstream()
    maildrop = up.log_in(store=store)
    assert succeeded(run(maildrop.unique_ids())) == ("777.10", "777.12")
    assert up.sent() == b""
    maildrop.abort()
    assert [e.key.message_id for e in store.entries("shop")] == ["<a@b>", ""]
    store.close()


def test_uidls_without_a_store_are_natural() -> None:
    up = Upstream()
    maildrop = up.log_in()
    assert succeeded(run(maildrop.unique_ids())) == ("777.10", "777.12")


# --- QUIT ----------------------------------------------------------------------------------------


def _commit(maildrop: IMAPMaildrop, deleted: list[int]) -> Deferred[Any]:
    return run(maildrop.commit(deleted))


def test_quit_without_deletions_only_logs_out() -> None:
    up = Upstream()
    maildrop = up.log_in()
    d = _commit(maildrop, [])
    up.expect(b"g6 LOGOUT\r\n", b"* BYE Logging out\r\ng6 OK Logout completed.\r\n")
    succeeded(d)
    assert up.transport.disconnecting


def test_expunge_with_uidplus_removes_exactly_the_deleted_uids() -> None:
    up = Upstream()
    maildrop = up.log_in()
    d = _commit(maildrop, [1, 2])
    up.expect(b'g6 SELECT "INBOX"\r\n', SELECTED + b"g6 OK [READ-WRITE] ok\r\n")
    up.expect(b"g7 UID STORE 10,12 +FLAGS.SILENT (\\Deleted $POP3Deleted)\r\n", b"g7 OK\r\n")
    up.expect(b"g8 UID EXPUNGE 10,12\r\n", b"* 1 EXPUNGE\r\n* 2 EXPUNGE\r\ng8 OK\r\n")
    up.expect(b"g9 LOGOUT\r\n", b"* BYE\r\ng9 OK\r\n")
    succeeded(d)


def test_expunge_without_uidplus_checks_for_other_deleted_messages() -> None:
    up = Upstream()
    maildrop = up.log_in(caps=b"IMAP4rev1")
    d = _commit(maildrop, [2])
    up.expect(b'g6 SELECT "INBOX"\r\n', SELECTED + b"g6 OK\r\n")
    up.expect(b"g7 UID STORE 12 +FLAGS.SILENT (\\Deleted $POP3Deleted)\r\n", b"g7 OK\r\n")
    up.expect(b"g8 UID SEARCH DELETED NOT KEYWORD $POP3Deleted\r\n", b"* SEARCH\r\ng8 OK\r\n")
    up.expect(b"g9 EXPUNGE\r\n", b"* 3 EXPUNGE\r\ng9 OK\r\n")
    up.expect(b"g10 LOGOUT\r\n", b"g10 OK\r\n")
    succeeded(d)


def test_expunge_without_uidplus_never_expunges_another_clients_deleted_message() -> None:
    up = Upstream()
    maildrop = up.log_in(caps=b"IMAP4rev1")
    d = _commit(maildrop, [2])
    up.expect(b'g6 SELECT "INBOX"\r\n', SELECTED + b"g6 OK\r\n")
    up.expect(b"g7 UID STORE 12 +FLAGS.SILENT (\\Deleted $POP3Deleted)\r\n", b"g7 OK\r\n")
    up.expect(b"g8 UID SEARCH DELETED NOT KEYWORD $POP3Deleted\r\n", b"* SEARCH 4\r\ng8 OK\r\n")
    # No EXPUNGE: ours stays \Deleted and hidden until the next expunge.
    up.expect(b"g9 LOGOUT\r\n", b"g9 OK\r\n")
    succeeded(d)


def test_move_with_move_and_without() -> None:
    up = Upstream()
    maildrop = up.log_in(acct=account(on_delete="move", move_to="Ablage/Älter"))
    d = _commit(maildrop, [1])
    up.expect(b'g6 SELECT "INBOX"\r\n', SELECTED + b"g6 OK\r\n")
    up.expect(b'g7 UID MOVE 10 "Ablage/&AMQ-lter"\r\n', b"g7 NO [TRYCREATE] no such\r\n")
    up.expect(b'g8 CREATE "Ablage/&AMQ-lter"\r\n', b"g8 OK\r\n")
    up.expect(b'g9 UID MOVE 10 "Ablage/&AMQ-lter"\r\n', b"g9 OK\r\n")
    up.expect(b"g10 LOGOUT\r\n", b"g10 OK\r\n")
    succeeded(d)

    up = Upstream()
    maildrop = up.log_in(acct=account(on_delete="move", move_to="Archive"), caps=b"UIDPLUS")
    d = _commit(maildrop, [1, 2])
    up.expect(b'g6 SELECT "INBOX"\r\n', SELECTED + b"g6 OK\r\n")
    up.expect(b'g7 UID COPY 10,12 "Archive"\r\n', b"g7 OK [COPYUID 9 10,12 1:2]\r\n")
    up.expect(b"g8 UID STORE 10,12 +FLAGS.SILENT (\\Deleted $POP3Deleted)\r\n", b"g8 OK\r\n")
    up.expect(b"g9 UID EXPUNGE 10,12\r\n", b"g9 OK\r\n")
    up.expect(b"g10 LOGOUT\r\n", b"g10 OK\r\n")
    succeeded(d)


def test_keep_and_mark_seen() -> None:
    up = Upstream()
    maildrop = up.log_in(acct=account(on_delete="keep", mark_seen=True))
    device = Device()
    r = run(maildrop.retrieve(1, device))
    up.sent()
    up.say(b"* 1 FETCH (UID 10 BODY[] {3}\r\nabc)\r\ng6 OK\r\n")
    succeeded(r)
    d = _commit(maildrop, [2])
    up.expect(b'g7 SELECT "INBOX"\r\n', SELECTED + b"g7 OK\r\n")
    up.expect(b"g8 UID STORE 10 +FLAGS.SILENT (\\Seen)\r\n", b"g8 OK\r\n")
    up.expect(b"g9 UID STORE 12 +FLAGS.SILENT ($POP3Deleted)\r\n", b"g9 OK\r\n")
    up.expect(b"g10 LOGOUT\r\n", b"g10 OK\r\n")
    succeeded(d)


def test_keep_needs_keywords() -> None:
    up = Upstream()
    maildrop = up.log_in(acct=account(on_delete="keep"))
    d = _commit(maildrop, [2])
    up.expect(
        b'g6 SELECT "INBOX"\r\n',
        b"* OK [UIDVALIDITY 777] x\r\n* OK [PERMANENTFLAGS (\\Deleted)] x\r\ng6 OK\r\n",
    )
    error = failed(d, UpstreamUnavailable)
    assert "$POP3Deleted" in error.detail
    assert str(error) == "some deleted messages were not removed"
    assert up.aborted


def test_uidvalidity_changed_during_the_session_deletes_nothing() -> None:
    up = Upstream()
    maildrop = up.log_in()
    d = _commit(maildrop, [1])
    up.expect(b'g6 SELECT "INBOX"\r\n', b"* OK [UIDVALIDITY 778] x\r\ng6 OK\r\n")
    assert "UIDVALIDITY" in failed(d, UpstreamUnavailable).detail
    assert up.sent() == b""
    assert up.aborted


def test_stale_capabilities_are_asked_in_the_select_round_trip() -> None:
    up = Upstream()
    d = up.open()
    up.reach_login(d)
    up.expect(b"g3 AUTHENTICATE PLAIN " + PLAIN_IR + b"\r\n", b"g3 OK Logged in\r\n")
    up.expect(b'g4 EXAMINE "INBOX"\r\ng5 UID FETCH 1:* (UID RFC822.SIZE FLAGS)\r\n', SNAPSHOT)
    maildrop = succeeded(d)
    c = _commit(maildrop, [1])
    up.expect(
        b'g6 CAPABILITY\r\ng7 SELECT "INBOX"\r\n',
        b"* CAPABILITY IMAP4rev1 UIDPLUS\r\ng6 OK\r\n" + SELECTED + b"g7 OK\r\n",
    )
    up.expect(b"g8 UID STORE 10 +FLAGS.SILENT (\\Deleted $POP3Deleted)\r\n", b"g8 OK\r\n")
    up.expect(b"g9 UID EXPUNGE 10\r\n", b"g9 OK\r\n")
    up.expect(b"g10 LOGOUT\r\n", b"g10 OK\r\n")
    succeeded(c)


def test_refused_store_fails_the_quit() -> None:
    up = Upstream()
    maildrop = up.log_in()
    d = _commit(maildrop, [1])
    up.expect(b'g6 SELECT "INBOX"\r\n', SELECTED + b"g6 OK\r\n")
    up.expect(b"g7 UID STORE 10 +FLAGS.SILENT (\\Deleted $POP3Deleted)\r\n", b"g7 NO quota\r\n")
    error = failed(d, UpstreamUnavailable)
    assert "quota" in error.detail and str(error) == "some deleted messages were not removed"
    assert up.aborted


def test_abort_sends_nothing_and_drops_the_connection() -> None:
    up = Upstream()
    maildrop = up.log_in()
    maildrop.abort()
    maildrop.abort()
    assert up.sent() == b""
    assert up.aborted
    failed(run(maildrop.retrieve(1, Device())), UpstreamLost)


def test_snapshot_in_another_item_order_reads_the_same() -> None:
    up = Upstream()
    d = up.open()
    _to_snapshot(up, d)
    up.say(
        b"* OK [UIDVALIDITY 5] x\r\ng4 OK\r\n"
        b"* 1 FETCH (FLAGS (\\Seen $pop3deleted) RFC822.SIZE 10 UID 4)\r\n"
        b"* 2 FETCH (RFC822.SIZE 20 FLAGS () UID 6)\r\n"
        b"* 3 FETCH (UID 9 RFC822.SIZE 30 FLAGS (\\Flagged))\r\n"
        b"g5 OK\r\n"
    )
    maildrop = succeeded(d)
    assert (maildrop.snapshot.uids, maildrop.sizes) == ((6, 9), (20, 30))


def test_deleting_a_message_outside_the_snapshot_aborts() -> None:
    up = Upstream()
    maildrop = up.log_in()
    failed(_commit(maildrop, [3]), NoSuchMessage)
    assert up.aborted and up.sent() == b""


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"Message-ID: <a@b>\r\n\r\n", "<a@b>"),
        (b"Message-Id:\r\n <folded@example.test>\r\n\r\n", "<folded@example.test>"),
        (b"\r\n", ""),
        (b"Message-ID: no brackets\r\n\r\n", ""),
    ],
)
def test_message_id(header: bytes, expected: str) -> None:
    assert message_id(header) == expected
