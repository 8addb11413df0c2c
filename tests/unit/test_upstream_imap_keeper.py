"""The kept upstream IMAP connection (`gateway.maildrop.imap_keeper`) on in-memory
connections with a `MemoryReactorClock`: the test plays the server, checks each
command byte for byte, and opens a new in-memory connection at each connect."""

from __future__ import annotations

import base64
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.maildrop import UpstreamLost
from gateway.maildrop.imap import IMAPMaildrop
from gateway.maildrop.imap_keeper import IDLE_RENEW, NOOP_INTERVAL, IMAPKeeper
from gateway.model import Account, Endpoint, Provider, Secret
from gateway.upstream.imap import IMAPClient
from tests.helpers.upstream import UpstreamTransport, failed, pending, succeeded, unhandled_errors

TIMEOUT = 10.0
PASSWORD = "s3cret-Pa55"
PLAIN_IR = base64.b64encode(f"\0shop@example.test\0{PASSWORD}".encode())
GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN AUTH=XOAUTH2] ready\r\n"
WITH_IDLE = b"IMAP4rev1 SASL-IR LITERAL+ UIDPLUS MOVE IDLE"
NO_IDLE = b"IMAP4rev1 SASL-IR LITERAL+ UIDPLUS MOVE"


def snapshot_answer(examine: int, uids: tuple[int, ...] = (10, 12)) -> bytes:
    lines = [b"* %d EXISTS\r\n" % len(uids), b"* OK [UIDVALIDITY 777] ok\r\n"]
    lines.append(b"* OK [PERMANENTFLAGS (\\Deleted \\Seen \\*)] ok\r\n")
    lines.append(b"g%d OK [READ-ONLY] Examine completed\r\n" % examine)
    for n, uid in enumerate(uids, 1):
        lines.append(b"* %d FETCH (UID %d RFC822.SIZE %d FLAGS ())\r\n" % (n, uid, 100 + uid))
    lines.append(b"g%d OK Fetch completed\r\n" % (examine + 1))
    return b"".join(lines)


def snapshot_request(examine: int) -> bytes:
    return b'g%d EXAMINE "INBOX"\r\ng%d UID FETCH 1:* (UID RFC822.SIZE FLAGS)\r\n' % (
        examine,
        examine + 1,
    )


def account(**kw: Any) -> Account:
    kw.setdefault("password", Secret(PASSWORD))
    return Account("shop", "example", "shop@example.test", mailbox="imap", **kw)


PROVIDER = Provider("example", imap=Endpoint("imap.example.test", 993, "implicit"), timeout=TIMEOUT)

no_unhandled_errors = pytest.fixture(autouse=True)(unhandled_errors)


class Server:
    """The far end, one in-memory connection per connect."""

    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.connections: list[tuple[IMAPClient, UpstreamTransport]] = []
        self.keeper = IMAPKeeper(
            self.clock, endpoint_factory=self.endpoint_factory, oauth_relogin_after=600.0
        )

    def endpoint_factory(self, reactor: Any, host: str, port: int, timeout: float) -> Any:
        return self

    def connect(self, factory: Factory) -> Deferred[Any]:
        # Implicit TLS: the client's factory comes wrapped in TLS, which is
        # left out here (the Dovecot tests run real TLS).
        protocol = factory.wrappedFactory.buildProtocol(  # type: ignore[attr-defined]
            IPv4Address("TCP", "192.0.2.1", 993)
        )
        assert isinstance(protocol, IMAPClient)
        transport = UpstreamTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(SimpleNamespace(wrappedProtocol=protocol))

    @property
    def transport(self) -> UpstreamTransport:
        return self.connections[-1][1]

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def say(self, data: bytes) -> None:
        self.connections[-1][0].dataReceived(data)

    def expect(self, command: bytes, answer: bytes | None = None) -> None:
        assert self.sent() == command
        if answer is not None:
            self.say(answer)

    def open(self, acct: Account | None = None, tokens: Any = None) -> Deferred[IMAPMaildrop]:
        return Deferred.fromCoroutine(
            self.keeper.open(acct or account(), PROVIDER, uid_store=None, tokens=tokens)
        )

    def log_in(self, d: Deferred[Any], caps: bytes = WITH_IDLE) -> IMAPMaildrop:
        """The first session: connect, AUTHENTICATE PLAIN, snapshot."""
        self.say(GREETING)
        self.expect(
            b"g1 AUTHENTICATE PLAIN " + PLAIN_IR + b"\r\n",
            b"g1 OK [CAPABILITY " + caps + b"] Logged in\r\n",
        )
        self.expect(snapshot_request(2), snapshot_answer(2))
        maildrop = succeeded(d)
        assert isinstance(maildrop, IMAPMaildrop)
        return maildrop


