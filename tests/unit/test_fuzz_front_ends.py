"""Random bytes, overlong lines and random command sequences at the POP3 and
SMTP front ends (in-memory transports, a fake clock, the in-memory maildrop,
a spool in a temporary directory).

After any junk: nothing raised, no unhandled error logged (no event with a
`log_failure`), and the state is sound. POP3: the maildrop lost exactly the
messages whose DELE was answered `+OK` (and not undone by RSET) when a QUIT
in TRANSACTION was answered `+OK bye`, and nothing otherwise; the account
lock is free, so a fresh connection logs in and sees what is left. SMTP: the
spool holds exactly the messages whose final "." was answered `250 ... queued
as`, no partial file is left, no stored line is over 998 octets, and a fresh
connection still logs in and sends.
"""

from __future__ import annotations

import base64
import gc
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher

from gateway.maildrop.memory import MemoryMaildrop
from gateway.model import Account
from tests.unit.test_pop3_server import Gateway as POP3Gateway
from tests.unit.test_smtp_server import Gateway as SMTPGateway

MESSAGES = [
    b"Subject: one\r\n\r\nhello\r\n.dot line\r\n",
    b"Subject: two\r\n\r\nline 1\r\nline 2\r\n",
    b"Subject: three\r\n\r\n" + b"w" * 3000 + b"\r\n",
]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@contextmanager
def failures_logged() -> Iterator[list[dict[str, Any]]]:
    """Events that carry a failure: tracebacks the gateway logged, and
    unhandled errors in Deferreds (logged when they are collected)."""
    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield events
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(observe)


def endings() -> st.SearchStrategy[bytes]:
    return st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b""])


def junk() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=40),
        st.sampled_from([250, 300, 513, 999, 5000, 13_000, 70_000]).flatmap(
            lambda n: endings().map(lambda end: b"A" * n + end)
        ),
        st.sampled_from([b"\x00", b"\r\n", b"\xff\xfe", b" ", b".\r\n", b"\r\n.\r\n"]),
    )


def sessions(
    commands: list[bytes], openings: list[bytes], closings: list[bytes]
) -> st.SearchStrategy[list[tuple[bytes, float]]]:
    """Packets (several commands or junk pipelined) and the time that passes
    after each; most often after an opening that gets the session somewhere
    (logged in, in a mail transaction) and before a closing (QUIT), so that
    the junk meets every state and the rules about QUIT are exercised."""
    line = st.tuples(st.sampled_from(commands), endings()).map(b"".join)
    packet = st.lists(st.one_of(line, line, junk()), min_size=1, max_size=4).map(b"".join)
    pause = st.sampled_from([0.0, 0.0, 0.5, 1.5, 20.0])

    def alone(text: bytes) -> list[tuple[bytes, float]]:
        return [(text, 1.0)] if text else []

    return st.tuples(
        st.sampled_from(openings).map(alone),
        st.lists(st.tuples(packet, pause), max_size=14),
        st.sampled_from(closings).map(alone),
    ).map(lambda parts: parts[0] + parts[1] + parts[2])


def play(proto: Any, transport: StringTransport, clock: MemoryReactorClock, packets: Any) -> bytes:
    """Feed the packets as TCP would: nothing more once the server closed or
    while it paused reading; then the connection ends and the clock runs on."""
    replies = b""
    for data, pause in packets:
        if transport.disconnecting:
            break
        if transport.producerState == "paused":
            clock.advance(2.0)
            if transport.producerState == "paused":
                break
        proto.dataReceived(data)
        clock.advance(pause)
        replies += transport.value()
        transport.clear()
    transport.loseConnection()
    proto.connectionLost(None)
    for _ in range(5):
        clock.advance(30.0)
    return replies + transport.value()


def wait_reply(transport: StringTransport, clock: MemoryReactorClock) -> bytes:
    """The next reply, however long a (penalised) login takes to be answered."""
    for _ in range(120):
        if transport.value():
            break
        clock.advance(0.5)
    value = transport.value()
    transport.clear()
    return value


# -- POP3 -----------------------------------------------------------------------------

