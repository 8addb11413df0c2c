"""What a mailbox lock is, whichever backend keeps it.

RFC 1939 gives a POP3 session an exclusive maildrop. The gateway enforces
that itself rather than trusting every upstream to lock (IMAP does not lock
at all, and Dovecot's POP3 lock is off by default). With worker processes
and nodes the lock must hold across processes, so acquiring it may need the
state database: the interface is asynchronous even where an implementation
answers at once (in memory, file locks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.defer import Deferred

from gateway.model import Account


def mailbox_key(account: Account) -> str:
    """What two sessions must not share: the upstream mailbox, not the account
    name, so two accounts configured for the same mailbox still exclude each
    other. A POP3 maildrop is the upstream INBOX; IMAP and Graph ones a folder."""
    folder = account.folder if account.mailbox in ("imap", "graph") else "INBOX"
    if account.mailbox == "graph":
        # Exchange folder names ignore case ("inbox" is the well-known Inbox).
        folder = folder.strip("/").lower()
    return f"{account.provider}\0{account.username.lower()}\0{folder}"


class LockUnavailable(Exception):
    """Whether the mailbox is free cannot be known right now (the state
    database is unreachable, the lock directory unusable): the device is told
    to retry (`-ERR [SYS/TEMP]`), never let in unlocked. The text says why."""


@dataclass(frozen=True)
class InUse:
    """The mailbox is held by another session: `holder` is its device, for
    the log line, and `process` the gateway process holding it when that is
    another one whose name says more than a pid (PostgreSQL: node:pid:nonce)."""

    holder: str
    process: str | None = None


@dataclass(eq=False)
class MailboxLease:
    """One session's hold on one mailbox, until `MailboxLocks.release`."""

    key: str
    label: str
    # What the backend needs to release exactly this hold (a file descriptor,
    # a random token), never shown.
    handle: object = None
    _lost: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call `callback` if this process can no longer promise the lock
        (its state lease lapsed): the session must end without deleting."""
        self._lost.append(callback)

    def lost(self) -> None:
        callbacks, self._lost = self._lost, []
        for callback in callbacks:
            callback()


class MailboxLocks(Protocol):
    """At most one POP3 session per mailbox key, across whatever this
    backend spans (one process, one host's workers, every node)."""

    def acquire(self, key: str, label: str) -> Deferred[MailboxLease | InUse]:
        """Hold `key` for a session named `label` (the device), or say who
        holds it. Fails with `LockUnavailable` when it cannot be known."""
        ...

    def release(self, lease: MailboxLease) -> Deferred[None]:
        """Give `lease` up. Never fails: a backend that cannot release now
        retries on its own; the Deferred fires once the lock is free."""
        ...
