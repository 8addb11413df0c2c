"""One POP3 session per account at a time, across all devices.

RFC 1939 gives a session an exclusive maildrop. The gateway enforces that
itself rather than trusting every upstream to lock (IMAP does not lock at
all, and Dovecot's POP3 lock is off by default).
"""

from __future__ import annotations

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


class AccountLocks:
    def __init__(self) -> None:
        self._held: dict[str, str] = {}

    def acquire(self, account: str, holder: str) -> bool:
        if account in self._held:
            return False
        self._held[account] = holder
        return True

    def release(self, account: str) -> None:
        self._held.pop(account, None)

    def holder(self, account: str) -> str | None:
        return self._held.get(account)
