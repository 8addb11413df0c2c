"""The UIDL map in the shared PostgreSQL database: one map for every node.

Two nodes polling one IMAP-backed account must hand its devices the same
UIDLs, also right after a UIDVALIDITY change that both notice at once. Each
`settle` is one transaction (`Database.run`, on the state thread pool) that
first takes a transaction-level advisory lock on the account, so the
complete-or-remap of `gateway.maildrop.uidl_map.settle` runs on one node at a
time per account: the node that comes second reads the first one's result
and keeps it. The lock also covers an account's first login, when there is
no row yet to lock. Tables: `gateway_uidl_mailboxes`, `gateway_uidl_messages`
(migration 0006).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import psycopg
from twisted.internet.defer import Deferred

from gateway.maildrop.uidl_map import Entry, MailboxState, MessageKey, Settled, settle
from gateway.state.database import Database

# pg_advisory_xact_lock(key1, key2): key1 names this kind of lock ("uidl"),
# key2 is the account's hash; a hash collision only serialises two accounts.
_LOCK_CLASS = 0x7569646C


class PostgresUIDLMap:
    """`UIDLMap` on the state database."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def settle(
        self,
        account: str,
        here: MailboxState,
        present: Sequence[int],
        keys: Mapping[int, MessageKey],
    ) -> Deferred[Settled]:
        present, keys = tuple(present), dict(keys)

        def work(connection: psycopg.Connection[Any]) -> Settled:
            connection.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_CLASS, account)
            )
            return settle(_PostgresMap(connection, account), here, present, keys)

        return self._database.run(work)


class _PostgresMap:
    """`MapTransaction` on one connection, for one account."""

    def __init__(self, connection: psycopg.Connection[Any], account: str) -> None:
        self._db = connection
        self._account = account

    def mailbox(self) -> MailboxState | None:
        row = self._db.execute(
            "SELECT folder, uidvalidity FROM gateway_uidl_mailboxes WHERE account = %s",
            (self._account,),
        ).fetchone()
        return None if row is None else MailboxState(row[0], int(row[1]))

    def uidls(self) -> dict[int, str]:
        rows = self._db.execute(
            "SELECT uid, uidl FROM gateway_uidl_messages WHERE account = %s", (self._account,)
        )
        return {int(uid): uidl for uid, uidl in rows}

    def entries(self) -> list[Entry]:
        rows = self._db.execute(
            "SELECT uid, uidl, message_id, size, internaldate FROM gateway_uidl_messages"
            " WHERE account = %s",
            (self._account,),
        )
        return [
            Entry(int(uid), uidl, MessageKey(mid, int(size), date))
            for uid, uidl, mid, size, date in rows
        ]

    def set_mailbox(self, mailbox: MailboxState) -> None:
        self._db.execute(
            "INSERT INTO gateway_uidl_mailboxes (account, folder, uidvalidity)"
            " VALUES (%s, %s, %s) ON CONFLICT (account) DO UPDATE"
            " SET folder = excluded.folder, uidvalidity = excluded.uidvalidity,"
            " changed_at = now()",
            (self._account, mailbox.folder, mailbox.uidvalidity),
        )

    def delete(self, uids: Collection[int]) -> None:
        self._db.execute(
            "DELETE FROM gateway_uidl_messages WHERE account = %s AND uid = ANY(%s)",
            (self._account, list(uids)),
        )

    def delete_all(self) -> None:
        self._db.execute("DELETE FROM gateway_uidl_messages WHERE account = %s", (self._account,))

    def insert(self, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        with self._db.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO gateway_uidl_messages"
                " (account, uid, uidl, message_id, size, internaldate)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                [
                    (self._account, e.uid, e.uidl, e.key.message_id, e.key.size, e.key.internaldate)
                    for e in entries
                ],
            )
