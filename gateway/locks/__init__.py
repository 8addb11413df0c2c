"""One POP3 session per mailbox at a time, across all devices, worker
processes and nodes.

`MailboxLocks` (gateway.locks.interface) is what the POP3 server asks; the
backend decides how far the lock reaches (gateway.locks.choose):

- `AccountLocks` (gateway.locks.memory): one process, in a dict;
- `FileMailboxLocks` (gateway.locks.files), the embedded backend: the worker
  processes of one host, through `flock` on one file per mailbox;
- `PostgresMailboxLocks` (gateway.locks.postgres): every node sharing one
  PostgreSQL database, through rows naming their holder process.
"""

from __future__ import annotations

from gateway.locks.interface import InUse, LockUnavailable, MailboxLease, MailboxLocks, mailbox_key
from gateway.locks.memory import AccountLocks

__all__ = [
    "AccountLocks",
    "InUse",
    "LockUnavailable",
    "MailboxLease",
    "MailboxLocks",
    "mailbox_key",
]