def quit_without_deleting(maildrop: IMAPMaildrop) -> None:
    succeeded(Deferred.fromCoroutine(maildrop.commit([])))


def test_second_session_reuses_the_login_with_one_round_trip() -> None:
    up = Server()
    first = up.log_in(up.open())
    quit_without_deleting(first)
    # No LOGOUT: the folder is watched with IDLE instead.
    up.expect(b"g4 IDLE\r\n", b"+ idling\r\n")
    d = up.open()
    # DONE and NOOP leave together: one round trip.
    up.expect(b"DONE\r\ng5 NOOP\r\n", b"g4 OK Idle completed\r\ng5 OK NOOP completed\r\n")
    second = succeeded(d)
    assert second.snapshot == first.snapshot
    assert second.client is first.client
    assert len(up.connections) == 1
    assert up.keeper.logins == {"shop": 1}


def test_exists_during_idle_takes_the_snapshot_again() -> None:
    up = Server()
    quit_without_deleting(up.log_in(up.open()))
    up.expect(b"g4 IDLE\r\n", b"+ idling\r\n* 3 EXISTS\r\n")
    d = up.open()
    up.expect(b"DONE\r\ng5 NOOP\r\n", b"g4 OK Idle completed\r\ng5 OK NOOP completed\r\n")
    up.expect(snapshot_request(6), snapshot_answer(6, (10, 12, 13)))
    assert succeeded(d).snapshot.uids == (10, 12, 13)


@pytest.mark.parametrize(
    "news",
    [
        b"* 2 EXPUNGE\r\n",
        b"* 3 EXISTS\r\n",
        b"* 1 FETCH (FLAGS ($POP3Deleted))\r\n",
        b"* VANISHED 12\r\n",
    ],
)
def test_a_change_the_noop_reports_takes_the_snapshot_again(news: bytes) -> None:
    """IDLE had said nothing yet: the NOOP at login is what catches the race."""
    up = Server()
    quit_without_deleting(up.log_in(up.open()))
    up.expect(b"g4 IDLE\r\n", b"+ idling\r\n")
    d = up.open()
    up.expect(b"DONE\r\ng5 NOOP\r\n", b"g4 OK Idle completed\r\n" + news + b"g5 OK NOOP\r\n")
    pending(d)
    up.expect(snapshot_request(6), snapshot_answer(6, (10,)))
    assert succeeded(d).snapshot.uids == (10,)


def test_done_waits_for_the_idling_continuation() -> None:
    up = Server()
    quit_without_deleting(up.log_in(up.open()))
    assert up.sent() == b"g4 IDLE\r\n"
    d = up.open()
    assert up.sent() == b""  # DONE before "+ idling" would be read as a command
    up.expect(b"", b"+ idling\r\n")
    up.expect(b"DONE\r\ng5 NOOP\r\n", b"g4 OK done\r\ng5 OK done\r\n")
    assert isinstance(succeeded(d), IMAPMaildrop)


def test_idle_close_logs_out_after_keep_idle() -> None:
    up = Server()
    quit_without_deleting(up.log_in(up.open(account(keep_idle=60.0)), caps=WITH_IDLE))
    up.expect(b"g4 IDLE\r\n", b"+ idling\r\n")
    up.clock.advance(59)
    assert up.sent() == b""
    up.clock.advance(1)
    up.expect(b"DONE\r\ng5 LOGOUT\r\n", b"g4 OK done\r\n* BYE bye\r\ng5 OK bye\r\n")
    assert up.transport.disconnecting
    assert up.keeper.kept("shop") is None
    assert up.clock.getDelayedCalls() == []


def test_a_session_cancels_the_idle_close() -> None:
    up = Server()
    quit_without_deleting(up.log_in(up.open(account(keep_idle=60.0))))
    up.expect(b"g4 IDLE\r\n", b"+ idling\r\n")
    up.clock.advance(50)
    d = up.open(account(keep_idle=60.0))
    up.expect(b"DONE\r\ng5 NOOP\r\n", b"g4 OK done\r\ng5 OK done\r\n")
    maildrop = succeeded(d)
    up.clock.advance(100)  # a long session: the kept connection stays
    assert up.sent() == b""
    quit_without_deleting(maildrop)
    up.expect(b"g6 IDLE\r\n", b"+ idling\r\n")
    up.clock.advance(60)
    assert up.sent() == b"DONE\r\ng7 LOGOUT\r\n"


