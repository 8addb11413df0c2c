"""The gateway-owned UIDL map: matching after a UIDVALIDITY change, and the SQLite store."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from gateway.maildrop.uidl_map import (
    Entry,
    MailboxState,
    MessageKey,
    UIDStore,
    assign_new,
    natural_uidl,
    rematch,
)
from gateway.state import StateError


def key(mid: str, size: int = 100, date: str = "1-Jan-2026 00:00:00 +0000") -> MessageKey:
    return MessageKey(mid, size, date)


def test_natural_uidl_is_a_valid_pop3_unique_id() -> None:
    uidl = natural_uidl(4294967295, 4294967295)
    assert uidl == "4294967295.4294967295"
    assert len(uidl) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in uidl)


def test_rematch_keeps_uidls_of_unchanged_messages() -> None:
    old = [
        Entry(1, "100.1", key("<a>")),
        Entry(2, "100.2", key("<b>")),
        Entry(3, "100.3", key("<c>")),
    ]
    # After the rebuild <a> is gone, <b> and <c> are renumbered, <d> is new.
    current = [(1, key("<b>")), (2, key("<c>")), (3, key("<d>"))]
    assert rematch(old, current, 200) == [
        Entry(1, "100.2", key("<b>")),
        Entry(2, "100.3", key("<c>")),
        Entry(3, "200.3", key("<d>")),
    ]


def test_rematch_needs_size_and_date_to_agree_too() -> None:
    old = [Entry(1, "100.1", key("<a>", size=10)), Entry(2, "100.2", key("<b>"))]
    current = [(1, key("<a>", size=11)), (2, key("<b>", date="2-Jan-2026 00:00:00 +0000"))]
    assert [e.uidl for e in rematch(old, current, 200)] == ["200.1", "200.2"]


def test_rematch_pairs_identical_copies_in_uid_order() -> None:
    old = [Entry(5, "100.5", key("")), Entry(9, "100.9", key("")), Entry(7, "100.7", key("<x>"))]
    current = [(2, key("")), (1, key("")), (3, key("")), (4, key("<x>"))]
    assert [e.uidl for e in rematch(old, current, 200)] == ["100.5", "100.9", "200.3", "100.7"]


def test_a_recurring_uidvalidity_cannot_produce_a_duplicate_uidl() -> None:
    # The folder went 100 -> 200 -> 100 again: "100.2" is still held by a kept message.
    old = [Entry(1, "100.2", key("<kept>"))]
    entries = rematch(old, [(1, key("<kept>")), (2, key("<new>"))], 100)
    assert [e.uidl for e in entries] == ["100.2", "100.2-2"]
    assert [e.uidl for e in assign_new(7, [(1, key("")), (2, key(""))], {"7.1"})] == [
        "7.1-2",
        "7.2",
    ]


@pytest.fixture
def store(tmp_path: Path) -> UIDStore:
    s = UIDStore.in_state_dir(tmp_path / "state")
    yield s
    s.close()


def test_store_add_known_and_prune(store: UIDStore) -> None:
    box = MailboxState("INBOX", 100)
    assert store.mailbox("acct") is None
    store.add("acct", box, [Entry(1, "100.1", key("<a>")), Entry(2, "100.2", key("<b>"))], [1, 2])
    assert store.mailbox("acct") == box
    assert store.known("acct", [1, 2, 3]) == {1: "100.1", 2: "100.2"}
    # Message 1 went away, 3 arrived.
    store.add("acct", box, [Entry(3, "100.3", key("<c>"))], [2, 3])
    assert store.known("acct", [1, 2, 3]) == {2: "100.2", 3: "100.3"}
    assert store.taken("acct") == {"100.2", "100.3"}
    assert store.known("other", [2]) == {}


def test_store_replace_and_persistence(tmp_path: Path) -> None:
    first = UIDStore.in_state_dir(tmp_path)
    first.add("acct", MailboxState("INBOX", 100), [Entry(1, "100.1", key("<a>"))], [1])
    first.replace("acct", MailboxState("INBOX", 200), [Entry(4, "100.1", key("<a>"))])
    first.close()
    again = UIDStore.in_state_dir(tmp_path)
    assert again.mailbox("acct") == MailboxState("INBOX", 200)
    assert again.entries("acct") == [Entry(4, "100.1", key("<a>"))]
    again.close()
    assert stat.S_IMODE((tmp_path / "imap-uidl.sqlite3").stat().st_mode) == 0o600


def test_a_failed_write_changes_nothing(store: UIDStore) -> None:
    box = MailboxState("INBOX", 100)
    store.add("acct", box, [Entry(1, "100.1", key("<a>"))], [1])
    with pytest.raises(StateError):
        # Two entries with one UIDL: the UNIQUE constraint refuses the second.
        store.replace(
            "acct", MailboxState("INBOX", 300), [Entry(1, "x", key("")), Entry(2, "x", key(""))]
        )
    assert store.mailbox("acct") == box
    assert store.known("acct", [1]) == {1: "100.1"}


def test_unusable_files_are_state_errors(tmp_path: Path) -> None:
    (tmp_path / "imap-uidl.sqlite3").write_bytes(b"not a database" * 100)
    with pytest.raises(StateError, match=r"imap-uidl\.sqlite3"):
        UIDStore.in_state_dir(tmp_path)
    newer = tmp_path / "newer"
    newer.mkdir(mode=0o700)
    with sqlite3.connect(newer / "imap-uidl.sqlite3") as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(StateError, match="schema version 99"):
        UIDStore.in_state_dir(newer)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(StateError, match="writable by others"):
        UIDStore.in_state_dir(shared)
