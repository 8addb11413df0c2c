"""The durable spool's files, crash leftovers, group commit; the relay policy,
From: rewriting and bounce format units that sit next to it."""

from __future__ import annotations

import email
import email.policy
import ipaddress
import json
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed

from gateway.model import ANY_ADDRESS, Account, Device, Secret
from gateway.smtp import dsn
from gateway.smtp.headers import MAX_HEADER, FromRewriter, rewrite_from
from gateway.smtp.policy import NetworkDevices, envelope_sender, sender_allowed
from gateway.smtp.spool import (
    DeliveryState,
    Envelope,
    GroupCommit,
    QueueEntry,
    SpoolDir,
    SpoolError,
    new_id,
    read_envelope,
    valid_id,
)

T0 = 1_700_000_000.0


def envelope(message_id: str | None = None, size: int = 0, **kw: Any) -> Envelope:
    fields: dict[str, Any] = {
        "id": message_id or new_id(T0),
        "account": "scanner",
        "device": "printer",
        "peer": "10.0.0.1",
        "identified_by": "password",
        "original_sender": "dev@scan.example.com",
        "sender": "dev@scan.example.com",
        "recipients": ("a@example.org",),
        "received": T0,
        "size": size,
        "eight_bit": False,
    }
    fields.update(kw)
    return Envelope(**fields)


@pytest.fixture
def spool(tmp_path: Path) -> SpoolDir:
    return SpoolDir(tmp_path / "spool").prepare()


# -- files -------------------------------------------------------------------------


def test_message_and_envelope_in_one_file(spool: SpoolDir) -> None:
    body = b"Subject: x\r\n\r\n" + b"\x00\xff binary-safe\r\n" * 100
    entry = spool.add(envelope(), body)
    path = spool.queue / f"{entry.id}.msg"
    assert read_envelope(path) == entry.envelope and entry.envelope.size == len(body)
    with spool.open_message(entry) as f:
        assert f.read(entry.envelope.size) == body
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [e.envelope for e in spool.scan()] == [entry.envelope]


def test_large_message_spills_to_tmp_then_commits(spool: SpoolDir) -> None:
    incoming = spool.incoming(new_id(T0))
    chunk = b"z" * 100_000 + b"\r\n"
    for _ in range(5):
        incoming.write(chunk)
    assert incoming.path.exists()
    entry = spool.commit(incoming, envelope(incoming.id, size=incoming.size))
    assert not incoming.path.exists()
    with spool.open_message(entry) as f:
        assert f.read(entry.envelope.size) == chunk * 5


def test_crash_leftovers_are_cleaned_at_start(spool: SpoolDir) -> None:
    kept = spool.add(envelope(), b"kept\r\n")
    (spool.tmp / "20240101000000-00000000.msg").write_bytes(b"half a message")
    (spool.queue / "20240101000000-11111111.state").write_bytes(b"{}")  # its .msg is gone
    (spool.queue / ".x.state.abc.tmp").write_bytes(b"torn")
    assert [e.id for e in spool.scan(clean=False)] == [kept.id]
    assert len(list(spool.tmp.iterdir())) == 1  # a read-only look removes nothing
    assert [e.id for e in spool.scan()] == [kept.id]
    assert list(spool.tmp.iterdir()) == []
    assert sorted(p.name for p in spool.queue.iterdir()) == [f"{kept.id}.msg"]


def test_a_damaged_file_is_skipped_not_fatal(spool: SpoolDir) -> None:
    good = spool.add(envelope(), b"good\r\n")
    (spool.queue / "20240101000000-22222222.msg").write_bytes(b"no trailer here")
    assert [e.id for e in spool.scan()] == [good.id]
    assert (spool.queue / "20240101000000-22222222.msg").exists()  # left for the admin
    with pytest.raises(SpoolError):
        spool.read("20240101000000-22222222")


