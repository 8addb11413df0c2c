"""The relay worker: delivery, connection reuse, retry and backoff, expiry, bounces,
dead letters and admin requests, against an in-memory upstream on a fake clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher

from gateway.model import Account, Endpoint, Provider, Secret
from gateway.smtp.relay import Relay, RetryPolicy
from gateway.smtp.spool import Envelope, QueueEntry, Spool, SpoolDir, new_id
from tests.helpers.front_end import run_now
from tests.helpers.smtp import Upstream

T0 = 1_700_000_000.0
MESSAGE = b"Subject: report\r\nFrom: dev@scan.example.com\r\n\r\n.dot\r\nbody\r\n"


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("gateway.smtp"):
            lines.append(f"{event['log_level'].name} {formatEvent(event)}")

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


class Harness:
    def __init__(
        self, tmp_path: Path, retry: RetryPolicy | None = None, connections: int = 1
    ) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(T0)
        self.upstream = Upstream(self.clock)
        self.dir = SpoolDir(tmp_path / "spool").prepare()
        self.spool = Spool(self.dir, run_in_thread=run_now)
        self.account = Account(
            "scanner", "corp", "scanner@example.com", password=Secret("account-pw")
        )
        self.relay = self._relay(retry or RetryPolicy(), connections)

    def _relay(self, retry: RetryPolicy, connections: int) -> Relay:
        return Relay(
            spool=self.spool,
            accounts={"scanner": self.account},
            providers={"corp": Provider("corp", smtp=Endpoint("smtp.example.com", 587))},
            open_session=self.upstream.open_session,
            clock=self.clock,
            hostname="gw.test",
            retry=retry,
            control_interval=2.0,
            keepalive=2.0,
            connections=connections,
        )

    def queue(
        self,
        message: bytes = MESSAGE,
        *,
        sender: str = "dev@scan.example.com",
        recipients: tuple[str, ...] = ("a@example.org",),
        eight_bit: bool = False,
    ) -> QueueEntry:
        now = self.clock.seconds()
        envelope = Envelope(
            id=new_id(now),
            account="scanner",
            device="printer",
            peer="10.0.0.1",
            identified_by="password",
            original_sender=sender,
            sender=sender,
            recipients=recipients,
            received=now,
            size=len(message),
            eight_bit=eight_bit,
        )
        entry = self.dir.add(envelope, message)
        self.spool.track(entry)
        if self.relay.running:
            self.relay.submitted(entry)
        return entry

    def start(self) -> None:
        self.relay.startService()
        self.settle()

    def settle(self) -> None:
        self.upstream.settle()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.settle()

    def stop(self) -> None:
        d = self.relay.stopService()
        self.settle()
        assert d.called


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    if harness.relay.running:
        harness.stop()


def test_delivers_in_order_over_one_connection(h: Harness) -> None:
    first = h.queue(MESSAGE)
    second = h.queue(b"Subject: two\r\n\r\n.\r\n..\r\n", recipients=("b@example.org", "c@x.org"))
    h.start()
    arrived = h.upstream.arrived
    assert [a.content for a in arrived] == [MESSAGE, b"Subject: two\r\n\r\n.\r\n..\r\n"]
    assert arrived[0].mail_from.startswith(b"FROM:<dev@scan.example.com> SIZE=")
    assert arrived[1].recipients == [b"b@example.org", b"c@x.org"]
    assert h.upstream.connections == 1
    assert h.spool.entries == {} and list(h.dir.queue.iterdir()) == []
    assert first.id not in h.spool.entries and second.id not in h.spool.entries
    # A third message soon after reuses the connection; then idle QUIT.
    h.advance(1.0)
    h.queue()
    h.settle()
    assert len(arrived) == 3 and h.upstream.connections == 1
    h.advance(2.0)
    assert h.upstream.quits == 1


def test_parallel_connections_each_message_once(tmp_path: Path) -> None:
    h = Harness(tmp_path, connections=3)
    messages = [b"Subject: %d\r\n\r\nbody\r\n" % i for i in range(10)]
    for m in messages:
        h.queue(m)
    h.start()
    assert sorted(a.content for a in h.upstream.arrived) == sorted(messages)
    assert h.upstream.connections == 3 and h.spool.entries == {}
    h.advance(2.0)
    assert h.upstream.quits == 3
    h.stop()


def test_parallel_connections_when_the_upstream_is_down(tmp_path: Path) -> None:
    h = Harness(tmp_path, connections=3)
    h.upstream.script.down = True
    entries = [h.queue() for _ in range(5)]
    h.start()
    assert [e.state.attempts for e in entries] == [1] * 5
    h.upstream.script.down = False
    h.advance(30)
    assert len(h.upstream.arrived) == 5 and h.spool.entries == {}
    h.stop()


def test_retry_with_backoff_until_the_upstream_is_back(h: Harness, logged: list[str]) -> None:
    h.upstream.script.down = True
    entry = h.queue()
    h.start()
    assert entry.state.attempts == 1 and entry.state.next_attempt == T0 + 30
    assert h.dir.read(entry.id).state.attempts == 1  # type: ignore[union-attr]
    h.advance(29.0)
    assert entry.state.attempts == 1
    h.advance(1.0)
    assert entry.state.attempts == 2 and entry.state.next_attempt == T0 + 30 + 60
    h.upstream.script.down = False
    h.advance(60.0)
    assert len(h.upstream.arrived) == 1 and h.spool.entries == {}
    assert any("smtp deferred" in line and "connection refused" in line for line in logged)


def test_backoff_doubles_up_to_the_maximum() -> None:
    policy = RetryPolicy(first=30, max_interval=100, lifetime=1000)
    assert [policy.delay(n) for n in range(1, 6)] == [30, 60, 100, 100, 100]
    assert RetryPolicy(first=30, max_interval=1e9).delay(10_000) == 1e9


def test_temporary_refusal_retries_only_that_recipient(h: Harness) -> None:
    h.upstream.script.rcpt_replies[b"b@example.org"] = b"451 4.2.0 mailbox busy"
    entry = h.queue(recipients=("a@example.org", "b@example.org"))
    h.start()
    assert [a.recipients for a in h.upstream.arrived] == [[b"a@example.org"]]
    assert entry.state.delivered == ["a@example.org"] and entry.pending == ["b@example.org"]
    h.upstream.script.rcpt_replies.clear()
    h.advance(30.0)
    assert [a.recipients for a in h.upstream.arrived] == [[b"a@example.org"], [b"b@example.org"]]
    assert h.spool.entries == {}


def test_permanent_refusal_bounces_and_keeps_a_dead_letter(h: Harness, logged: list[str]) -> None:
    h.upstream.script.rcpt_replies[b"bad@example.org"] = b"550 5.1.1 no such user"
    entry = h.queue(recipients=("good@example.org", "bad@example.org"))
    h.start()
    good, bounce = h.upstream.arrived
    assert good.recipients == [b"good@example.org"]
    assert bounce.mail_from.startswith(b"FROM:<>")
    assert bounce.recipients == [b"dev@scan.example.com"]
    text = bounce.content.decode()
    assert "multipart/report; report-type=delivery-status" in text
    assert "Final-Recipient: rfc822; bad@example.org" in text
    assert "Status: 5.1.1" in text and "Action: failed" in text
    assert "Subject: report" in text and "good@example.org" not in text.split("Reporting-MTA")[1]
    assert entry.status == "dead"
    [dead] = [e for e in h.dir.scan() if e.status == "dead"]
    assert dead.id == entry.id and "550 5.1.1 no such user" in (dead.state.dead_reason or "")
    assert (h.dir.dead / f"{entry.id}.msg").exists()
    assert any(line.startswith("error") and "dead letter" in line for line in logged)


def test_expiry_bounces_with_4_4_7(tmp_path: Path) -> None:
    h = Harness(tmp_path, RetryPolicy(first=30, max_interval=3600, lifetime=100))
    h.upstream.script.rcpt_replies[b"a@example.org"] = b"452 4.2.2 mailbox full"
    entry = h.queue()
    h.start()
    times = [entry.state.next_attempt - T0]
    for _ in range(2):
        h.advance(entry.state.next_attempt - h.clock.seconds())
        times.append(entry.state.next_attempt - T0)
    assert times == [30, 90, 100]
    h.advance(10)
    assert entry.status == "dead" and entry.state.attempts == 4
    [bounce] = h.upstream.arrived
    assert b"Status: 4.4.7" in bounce.content and b"452 4.2.2 mailbox full" in bounce.content
    h.stop()


def test_a_bounce_is_never_bounced(h: Harness, logged: list[str]) -> None:
    h.upstream.script.mail_reply = b"550 5.7.1 sender refused"
    h.queue()
    h.start()
    dead = [e for e in h.dir.scan() if e.status == "dead"]
    assert len(dead) == 2 and h.upstream.arrived == []
    assert {e.envelope.identified_by for e in dead} == {"password", "bounce"}
    assert any("not bounced (it was a bounce itself)" in line for line in logged)


def test_null_sender_gets_no_bounce(h: Harness, logged: list[str]) -> None:
    h.upstream.script.data_reply = b"554 5.6.0 rejected"
    h.queue(sender="")
    h.start()
    assert len([e for e in h.dir.scan() if e.status == "dead"]) == 1
    assert any("not bounced (null sender)" in line for line in logged)


def test_lost_connection_mid_data_then_exactly_once(h: Harness) -> None:
    big = b"Subject: big\r\n\r\n" + b"0123456789abcdef\r\n" * 1000
    h.upstream.script.drop_after_content = 5000
    entry = h.queue(big)
    h.start()
    assert h.upstream.arrived == [] and entry.state.attempts == 1
    h.upstream.script.drop_after_content = None
    h.advance(30)
    assert [a.content for a in h.upstream.arrived] == [big]
    assert h.spool.entries == {}


def test_messages_left_by_a_previous_run_are_delivered_once(tmp_path: Path) -> None:
    before = Harness(tmp_path)
    ids = {before.queue(b"Subject: %d\r\n\r\nx\r\n" % i).id for i in range(5)}
    # A crash leftover in tmp/ (no 250 was sent for it) must not be delivered.
    (before.dir.tmp / "20250101000000-deadbeef.msg").write_bytes(b"partial")
    after = Harness(tmp_path)
    assert {e.id for e in after.spool.load()} == ids
    after.start()
    assert sorted(a.content for a in after.upstream.arrived) == sorted(
        b"Subject: %d\r\n\r\nx\r\n" % i for i in range(5)
    )
    assert list(after.dir.tmp.iterdir()) == [] and list(after.dir.queue.iterdir()) == []
    after.stop()


def test_messages_not_yet_due_at_start_are_tried_when_due(tmp_path: Path) -> None:
    before = Harness(tmp_path)
    entry = before.queue()
    entry.state.attempts = 3
    entry.state.next_attempt = T0 + 500
    before.dir.save_state(entry)
    after = Harness(tmp_path)
    after.spool.load()
    after.start()
    assert after.upstream.arrived == []
    after.advance(499)
    assert after.upstream.arrived == []
    after.advance(1)
    assert len(after.upstream.arrived) == 1 and after.spool.entries == {}
    after.stop()


def test_a_vanished_spool_file_backs_off_then_leaves(tmp_path: Path, logged: list[str]) -> None:
    h = Harness(tmp_path, RetryPolicy(first=30, max_interval=30, lifetime=60))
    entry = h.queue()
    (h.dir.queue / f"{entry.id}.msg").unlink()  # removed by hand behind the gateway's back
    h.start()
    assert entry.state.attempts == 1 and "internal error" in entry.state.last_error
    h.advance(30)
    h.advance(30)
    assert h.spool.entries == {} and h.upstream.arrived == []
    assert any("no dead letter kept" in line for line in logged)
    h.stop()


def test_admin_retry_of_a_dead_letter_and_delete(h: Harness) -> None:
    h.upstream.script.mail_reply = b"550 5.7.1 no"
    entry = h.queue(sender="")
    h.start()
    assert entry.status == "dead"
    h.upstream.script.mail_reply = b"250 2.1.0 ok"
    h.dir.request("retry", entry.id)
    h.advance(2.0)
    assert [a.content for a in h.upstream.arrived] == [MESSAGE]
    assert list(h.dir.dead.iterdir()) == [] and h.spool.entries == {}

    h.advance(5.0)  # the idle connection closes
    h.upstream.script.down = True
    doomed = h.queue()
    h.settle()
    assert doomed.state.attempts == 1
    h.dir.request("delete", doomed.id)
    h.advance(2.0)
    assert h.spool.entries == {} and list(h.dir.queue.iterdir()) == []
    assert list(h.dir.control.iterdir()) == []


def test_body_8bitmime_only_when_the_upstream_offers_it(h: Harness) -> None:
    h.queue(b"Subject: caf\xc3\xa9\r\n\r\n\xe9\r\n", eight_bit=True)
    h.start()
    assert h.upstream.mail_commands[-1].endswith(b" BODY=8BITMIME")
    h.upstream.script.extensions = ("PIPELINING", "AUTH PLAIN")
    h.advance(5)  # the idle connection is gone; a new one learns the new EHLO
    h.queue(b"Subject: x\r\n\r\n\xe9\r\n", eight_bit=True)
    h.settle()
    assert h.upstream.mail_commands[-1] == b"MAIL FROM:<dev@scan.example.com>"
    assert len(h.upstream.arrived) == 2


def test_login_refused_is_retried_and_logged_as_an_error(h: Harness, logged: list[str]) -> None:
    h.upstream.script.password = b"changed-upstream"
    entry = h.queue()
    h.start()
    assert entry.state.attempts == 1 and h.upstream.arrived == []
    assert any(
        line.startswith("error") and "refused the login of account scanner" in line
        for line in logged
    )
    assert not any("account-pw" in line for line in logged)


def test_stray_entries_in_control_do_not_block_requests(tmp_path: Path, logged: list[str]) -> None:
    h = Harness(tmp_path)
    h.upstream.script.mail_reply = b"550 5.7.1 no"
    entry = h.queue(sender="")
    h.start()
    assert entry.status == "dead"
    h.upstream.script.mail_reply = b"250 2.1.0 ok"
    lookalike = f"retry.{new_id(T0)}"  # a directory under a request's name
    for directory in ("stray", lookalike):
        (h.dir.control / directory).mkdir()
    (h.dir.control / "garbage").write_bytes(b"\x00\xff not a request")
    h.dir.request("retry", entry.id)
    h.advance(2.0)
    assert [a.content for a in h.upstream.arrived] == [MESSAGE]
    assert h.spool.entries == {}
    assert sorted(p.name for p in h.dir.control.iterdir()) == sorted(["stray", lookalike])
    control = [line for line in logged if "queue control" in line]
    h.advance(2.0)
    h.advance(2.0)
    again = [line for line in logged if "queue control" in line]
    assert again == control  # each stray entry reported once, not every poll
    assert sum("'stray'" in line and "a directory" in line for line in control) == 1
    assert sum(lookalike in line and "a directory" in line for line in control) == 1
    assert sum("'garbage'" in line and "removed" in line for line in control) == 1
    assert not (h.dir.control / "garbage").exists() and (h.dir.control / "stray").is_dir()
    h.stop()


def test_an_unreadable_control_directory_is_reported_once(
    tmp_path: Path, logged: list[str]
) -> None:
    h = Harness(tmp_path)
    h.start()
    h.dir.control.rmdir()
    for _ in range(5):
        h.advance(2.0)
    assert sum("control directory unreadable" in line for line in logged) == 1
    h.dir.control.mkdir()
    h.advance(2.0)
    h.advance(2.0)
    assert sum("readable again" in line for line in logged) == 1
    h.stop()
