"""A device's login asks for its mailbox: the lock, or the refusal to send.

Kept apart from the POP3 state machine so that it reads the same whatever
backend answers: a lease, [IN-USE] naming the holder in the log, or - when
the backend cannot tell (state database unreachable) - `[SYS/TEMP]`, so the
device polls again later and is never let in without the lock.
"""

from __future__ import annotations

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