def _rewrite_envelope(spool: SpoolDir, message_id: str, change: Any) -> None:
    """Replace the envelope trailer of a spooled message with `change(document)`."""
    path = spool.queue / f"{message_id}.msg"
    envelope = read_envelope(path)
    message = path.read_bytes()[: envelope.size]
    document = json.loads(envelope.to_json())
    change(document)
    blob = json.dumps(document).encode()
    path.write_bytes(message + blob + b"\n" + b"GWSPOOL1 " + b"%010d\n" % len(blob))


@pytest.mark.parametrize(
    ("change", "reported"),
    [
        (lambda d: d.update(size="6"), "$.size"),
        (lambda d: d.update(recipients=[1]), "$.recipients"),
        (lambda d: d.pop("sender"), "required field missing @ $.sender"),
        (lambda d: d.update(junk=1), "extra fields found (junk)"),
    ],
    ids=["wrong-type", "wrong-item-type", "missing", "extra"],
)
def test_a_damaged_envelope_is_reported_with_its_field(
    spool: SpoolDir, change: Any, reported: str
) -> None:
    good = spool.add(envelope(), b"good\r\n")
    bad = spool.add(envelope(new_id(T0)), b"bad!\r\n")
    _rewrite_envelope(spool, bad.id, change)
    assert [e.id for e in spool.scan()] == [good.id]
    with pytest.raises(SpoolError, match="is damaged") as info:
        spool.read(bad.id)
    assert reported in str(info.value)


@pytest.mark.parametrize(
    ("document", "reported"),
    [
        ({"attempts": "3"}, "$.attempts"),
        ({"delivered": "a@x.org"}, "$.delivered"),
        ({"failed": {"a@x.org": 550}}, "$.failed"),
        ({"retry_base": None, "junk": True}, "extra fields found (junk)"),
        ([1, 2], "expected a JSON object"),
    ],
    ids=["wrong-type", "string-for-list", "wrong-value-type", "extra", "not-an-object"],
)
def test_a_damaged_state_file_is_reported_with_its_field(
    spool: SpoolDir, document: Any, reported: str
) -> None:
    entry = spool.add(envelope(), b"m\r\n")
    (spool.queue / f"{entry.id}.state").write_text(json.dumps(document))
    with pytest.raises(SpoolError, match="is damaged") as info:
        spool.read(entry.id)
    assert reported in str(info.value)
    assert spool.scan() == []  # skipped, left for the admin
    assert (spool.queue / f"{entry.id}.state").exists()


def test_a_state_file_missing_optional_fields_takes_their_defaults(spool: SpoolDir) -> None:
    entry = spool.add(envelope(), b"m\r\n")
    (spool.queue / f"{entry.id}.state").write_text('{"attempts": 2, "next_attempt": 5}')
    read = spool.read(entry.id)
    assert read is not None
    assert read.state == DeliveryState(attempts=2, next_attempt=5.0)


def test_records_round_trip(spool: SpoolDir) -> None:
    entry = spool.add(envelope(recipients=("a@x.org", "b@x.org"), body="8BITMIME"), b"m\r\n")
    entry.state.failed = {"b@x.org": "550 no"}
    entry.state.delivered = ["a@x.org"]
    entry.state.retry_base = T0
    spool.save_state(entry)
    read = spool.read(entry.id)
    assert read is not None
    assert read.envelope == entry.envelope and read.state == entry.state


def test_state_bury_revive_remove(spool: SpoolDir) -> None:
    entry = spool.add(envelope(recipients=("a@x.org", "b@x.org")), b"m\r\n")
    entry.state.attempts = 3
    entry.state.delivered = ["a@x.org"]
    spool.save_state(entry)
    assert spool.read(entry.id).state.attempts == 3  # type: ignore[union-attr]
    spool.bury(entry, "<b@x.org>: 550 5.1.1 no")
    assert entry.status == "dead" and not (spool.queue / f"{entry.id}.msg").exists()
    dead = spool.read(entry.id)
    assert dead is not None and dead.status == "dead"
    assert dead.state.dead_reason == "<b@x.org>: 550 5.1.1 no"
    spool.retry_now(dead, T0 + 100)
    assert dead.status == "queued" and dead.state.delivered == ["a@x.org"]
    assert dead.pending == ["b@x.org"] and dead.state.retry_base == T0 + 100
    assert list(spool.dead.iterdir()) == []
    spool.remove(dead)
    assert list(spool.queue.iterdir()) == []


