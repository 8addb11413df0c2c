"""What can go wrong with an upstream session, whatever its protocol.

Every upstream client (POP3, IMAP, SMTP) and the OAuth token code report a
failed upstream with these. They carry two texts: `str(self)` is short and
meant for the device (never an upstream's verbatim words), `detail` is for
the log. `code` is the RFC 2449 response code a POP3 device is shown; the
maildrop seam (`gateway.maildrop`) builds its error family on this one.
"""

from __future__ import annotations


class UpstreamError(Exception):
    """An upstream problem, with the texts and response code the device sees."""

    code: str | None = "SYS/TEMP"
    device_text = "mailbox temporarily unavailable, try again later"

    def __init__(self, detail: str = "", device_text: str | None = None) -> None:
        super().__init__(device_text or self.device_text)
        self.detail = detail


class UpstreamUnavailable(UpstreamError):
    """Unreachable, timed out, TLS failed, or answered something unusable."""

    code = "SYS/TEMP"
    device_text = "mailbox temporarily unavailable, try again later"


class UpstreamRejected(UpstreamError):
    """The upstream refused the account's credentials: an admin's problem."""

    code = "SYS/PERM"
    device_text = "the gateway cannot log in to the mailbox, ask the administrator"


class MailboxInUse(UpstreamError):
    """Another session holds the mailbox (the gateway's lock or the upstream's)."""

    code = "IN-USE"
    device_text = "mailbox in use by another session"


class UpstreamLost(UpstreamError):
    """The upstream connection broke during the session."""

    code = "SYS/TEMP"
    device_text = "connection to the mailbox lost"


def printable(text: bytes, limit: int | None = 200) -> str:
    """Upstream words made safe for one log line (a `detail`), cut at `limit` octets."""
    cut = text if limit is None else text[:limit]
    shown = cut.decode("utf-8", "replace")
    shown = "".join(c if c.isprintable() else "?" for c in shown)
    return shown + ("..." if limit is not None and len(text) > limit else "")


def describe_error(e: object) -> str:
    """`Type: text` (or just `Type`) for a log detail: the type says more than most texts."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
