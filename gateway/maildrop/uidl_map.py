"""The gateway-owned UIDL map of IMAP-backed accounts, kept by the state backend.

A POP3 device remembers which messages it has already downloaded by their
UIDL. For an IMAP folder the natural UIDL is "UIDVALIDITY.UID", but a folder
that is rebuilt or migrated gets a new UIDVALIDITY and renumbered UIDs, and
every device would then download the whole folder again. So the gateway keeps,
per account, the UIDL it gave each message together with what identifies the
message independently of IMAP numbering: its Message-ID, its size and its
INTERNALDATE. When the UIDVALIDITY (or the folder) changes, messages that
match an entry keep their old UIDL; only the others get new ones.

Every node and worker must give a message the same UIDL, also when several
notice a UIDVALIDITY change at once. So the map is changed only by `settle`,
one transaction that locks the account's map, looks at it as it is now and
either completes it (new messages get their UIDL, messages gone are
forgotten) or remaps it after a change, using what the caller fetched from
IMAP; whoever comes second finds the first one's result and keeps it. A
transaction never waits for IMAP: when it lacks the keys of some messages it
changes nothing and names them, the caller fetches them and settles again.

Two stores implement `UIDLMap`: `UIDStore` here (embedded: one SQLite file
in WAL mode, shared by the worker processes of a host; BEGIN IMMEDIATE
serialises writers, `busy_timeout` makes the others wait briefly instead of
failing) and `gateway.maildrop.uidl_map_pg.PostgresUIDLMap` (all nodes). A
crash leaves the old map or the new one; losing the last transaction to a
power cut is harmless, the same session would compute the same UIDLs again.
SQLite calls are synchronous and short (an indexed lookup or one batched
write per POP3 UIDL command), which is cheaper than handing them to a thread.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed

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
# Seconds a worker waits for another one's write before giving up (StateError).
BUSY_TIMEOUT = 5.0
# Rounds of "fetch the keys the map still lacks, settle again" before giving up.
SETTLE_ROUNDS = 4


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


@dataclass(frozen=True, slots=True)
class Settled:
    """What `settle` found: the UIDLs of the snapshot, or the UIDs it lacks keys for."""

    uidls: Mapping[int, str] = field(default_factory=dict)
    # Non-empty: nothing was written; fetch these messages' keys and settle again.
    missing: tuple[int, ...] = ()
    # Set when this call remapped the account after a folder or UIDVALIDITY change.
    remapped_from: MailboxState | None = None
    kept: int = 0


class MapTransaction(Protocol):
    """One account's map inside a transaction that holds it exclusively."""

    def mailbox(self) -> MailboxState | None: ...
    def uidls(self) -> dict[int, str]: ...
    def entries(self) -> list[Entry]: ...
    def set_mailbox(self, mailbox: MailboxState) -> None: ...
    def delete(self, uids: Collection[int]) -> None: ...
    def delete_all(self) -> None: ...
    def insert(self, entries: Sequence[Entry]) -> None: ...


class UIDLMap(Protocol):
    """Where the UIDL maps of IMAP-backed accounts are kept (embedded or shared)."""

    def settle(
        self,
        account: str,
        here: MailboxState,
        present: Sequence[int],
        keys: Mapping[int, MessageKey],
    ) -> Deferred[Settled]:
        """The UIDLs of the `present` UIDs of `here`, in one transaction (see `settle`).
        Fails with StateError (or StateUnavailable) when the store cannot be used."""
        ...