def test_ids() -> None:
    a, b = new_id(T0), new_id(T0)
    assert a != b and valid_id(a) and a.startswith("20231114221320-")
    assert not valid_id("../../etc/passwd") and not valid_id("20231114221320-XYZ")


def test_lock_refuses_a_second_gateway(spool: SpoolDir) -> None:
    spool.lock()
    with spool.offline() as offline:
        assert not offline
    other = SpoolDir(spool.root)
    with pytest.raises(SpoolError, match="in use by another gateway"):
        other.lock(timeout=0.1)
    spool.unlock()
    with spool.offline() as offline:
        assert offline


def test_requests(spool: SpoolDir) -> None:
    message_id = new_id(T0)
    spool.request("retry", message_id)
    (spool.control / "junk").write_bytes(b"")
    assert spool.requests() == [("retry", message_id)]
    assert not (spool.control / "junk").exists()
    spool.request_done("retry", message_id)
    assert spool.requests() == []
    with pytest.raises(ValueError):
        spool.request("delete", "../x")


def test_requests_skip_what_is_not_a_request_file(spool: SpoolDir) -> None:
    first, second = new_id(T0), new_id(T0 + 1)
    lookalike = f"delete.{new_id(T0)}"
    spool.request("retry", first)
    spool.request("delete", second)
    os.utime(spool.control / f"retry.{first}", (T0, T0))
    os.utime(spool.control / f"delete.{second}", (T0 + 5, T0 + 5))
    (spool.control / "a-directory").mkdir()
    (spool.control / lookalike).mkdir()
    (spool.control / "link").symlink_to(spool.control / "nowhere")
    os.mkfifo(spool.control / "fifo")
    (spool.control / "garbage").write_bytes(b"\x00\xff")
    assert spool.requests() == [("retry", first), ("delete", second)]
    left = {"a-directory", lookalike, "link", "fifo"}
    assert {p.name for p in spool.control.iterdir()} == left | {
        f"retry.{first}",
        f"delete.{second}",
    }
    spool.request_done("retry", first)
    spool.request_done("delete", second)
    assert spool.requests() == []
    assert {p.name for p in spool.control.iterdir()} == left


def test_a_request_being_written_is_left_to_its_writer(spool: SpoolDir) -> None:
    writing = spool.control / ".retry.x.tmp"
    writing.write_bytes(b"")
    assert spool.requests() == [] and writing.exists()
    os.utime(writing, (T0, T0))  # left behind by a command that died long ago
    assert spool.requests() == [] and not writing.exists()


def test_a_request_whose_file_cannot_be_removed_is_not_repeated(
    spool: SpoolDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    message_id = new_id(T0)
    spool.request("retry", message_id)
    assert spool.requests() == [("retry", message_id)]
    unlink = Path.unlink

    def refuse(self: Path, missing_ok: bool = False) -> None:
        if self.name == f"retry.{message_id}":
            raise PermissionError(13, "Permission denied")
        unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse)
    spool.request_done("retry", message_id)
    assert (spool.control / f"retry.{message_id}").exists()
    assert spool.requests() == []
    monkeypatch.undo()
    # Once it is gone, the same request may come again and is carried out.
    (spool.control / f"retry.{message_id}").unlink()
    assert spool.requests() == []
    spool.request("retry", message_id)
    assert spool.requests() == [("retry", message_id)]


