"""The gateway-owned UIDL map of IMAP-backed accounts, in the state directory.

A POP3 device remembers which messages it has already downloaded by their
UIDL. For an IMAP folder the natural UIDL is "UIDVALIDITY.UID", but a folder
that is rebuilt or migrated gets a new UIDVALIDITY and renumbered UIDs, and
every device would then download the whole folder again. So the gateway keeps,
per account, the UIDL it gave each message together with what identifies the
message independently of IMAP numbering: its Message-ID, its size and its
INTERNALDATE. When the UIDVALIDITY (or the folder) changes, messages that
match an entry keep their old UIDL; only the others get new ones.

Storage is one SQLite file (WAL mode). Every change is one transaction, so a
crash leaves the old map or the new one. Losing the last transaction to a
power cut is harmless: the same session would compute the same UIDLs again.
Calls are synchronous and short (an indexed lookup or one batched write per
POP3 UIDL command), which is cheaper than handing them to a thread.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from gateway.state import StateError, ensure_dir

FILENAME = "imap-uidl.sqlite3"

P = ParamSpec("P")
R = TypeVar("R")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mailbox (
    account     TEXT PRIMARY KEY,
    folder      TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS message (
    account     TEXT NOT NULL,
    uid         INTEGER NOT NULL,
    uidl        TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    size        INTEGER NOT NULL,
    internaldate TEXT NOT NULL,
    PRIMARY KEY (account, uid),
    UNIQUE (account, uidl)
);
"""
_VERSION = 1


@dataclass(frozen=True, slots=True)
class MessageKey:
    """What identifies a message whatever its IMAP UID: used only to re-match."""

    message_id: str
    size: int
    internaldate: str


@dataclass(frozen=True, slots=True)
class Entry:
    uid: int
    uidl: str
    key: MessageKey


@dataclass(frozen=True, slots=True)
class MailboxState:
    folder: str
    uidvalidity: int


def natural_uidl(uidvalidity: int, uid: int) -> str:
    """The UIDL of a message the map has never seen: stable while UIDVALIDITY is."""
    return f"{uidvalidity}.{uid}"


def assign_new(
    uidvalidity: int, new: Sequence[tuple[int, MessageKey]], taken: set[str]
) -> list[Entry]:
    """Entries for messages not in the map; a UIDL already used by the account
    (possible only if a UIDVALIDITY value comes back) gets a suffix."""
    entries: list[Entry] = []
    for uid, key in new:
        uidl = candidate = natural_uidl(uidvalidity, uid)
        n = 1
        while uidl in taken:
            n += 1
            uidl = f"{candidate}-{n}"
        taken.add(uidl)
        entries.append(Entry(uid, uidl, key))
    return entries


def rematch(
    old: Iterable[Entry], current: Sequence[tuple[int, MessageKey]], uidvalidity: int
) -> list[Entry]:
    """Entries for `current` after a UIDVALIDITY or folder change.

    A message whose key (Message-ID, size, INTERNALDATE) matches an old
    entry keeps that entry's UIDL. Identical keys (copies of one message)
    pair up in UID order, so a folder renumbered in order maps each copy to
    the UIDL it had. Everything else gets a new UIDL.
    """
    pool: dict[MessageKey, list[Entry]] = defaultdict(list)
    for entry in sorted(old, key=lambda e: e.uid):
        pool[entry.key].append(entry)
    kept: list[Entry] = []
    unmatched: list[tuple[int, MessageKey]] = []
    for uid, key in sorted(current):
        candidates = pool.get(key)
        if candidates:
            kept.append(Entry(uid, candidates.pop(0).uidl, key))
        else:
            unmatched.append((uid, key))
    taken = {e.uidl for e in kept}
    return sorted(kept + assign_new(uidvalidity, unmatched, taken), key=lambda e: e.uid)