def settle(
    tx: MapTransaction,
    here: MailboxState,
    present: Sequence[int],
    keys: Mapping[int, MessageKey],
) -> Settled:
    """Complete or remap the map of one account for a snapshot of `here`.

    Runs inside the transaction: what it reads is what it writes over. When
    the map is of `here`, messages it does not hold get new UIDLs and
    messages no longer `present` are forgotten; otherwise (first login, or
    a folder/UIDVALIDITY change) the whole map is remapped with `rematch`.
    Either needs the keys of the messages involved: without all of them it
    writes nothing and returns them as `missing`.
    """
    before = tx.mailbox()
    if before == here:
        known = tx.uidls()
        need = [uid for uid in present if uid not in known]
        unkeyed = tuple(uid for uid in need if uid not in keys)
        if unkeyed:
            return Settled(missing=unkeyed)
        new = assign_new(here.uidvalidity, [(uid, keys[uid]) for uid in need], set(known.values()))
        keep = set(present)
        stale = [uid for uid in known if uid not in keep]
        if stale:
            tx.delete(stale)
        if new:
            tx.insert(new)
        known.update((e.uid, e.uidl) for e in new)
        return Settled({uid: known[uid] for uid in present})
    unkeyed = tuple(uid for uid in present if uid not in keys)
    if unkeyed:
        return Settled(missing=unkeyed)
    old = tx.entries() if before is not None else []
    entries = rematch(old, [(uid, keys[uid]) for uid in present], here.uidvalidity)
    tx.set_mailbox(here)
    tx.delete_all()
    tx.insert(entries)
    kept = sum(1 for e in entries if not e.uidl.startswith(f"{here.uidvalidity}."))
    return Settled({e.uid: e.uidl for e in entries}, remapped_from=before, kept=kept)


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
    """The UIDL map of every IMAP-backed account of one host (the embedded backend).

    Every public method raises StateError when the file cannot be used;
    `settle` fails its Deferred with it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        ensure_dir(path.parent)
        try:
            # Created private before SQLite opens it; SQLite gives its WAL and
            # shared-memory files the same mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            self._db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT)
            self._db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
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

    # -- the UIDLMap interface

    def settle(
        self,
        account: str,
        here: MailboxState,
        present: Sequence[int],
        keys: Mapping[int, MessageKey],
    ) -> Deferred[Settled]:
        try:
            return succeed(self.settle_now(account, here, present, keys))
        except StateError:
            return fail()

    @_guarded
    def settle_now(
        self,
        account: str,
        here: MailboxState,
        present: Sequence[int],
        keys: Mapping[int, MessageKey],
    ) -> Settled:
        """`settle`, answered synchronously (BEGIN IMMEDIATE: one writer at a time)."""
        with self._transaction():
            return settle(_SQLiteMap(self._db, account), here, present, keys)

    # -- reading

    @_guarded
    def mailbox(self, account: str) -> MailboxState | None:
        return _SQLiteMap(self._db, account).mailbox()

    @_guarded
    def known(self, account: str, uids: Iterable[int]) -> dict[int, str]:
        """UID -> UIDL for those of `uids` the map holds (current UIDVALIDITY only)."""
        wanted = set(uids)
        return {
            uid: uidl
            for uid, uidl in _SQLiteMap(self._db, account).uidls().items()
            if uid in wanted
        }

    @_guarded
    def entries(self, account: str) -> list[Entry]:
        return _SQLiteMap(self._db, account).entries()

    @_guarded
    def taken(self, account: str) -> set[str]:
        return set(_SQLiteMap(self._db, account).uidls().values())

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
        tx = _SQLiteMap(self._db, account)
        with self._transaction():
            tx.set_mailbox(mailbox)
            tx.delete([uid for uid in tx.uidls() if uid not in keep])
            tx.insert(entries)

    @_guarded
    def replace(self, account: str, mailbox: MailboxState, entries: Sequence[Entry]) -> None:
        """Replace the account's whole map (after a UIDVALIDITY or folder change)."""
        tx = _SQLiteMap(self._db, account)
        with self._transaction():
            tx.set_mailbox(mailbox)
            tx.delete_all()
            tx.insert(entries)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _SQLiteMap:
    """`MapTransaction` on the SQLite file, for one account."""

    def __init__(self, db: sqlite3.Connection, account: str) -> None:
        self._db = db
        self._account = account

    def mailbox(self) -> MailboxState | None:
        row = self._db.execute(
            "SELECT folder, uidvalidity FROM mailbox WHERE account = ?", (self._account,)
        ).fetchone()
        return None if row is None else MailboxState(row[0], row[1])

    def uidls(self) -> dict[int, str]:
        rows = self._db.execute("SELECT uid, uidl FROM message WHERE account = ?", (self._account,))
        return dict(rows)

    def entries(self) -> list[Entry]:
        rows = self._db.execute(
            "SELECT uid, uidl, message_id, size, internaldate FROM message WHERE account = ?",
            (self._account,),
        )
        return [
            Entry(uid, uidl, MessageKey(mid, size, date)) for uid, uidl, mid, size, date in rows
        ]

    def set_mailbox(self, mailbox: MailboxState) -> None:
        self._db.execute(
            "INSERT INTO mailbox (account, folder, uidvalidity) VALUES (?, ?, ?) "
            "ON CONFLICT (account) DO UPDATE SET folder = excluded.folder, "
            "uidvalidity = excluded.uidvalidity",
            (self._account, mailbox.folder, mailbox.uidvalidity),
        )

    def delete(self, uids: Collection[int]) -> None:
        self._db.executemany(
            "DELETE FROM message WHERE account = ? AND uid = ?",
            [(self._account, uid) for uid in uids],
        )

    def delete_all(self) -> None:
        self._db.execute("DELETE FROM message WHERE account = ?", (self._account,))

    def insert(self, entries: Sequence[Entry]) -> None:
        self._db.executemany(
            "INSERT INTO message (account, uid, uidl, message_id, size, internaldate) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (self._account, e.uid, e.uidl, e.key.message_id, e.key.size, e.key.internaldate)
                for e in entries
            ],
        )


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