def test_group_commit_batches_while_busy() -> None:
    calls: list[list[int]] = []
    pending: list[tuple[Deferred[list[int]], list[int]]] = []

    def run_later(f: Any, items: list[int]) -> Deferred[list[int]]:
        calls.append(items)
        d: Deferred[list[int]] = Deferred()
        pending.append((d, items))
        return d

    group = GroupCommit(lambda items: [i * 10 for i in items], run_later)
    results: list[int] = []
    for i in range(4):
        group.submit(i).addCallback(results.append)
    assert calls == [[0]]  # the first goes at once; the rest wait for it
    d, items = pending.pop(0)
    d.callback([i * 10 for i in items])
    assert calls == [[0], [1, 2, 3]] and results == [0]
    d, items = pending.pop(0)
    d.callback([ValueError("disk"), 20, 30])  # type: ignore[list-item]
    assert results == [0, 20, 30]


def test_commit_many_reports_each_failure(spool: SpoolDir) -> None:
    good = spool.incoming(new_id(T0))
    good.write(b"ok\r\n")
    bad = spool.incoming(new_id(T0))
    bad.write(b"x\r\n")
    os.rmdir(spool.tmp)  # creating bad's file will fail...
    spool.tmp.mkdir()
    bad.path = spool.root / "missing-dir" / "x.msg"  # ...here
    results = spool.commit_many([(good, envelope(good.id, 4)), (bad, envelope(bad.id, 3))])
    assert isinstance(results[0], QueueEntry) and isinstance(results[1], OSError)
    assert [e.id for e in spool.scan()] == [good.id]


# -- who may relay, as whom --------------------------------------------------------------


def device(name: str, nets: tuple[str, ...], relay: bool = True, **kw: Any) -> Device:
    return Device(
        name=name,
        password_hash=Secret("x"),
        account="scanner",
        allow_from=tuple(ipaddress.ip_network(n) for n in nets) if nets else ANY_ADDRESS,
        relay_without_auth=relay,
        **kw,
    )


def test_network_devices_most_specific_wins_and_any_is_ignored() -> None:
    table = NetworkDevices.from_devices(
        [
            device("floor", ("10.1.0.0/16",)),
            device("printer", ("10.1.2.3/32", "2001:db8::/64")),
            device("open", ()),
            device("wide-open", ("0.0.0.0/0",)),
            device("authed", ("10.9.0.0/16",), relay=False),
            device("popper", ("10.8.0.0/16",), protocols=frozenset({"pop3"})),
        ]
    )
    assert table.ignored == ("open", "wide-open")
    assert table.find("10.1.2.3").name == "printer"  # type: ignore[union-attr]
    assert table.find("::ffff:10.1.2.3").name == "printer"  # type: ignore[union-attr]
    assert table.find("10.1.7.7").name == "floor"  # type: ignore[union-attr]
    assert table.find("2001:db8::5").name == "printer"  # type: ignore[union-attr]
    for stranger in ("10.9.0.1", "10.8.0.1", "192.0.2.1", "not-an-ip"):
        assert table.find(stranger) is None


def test_sender_policy() -> None:
    plain = Account("a", "p", "scanner@example.com")
    assert sender_allowed(plain, "Scanner@Example.com")
    assert not sender_allowed(plain, "other@example.com")
    assert not sender_allowed(plain, "")
    assert envelope_sender(plain, "scanner@example.com") == "scanner@example.com"
    listed = Account(
        "a",
        "p",
        "scanner@example.com",
        allowed_senders=("boss@example.com", "*@scan.example.com"),
        rewrite_sender=True,
    )
    assert sender_allowed(listed, "boss@EXAMPLE.com") and sender_allowed(
        listed, "x@scan.example.com"
    )
    assert not sender_allowed(listed, "x@sub.scan.example.com")
    assert not sender_allowed(listed, "x@example.com")
    assert sender_allowed(listed, "")  # the null sender, rewritten anyway
    assert envelope_sender(listed, "x@scan.example.com") == "scanner@example.com"


# -- From: rewriting ------------------------------------------------------------------------


