"""Mailbox locks inside one process: enough when one process serves every
device (and for tests that build a POP3 server without a state backend)."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

from gateway.locks.interface import InUse, MailboxLease


class AccountLocks:
    """`MailboxLocks` in a dict; answers at once."""

    def __init__(self) -> None:
        self._held: dict[str, MailboxLease] = {}

    def acquire(self, key: str, label: str) -> Deferred[MailboxLease | InUse]:
        held = self._held.get(key)
        if held is not None:
            return succeed(InUse(held.label))
        lease = self._held[key] = MailboxLease(key, label)
        return succeed(lease)

    def release(self, lease: MailboxLease) -> Deferred[None]:
        if self._held.get(lease.key) is lease:
            del self._held[lease.key]
        return succeed(None)

    def holder(self, key: str) -> str | None:
        held = self._held.get(key)
        return held.label if held is not None else None