def test_idle_is_renewed_before_servers_drop_it() -> None:
    up = Server()
    quit_without_deleting(up.log_in(up.open(account(keep_idle=3600.0))))
    up.expect(b"g4 IDLE\r\n", b"+ idling\r\n")
    up.clock.advance(IDLE_RENEW)
    up.expect(b"DONE\r\n", b"g4 OK done\r\n")
    up.expect(b"g5 IDLE\r\n", b"+ idling\r\n")
    assert up.connections[-1][0].busy


def test_without_idle_a_noop_now_and_then() -> None:
    up = Server()
    quit_without_deleting(up.log_in(up.open(account(keep_idle=3600.0)), caps=NO_IDLE))
    assert up.sent() == b""
    up.clock.advance(NOOP_INTERVAL)
    up.expect(b"g4 NOOP\r\n", b"* 3 EXISTS\r\ng4 OK\r\n")
    d = up.open(account(keep_idle=3600.0))
    up.expect(b"g5 NOOP\r\n", b"g5 OK\r\n")
    # The EXISTS the poll saw is still news to the next session.
    up.expect(snapshot_request(6), snapshot_answer(6, (10, 12, 13)))
    assert succeeded(d).snapshot.uids == (10, 12, 13)


def test_a_connection_closed_while_idle_is_replaced_at_the_next_login() -> None:
    up = Server()
    quit_without_deleting(up.log_in(up.open()))
    up.expect(b"g4 IDLE\r\n", b"+ idling\r\n* BYE kicked\r\n")
    up.connections[-1][0].connectionLost()
    assert up.keeper.kept("shop") is None
    d = up.open()
    assert len(up.connections) == 2
    assert isinstance(up.log_in(d), IMAPMaildrop)
    assert up.keeper.logins == {"shop": 2}


def test_a_kept_connection_that_fails_its_noop_is_replaced_in_the_same_login() -> None:
    up = Server()
    quit_without_deleting(up.log_in(up.open()))
    up.expect(b"g4 IDLE\r\n", b"+ idling\r\n")
    d = up.open()
    up.expect(b"DONE\r\ng5 NOOP\r\n")
    up.connections[-1][0].connectionLost()  # kicked before it answered
    pending(d)
    assert len(up.connections) == 2
    maildrop = up.log_in(d)
    assert maildrop.snapshot.uids == (10, 12)


def test_oauth2_login_is_redone_before_the_token_expires() -> None:
    class Tokens:
        def __init__(self) -> None:
            self.handed = 0

        async def access_token(self, acct: Account, *, force_refresh: bool = False) -> str:
            self.handed += 1
            return f"token-{self.handed}"

    def ir(token: str) -> bytes:
        return base64.b64encode(f"user=shop@example.test\x01auth=Bearer {token}\x01\x01".encode())

    tokens = Tokens()
    oauth = account(auth="oauth2", password=None, keep_idle=3600.0)
    up = Server()
    d = up.open(oauth, tokens)
    up.say(GREETING)
    logged_in = b"g1 OK [CAPABILITY " + WITH_IDLE + b"] in\r\n"
    up.expect(b"g1 AUTHENTICATE XOAUTH2 " + ir("token-1") + b"\r\n", logged_in)
    up.expect(snapshot_request(2), snapshot_answer(2))
    quit_without_deleting(succeeded(d))
    up.expect(b"g4 IDLE\r\n", b"+ idling\r\n")
    up.clock.advance(599)
    d = up.open(oauth, tokens)
    up.expect(b"DONE\r\ng5 NOOP\r\n", b"g4 OK\r\ng5 OK\r\n")
    quit_without_deleting(succeeded(d))
    up.expect(b"g6 IDLE\r\n", b"+ idling\r\n")
    up.clock.advance(1)
    again = up.open(oauth, tokens)
    # The old login says goodbye; a new one comes with a fresh token.
    old = up.connections[0][1]
    assert old.value() == b"DONE\r\ng7 LOGOUT\r\n"
    assert len(up.connections) == 2
    up.say(GREETING)
    up.expect(b"g1 AUTHENTICATE XOAUTH2 " + ir("token-2") + b"\r\n", logged_in)
    up.expect(snapshot_request(2), snapshot_answer(2))
    assert isinstance(succeeded(again), IMAPMaildrop)
    assert up.keeper.logins == {"shop": 2}