def _guarded(method: Callable[P, R]) -> Callable[P, R]:
    """Report SQLite failures (disk full, file replaced) as StateError."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as e:
            raise StateError(f"UIDL store: {e}") from None

    return guarded


class UIDStore:
    """The UIDL map of every IMAP-backed account of one gateway.

    Every public method raises StateError when the file cannot be used.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        ensure_dir(path.parent)
        try:
            # Created private before SQLite opens it; SQLite gives its WAL and
            # shared-memory files the same mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _VERSION):
                raise StateError(f"{path} has schema version {version}; expected {_VERSION}")
            with self._transaction():
                # One statement at a time: executescript() would COMMIT first.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={_VERSION}")
        except (OSError, sqlite3.Error) as e:
            raise StateError(f"UIDL store {path}: {e}") from None

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> UIDStore:
        return cls(state_dir / FILENAME)

    def close(self) -> None:
        self._db.close()

    # -- reading

    @_guarded
    def mailbox(self, account: str) -> MailboxState | None:
        row = self._db.execute(
            "SELECT folder, uidvalidity FROM mailbox WHERE account = ?", (account,)
        ).fetchone()
        return None if row is None else MailboxState(row[0], row[1])

    @_guarded
    def known(self, account: str, uids: Iterable[int]) -> dict[int, str]:
        """UID -> UIDL for those of `uids` the map holds (current UIDVALIDITY only)."""
        wanted = set(uids)
        rows = self._db.execute("SELECT uid, uidl FROM message WHERE account = ?", (account,))
        return {uid: uidl for uid, uidl in rows if uid in wanted}

    @_guarded
    def entries(self, account: str) -> list[Entry]:
        rows = self._db.execute(
            "SELECT uid, uidl, message_id, size, internaldate FROM message WHERE account = ?",
            (account,),
        )
        return [
            Entry(uid, uidl, MessageKey(mid, size, date)) for uid, uidl, mid, size, date in rows
        ]

    @_guarded
    def taken(self, account: str) -> set[str]:
        rows = self._db.execute("SELECT uidl FROM message WHERE account = ?", (account,))
        return {uidl for (uidl,) in rows}

    # -- writing

    @_guarded
    def add(
        self, account: str, mailbox: MailboxState, entries: Sequence[Entry], present: Iterable[int]
    ) -> None:
        """Record new entries; forget messages no longer `present` in the folder.

        Only valid while `mailbox` is what `mailbox(account)` returns (or the
        account is new): the UIDs of both are of one UIDVALIDITY.
        """
        keep = set(present)
        with self._transaction():
            self._set_mailbox(account, mailbox)
            stale = [
                (account, uid)
                for (uid,) in self._db.execute(
                    "SELECT uid FROM message WHERE account = ?", (account,)
                )
                if uid not in keep
            ]
            self._db.executemany("DELETE FROM message WHERE account = ? AND uid = ?", stale)
            self._insert(account, entries)

    @_guarded
    def replace(self, account: str, mailbox: MailboxState, entries: Sequence[Entry]) -> None:
        """Replace the account's whole map (after a UIDVALIDITY or folder change)."""
        with self._transaction():
            self._set_mailbox(account, mailbox)
            self._db.execute("DELETE FROM message WHERE account = ?", (account,))
            self._insert(account, entries)

    def _set_mailbox(self, account: str, mailbox: MailboxState) -> None:
        self._db.execute(
            "INSERT INTO mailbox (account, folder, uidvalidity) VALUES (?, ?, ?) "
            "ON CONFLICT (account) DO UPDATE SET folder = excluded.folder, "
            "uidvalidity = excluded.uidvalidity",
            (account, mailbox.folder, mailbox.uidvalidity),
        )

    def _insert(self, account: str, entries: Sequence[Entry]) -> None:
        self._db.executemany(
            "INSERT INTO message (account, uid, uidl, message_id, size, internaldate) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (account, e.uid, e.uidl, e.key.message_id, e.key.size, e.key.internaldate)
                for e in entries
            ],
        )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