POP3_COMMANDS = [
    b"USER printer",
    b"PASS printer-pw",
    b"USER printer\r\nPASS printer-pw",
    b"PASS wrong",
    b"USER nobody",
    b"user printer",
    b"AUTH",
    b"AUTH PLAIN",
    b"AUTH PLAIN " + b64(b"\0printer\0printer-pw"),
    b64(b"\0printer\0printer-pw"),
    b"AUTH PLAIN " + b64(b"\0printer\0nope"),
    b"*",
    b"CAPA",
    b"STLS",
    b"STAT",
    b"LIST",
    b"LIST 1",
    b"LIST 9",
    b"UIDL",
    b"UIDL 2",
    b"RETR 1",
    b"RETR 3",
    b"RETR 0",
    b"TOP 2 0",
    b"TOP 3 99999999999999",
    b"DELE 1",
    b"DELE 2",
    b"DELE 3",
    b"dele 3",
    b"DELE 4",
    b"RSET",
    b"NOOP",
    b"QUIT",
    b"APOP printer 0123456789abcdef",
    b"DELE 2\r\nQUIT",
    b"",
]


class SharedMaildrop(POP3Gateway):
    """One upstream mailbox that every session opens, so deletions stay."""

    def __init__(self) -> None:
        super().__init__(messages=list(MESSAGES))
        self.drop = MemoryMaildrop(list(MESSAGES), chunk_size=7)

    async def _open(self, account: Account) -> MemoryMaildrop:
        return self.drop


def expected_deletions(replies: bytes) -> set[bytes]:
    """What RFC 1939 says is gone: the DELEs answered +OK since the last
    login or RSET, if a QUIT in TRANSACTION was answered +OK bye."""
    marked: set[int] = set()
    for line in replies.split(b"\r\n"):
        if line.startswith(b"+OK maildrop has"):  # the login and RSET answers
            marked.clear()
        elif found := re.fullmatch(rb"\+OK message (\d+) deleted", line):
            marked.add(int(found.group(1)))
        elif line.startswith(b"+OK bye, "):
            return {MESSAGES[n - 1] for n in marked}
    return set()


POP3_OPENINGS = [
    b"",
    b"USER printer\r\nPASS printer-pw\r\n",
    b"USER printer\r\nPASS printer-pw\r\nDELE 1\r\nDELE 3\r\n",
    b"USER printer\r\nPASS printer-pw\r\nDELE 2\r\n",
]


@FUZZ
@given(sessions(POP3_COMMANDS, POP3_OPENINGS, [b"", b"QUIT\r\n", b"RSET\r\nDELE 2\r\nQUIT\r\n"]))
def test_pop3_front_end_survives_junk(packets: list[tuple[bytes, float]]) -> None:
    gw = SharedMaildrop()
    with failures_logged() as failures:
        dev = gw.connect()
        replies = play(dev.proto, dev.transport, gw.clock, packets)
        gone = {m for m in MESSAGES if m not in gw.drop.messages}
        assert gone == expected_deletions(replies), replies[-2000:]
        # What the examples reached (pytest --hypothesis-show-statistics).
        event(f"logged in: {b'+OK maildrop has' in replies}, deleted: {len(gone)}")

        # The lock is free and the mailbox is as the rule left it.
        fresh = gw.connect(peer="10.200.0.1")
        fresh.proto.dataReceived(b"USER copier\r\n")
        assert wait_reply(fresh.transport, gw.clock).startswith(b"+OK")
        fresh.proto.dataReceived(b"PASS copier-pw\r\n")
        left = gw.drop.messages
        total = sum(map(len, left))
        assert wait_reply(fresh.transport, gw.clock) == (
            f"+OK maildrop has {len(left)} messages ({total} octets)\r\n".encode()
        )
        assert fresh.send(b"STAT") == f"+OK {len(left)} {total}\r\n".encode()
        assert fresh.send(b"QUIT") == b"+OK bye, 0 messages deleted\r\n"
        fresh.drop()
    assert failures == []


# -- SMTP -----------------------------------------------------------------------------