def test_a_session_dropped_mid_fetch_drops_the_kept_connection() -> None:
    up = Server()
    maildrop = up.log_in(up.open())
    sink = StringTransport()
    retr = Deferred.fromCoroutine(maildrop.retrieve(1, sink))
    assert up.sent() == b"g4 UID FETCH 10 (BODY.PEEK[])\r\n"
    maildrop.abort()  # the device went away while the message streamed
    failed(retr, UpstreamLost)
    assert up.transport.disconnected
    assert up.keeper.kept("shop") is None


def test_a_dropped_session_at_rest_keeps_the_connection() -> None:
    up = Server()
    maildrop = up.log_in(up.open())
    maildrop.abort()
    maildrop.abort()  # idempotent: the second does not touch the kept connection
    up.expect(b"g4 IDLE\r\n", b"+ idling\r\n")
    assert not up.transport.disconnected
    assert up.keeper.kept("shop") is maildrop.client


def test_quit_with_deletions_examines_again_and_the_next_login_lists_again() -> None:
    up = Server()
    maildrop = up.log_in(up.open())
    d = Deferred.fromCoroutine(maildrop.commit([1]))
    up.expect(
        b'g4 SELECT "INBOX"\r\n',
        b"* 2 EXISTS\r\n* OK [UIDVALIDITY 777] ok\r\n"
        b"* OK [PERMANENTFLAGS (\\Deleted \\Seen \\*)] ok\r\ng4 OK [READ-WRITE] ok\r\n",
    )
    up.expect(b"g5 UID STORE 10 +FLAGS.SILENT (\\Deleted $POP3Deleted)\r\n", b"g5 OK\r\n")
    up.expect(b"g6 UID EXPUNGE 10\r\n", b"* 1 EXPUNGE\r\ng6 OK\r\n")
    succeeded(d)
    # Back to read-only, then watched; no LOGOUT.
    up.expect(b'g7 EXAMINE "INBOX"\r\n', b"* 1 EXISTS\r\ng7 OK [READ-ONLY] ok\r\n")
    up.expect(b"g8 IDLE\r\n", b"+ idling\r\n")
    d2 = up.open()
    up.expect(b"DONE\r\ng9 NOOP\r\n", b"g8 OK\r\ng9 OK\r\n")
    up.expect(snapshot_request(10), snapshot_answer(10, (12,)))
    assert succeeded(d2).snapshot.uids == (12,)


def test_a_changed_account_logs_in_again() -> None:
    up = Server()
    quit_without_deleting(up.log_in(up.open()))
    up.expect(b"g4 IDLE\r\n", b"+ idling\r\n")
    d = up.open(account(folder="INBOX", on_delete="keep"))
    assert up.connections[0][1].value() == b"DONE\r\ng5 LOGOUT\r\n"
    assert isinstance(up.log_in(d), IMAPMaildrop)
    assert up.keeper.logins == {"shop": 2}


def test_a_change_reported_during_the_session_makes_the_next_login_list_again() -> None:
    """Dovecot may attach `* n EXISTS` to any command's answer; IDLE will not
    repeat it, so the kept client counts it wherever it arrives."""
    up = Server()
    maildrop = up.log_in(up.open())
    sink = StringTransport()
    retr = Deferred.fromCoroutine(maildrop.retrieve(1, sink))
    up.expect(
        b"g4 UID FETCH 10 (BODY.PEEK[])\r\n",
        b"* 1 FETCH (UID 10 BODY[] {7}\r\nhello\r\n)\r\n* 3 EXISTS\r\ng4 OK done\r\n",
    )
    succeeded(retr)
    quit_without_deleting(maildrop)
    up.expect(b"g5 IDLE\r\n", b"+ idling\r\n")
    d = up.open()
    up.expect(b"DONE\r\ng6 NOOP\r\n", b"g5 OK\r\ng6 OK\r\n")
    up.expect(snapshot_request(7), snapshot_answer(7, (10, 12, 13)))
    assert succeeded(d).snapshot.uids == (10, 12, 13)
