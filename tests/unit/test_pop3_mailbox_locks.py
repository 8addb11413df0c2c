"""The POP3 server and its mailbox locks when the lock is slow, unavailable
or lost (the PostgreSQL backend's cases), on in-memory transports."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail

from gateway.locks import AccountLocks, InUse, LockUnavailable, MailboxLease
from tests.helpers.log_lines import captured_log
from tests.unit.test_pop3_server import Gateway


class ControlledLocks(AccountLocks):
    """In-memory locks whose next answer the test decides."""

    def __init__(self) -> None:
        super().__init__()
        self.next: Deferred[None] | None = None
        self.leases: list[MailboxLease] = []
        self.released: list[MailboxLease] = []

    def acquire(self, key: str, label: str) -> Deferred[MailboxLease | InUse]:
        """`next` first, if set: its failure, or the lock once it fires."""
        if self.next is None:
            return self._acquire(key, label)
        pending, self.next = self.next, None
        return pending.addCallback(lambda _: self._acquire(key, label))

    def _acquire(self, key: str, label: str) -> Deferred[MailboxLease | InUse]:
        return super().acquire(key, label).addCallback(self._note)

    def _note(self, answer: MailboxLease | InUse) -> MailboxLease | InUse:
        if isinstance(answer, MailboxLease):
            self.leases.append(answer)
        return answer

    def release(self, lease: MailboxLease) -> Deferred[None]:
        self.released.append(lease)
        return super().release(lease)


def gateway_with(locks: AccountLocks) -> Gateway:
    gw = Gateway()
    gw.factory.locks = locks
    return gw


def test_an_unavailable_lock_is_a_temporary_failure_with_a_log_line() -> None:
    locks = ControlledLocks()
    gw = gateway_with(locks)
    dev = gw.connect()
    locks.next = fail(LockUnavailable("state database: connection refused"))
    with captured_log() as lines:
        reply = dev.login()
    assert reply == b"-ERR [SYS/TEMP] mailbox lock unavailable, try again later\r\n"
    assert gw.maildrops == [] and locks.leases == []
    assert any(
        "mailbox lock of account scanner unavailable: state database: connection refused" in line
        for line in lines
    ), lines
    # The device may try again in the same session once the lock can be had.
    assert dev.login().startswith(b"+OK maildrop has 2 messages")


def test_a_lost_lock_drops_the_session_without_deleting() -> None:
    locks = ControlledLocks()
    gw = gateway_with(locks)
    dev = gw.connect()
    dev.login()
    assert dev.send(b"DELE 1") == b"+OK message 1 deleted\r\n"
    (lease,) = locks.leases
    lease.lost()
    assert dev.read() == b"-ERR [SYS/TEMP] mailbox lock lost, closing connection\r\n"
    gw.clock.advance(10)
    assert dev.closed
    dev.proto.connectionLost(None)
    (drop,) = gw.maildrops
    assert drop.aborted and drop.committed is None
    assert locks.released == [lease]
    # The mailbox is free for the next session (here: of this process).
    assert gw.connect().login("copier").startswith(b"+OK maildrop")


def test_a_lock_granted_after_the_device_left_is_released_at_once() -> None:
    locks = ControlledLocks()
    gw = gateway_with(locks)
    dev = gw.connect()
    slow: Deferred[None] = Deferred()
    locks.next = slow
    dev.send(b"USER printer")
    dev.proto.dataReceived(b"PASS printer-pw\r\n")
    dev.drop()
    slow.callback(None)
    assert gw.maildrops == []
    assert locks.released == locks.leases and len(locks.leases) == 1
    assert gw.connect().login("copier").startswith(b"+OK maildrop")