SMTP_COMMANDS = [
    b"EHLO dev.local",
    b"HELO x",
    b"EHLO",
    b"AUTH PLAIN " + b64(b"\0printer\0printer-pw"),
    b"AUTH PLAIN " + b64(b"\0printer\0wrong"),
    b"AUTH PLAIN",
    b"AUTH LOGIN",
    b64(b"printer"),
    b64(b"printer-pw"),
    b"*",
    b"MAIL FROM:<a@scan.example.com>",
    b"MAIL FROM:<a@scan.example.com> SIZE=100 BODY=8BITMIME",
    b"MAIL FROM:<a@scan.example.com> SIZE=99999999",
    b"MAIL FROM:<evil@example.net>",
    b"MAIL FROM:<>",
    b"RCPT TO:<x@example.org>",
    b"RCPT TO:<y@example.org>",
    b"RCPT TO:<bad>",
    b"DATA",
    b"DATA\r\nSubject: hi\r\n\r\nbody\r\n.",
    b".",
    b"..dot",
    b"Subject: x",
    b"From: <a@scan.example.com>",
    b"\xc3\xa9t\xc3\xa9 8-bit",
    b"y" * 1500,
    b"RSET",
    b"NOOP",
    b"QUIT",
    b"STARTTLS",
    b"VRFY x",
    b"EXPN x",
    b"HELP",
    b"BDAT 10 LAST",
    b"MAIL FROM:<a@scan.example.com>\r\nRCPT TO:<x@example.org>\r\nDATA",
    b"\r\n.\r\nQUIT",
    b"",
]

QUEUED = re.compile(rb"^250 2\.0\.0 OK queued as (\S+)\r$", re.MULTILINE)


SMTP_OPENINGS = [
    b"",
    b"EHLO dev.local\r\nAUTH PLAIN " + b64(b"\0printer\0printer-pw") + b"\r\n",
    b"EHLO dev.local\r\nAUTH PLAIN " + b64(b"\0printer\0printer-pw") + b"\r\n"
    b"MAIL FROM:<a@scan.example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n",
    b"HELO x\r\nMAIL FROM:<a@scan.example.com>\r\nRCPT TO:<x@example.org>\r\nDATA\r\n",
]


@FUZZ
@given(sessions(SMTP_COMMANDS, SMTP_OPENINGS, [b"", b"\r\n.\r\nQUIT\r\n"]))
def test_smtp_front_end_survives_junk(packets: list[tuple[bytes, float]]) -> None:
    # The printer authenticates; the copier relays from its network without AUTH.
    peer = "192.168.7.9" if packets and packets[0][0].startswith(b"HELO") else "10.1.2.3"
    with tempfile.TemporaryDirectory() as tmp, failures_logged() as failures:
        gw = SMTPGateway(Path(tmp), max_size=200_000)
        client = gw.connect(peer=peer)
        replies = play(client.proto, client.transport, gw.clock, packets)

        # Spooled: exactly the messages whose final "." got 250, nothing half-written.
        accepted = [m.decode() for m in QUEUED.findall(replies)]
        event(f"queued: {len(accepted)}, in DATA: {b'354 ' in replies}")
        assert [entry.envelope.id for entry in gw.queued] == accepted
        assert len(list(gw.spool.dir.queue.glob("*.msg"))) == len(accepted)
        assert list(gw.spool.dir.tmp.iterdir()) == []
        for entry in gw.queued:
            stored = gw.message(entry)
            assert max(map(len, stored.split(b"\n"))) <= 999  # 998 octets and a CR

        # A fresh connection still logs in and sends.
        fresh = gw.connect(peer="10.200.0.1")
        fresh.proto.dataReceived(b"EHLO fresh\r\n")
        assert wait_reply(fresh.transport, gw.clock).startswith(b"250-")
        fresh.proto.dataReceived(b"AUTH PLAIN " + b64(b"\0careless\0careless-pw") + b"\r\n")
        assert wait_reply(fresh.transport, gw.clock).startswith(b"235")
        reply = fresh.send(
            b"MAIL FROM:<a@scan.example.com>",
            b"RCPT TO:<x@example.org>",
            b"DATA",
            b"Subject: after the junk\r\n\r\nfine",
            b".",
        )
        assert QUEUED.search(reply), reply
        assert gw.message(gw.queued[-1]) == b"Subject: after the junk\r\n\r\nfine\r\n"
        assert fresh.send(b"QUIT") == b"221 2.0.0 bye\r\n"
        fresh.proto.connectionLost(None)
    assert failures == []