def test_rewrite_from_keeps_the_display_name_and_folding_elsewhere() -> None:
    header = (
        b"Subject: a\r\n long subject\r\n"
        b'From: "M\xc3\xbcller, Hans"\r\n <hans@scan.example.com>\r\n'
        b"To: x@example.org\r\n"
    )
    out = rewrite_from(header, "scanner@example.com")
    assert out.startswith(b"Subject: a\r\n long subject\r\nFrom: ")
    assert out.endswith(b" <scanner@example.com>\r\nTo: x@example.org\r\n")
    parsed = email.message_from_bytes(out + b"\r\n", policy=email.policy.default)
    assert parsed["From"].addresses[0].display_name == "M\u00fcller, Hans"
    assert rewrite_from(b"Subject: s\n", "s@e.com") == b"From: <s@e.com>\nSubject: s\n"
    same = b"From: Scanner <scanner@example.com>\r\n"
    assert rewrite_from(same, "scanner@example.com") == same


def test_from_rewriter_streams_at_any_split() -> None:
    message = b'Subject: s\r\nFrom: "A" <a@x.org>\r\n\r\nFrom: not a header\r\nbody\r\n'
    expected = b"Subject: s\r\nFrom: A <s@e.com>\r\n\r\nFrom: not a header\r\nbody\r\n"
    for cut in range(len(message) + 1):
        rewriter = FromRewriter("s@e.com")
        out = rewriter.feed(message[:cut]) + rewriter.feed(message[cut:]) + rewriter.close()
        assert out == expected, cut
    rewriter = FromRewriter("s@e.com")  # a message that is all header
    assert rewriter.feed(b"From: a@x.org\r\n") + rewriter.close() == b"From: s@e.com\r\n"


def test_from_rewriter_gives_up_on_a_huge_header() -> None:
    rewriter = FromRewriter("s@e.com")
    huge = b"X-Junk: " + b"j" * (MAX_HEADER + 10) + b"\r\nFrom: a@x.org\r\n\r\nbody\r\n"
    assert rewriter.feed(huge) + rewriter.close() == huge


# -- bounces ------------------------------------------------------------------------------------


def test_bounce_is_an_rfc3464_report() -> None:
    env = envelope(recipients=("bad@example.org", "good@example.org"))
    raw = dsn.build_bounce(
        env,
        {"bad@example.org": dsn.Failure("5.1.1", "550 5.1.1 no such\r\n user")},
        reporting_mta="gw.test",
        from_address="scanner@example.com",
        headers=dsn.original_headers(b"Subject: scan\r\nFrom: x\r\n\r\nbody"),
        now=T0 + 60,
    )
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["To"].addresses[0].addr_spec == "dev@scan.example.com"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    human, status, headers = message.iter_parts()
    assert human.get_content_type() == "text/plain" and "bad@example.org" in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    text = raw.decode()
    assert "Reporting-MTA: dns; gw.test" in text
    assert "Final-Recipient: rfc822; bad@example.org\r\nAction: failed\r\nStatus: 5.1.1" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in text
    assert "good@example.org" not in text
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: scan" in text and "body" not in text.split("text/rfc822-headers")[1]
    assert all(line.endswith(b"\r") or not line for line in raw.split(b"\n")[:-1])


def test_original_headers_only() -> None:
    assert dsn.original_headers(b"A: 1\r\nB: 2\r\n\r\nbody") == b"A: 1\r\nB: 2\r\n"
    assert dsn.original_headers(b"A: 1\nB: 2\n\nbody") == b"A: 1\r\nB: 2\r\n"
    assert dsn.original_headers(b"A: " + b"x" * 100_000) == b""


def test_delivery_state_round_trip() -> None:
    state = DeliveryState(attempts=2, next_attempt=T0, delivered=["a"], failed={"b": "550"})
    assert DeliveryState.from_json(state.to_json()) == state
    env = envelope(bounce_of="x")
    assert Envelope.from_json(env.to_json()) == env


def test_queue_entry_pending_and_expiry() -> None:
    entry = QueueEntry(envelope(recipients=("a", "b", "c")), DeliveryState(delivered=["a"]))
    entry.state.failed["c"] = "550"
    assert entry.pending == ["b"] and entry.expires == T0
    entry.state.retry_base = T0 + 5
    assert entry.expires == T0 + 5
    assert succeed(None).called
