"""A device's login asks for its mailbox: the lock, or the refusal to send.

Kept apart from the POP3 state machine so that it reads the same whatever
backend answers: a lease, [IN-USE] naming the holder in the log, or - when
the backend cannot tell (state database unreachable) - `[SYS/TEMP]`, so the
device polls again later and is never let in without the lock.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gateway.locks.interface import InUse, LockUnavailable, MailboxLease, MailboxLocks, mailbox_key
from gateway.model import Account
from gateway.sessions import log_value

log = Logger(namespace="gateway.pop3")

# (-ERR text, RFC 2449/3206 response code)
Refusal = tuple[str, str]


async def lock_mailbox(
    locks: MailboxLocks, account: Account, device: str, peer: str
) -> MailboxLease | Refusal:
    fields = {
        "device": log_value(device),
        "peer": log_value(peer),
        "account": log_value(account.name),
    }
    try:
        lock = await locks.acquire(mailbox_key(account), device)
    except LockUnavailable as e:
        log.warn(
            "pop3 device {device} from {peer}: mailbox lock of account {account}"
            " unavailable: {error}",
            error=str(e),
            **fields,
        )
        return "mailbox lock unavailable, try again later", "SYS/TEMP"
    if isinstance(lock, InUse):
        where = f" in process {log_value(lock.process)}" if lock.process else ""
        log.info(
            "pop3 device {device} from {peer}: account {account} is in use by {holder}{where}",
            holder=log_value(lock.holder or "-"),
            where=where,
            **fields,
        )
        return "mailbox in use by another session", "IN-USE"
    return lock


# Longest a QUIT's +OK waits for its lock's release to be stored.
RELEASE_WAIT = 2.0


def released(release: Deferred[None], clock: IReactorTime) -> Deferred[None]:
    """Fires when `release` has freed the lock, or after `RELEASE_WAIT`.

    A POP3 QUIT answers only then, so the device's next session - which
    HAProxy may send to another node - finds the mailbox free instead of
    [IN-USE]. Bounded, because a release the database missed is retried by
    the backend on its own, and the device must not wait for that."""
    done: Deferred[None] = Deferred()

    def fire(_: object = None) -> None:
        if not done.called:
            done.callback(None)

    release.addBoth(fire)
    if not done.called:
        timer = clock.callLater(RELEASE_WAIT, fire)
        done.addBoth(lambda result: timer.cancel() if timer.active() else None)
    return done
