"""How the relay tells an admin about upstream trouble without flooding the log.

A refused login that only an admin can fix (SMTP AUTH disabled, no rights,
wrong password, classified by `gateway.upstream.refusals`) is retried with
backoff like any failure, and each message's deferral is logged at warning
level, but the error line with the provider's code and the advice comes once
per account, and again only when the answer changes or after the account
could log in again in between.
"""

from __future__ import annotations

from twisted.logger import Logger

from gateway.oauth.refusal import RefusalKind
from gateway.upstream.smtp import SMTPUpstreamError

log = Logger(namespace="gateway.smtp.relay")


class UpstreamTrouble:
    """The upstream trouble of one account last logged at error level."""

    def __init__(self, account: str) -> None:
        self.account = account
        # A refused login's code, or what an admin must fix.
        self.current: str | None = None

    def failed(self, error: SMTPUpstreamError) -> None:
        refusal = error.refusal
        if error.admin or (refusal is not None and refusal.kind is not RefusalKind.TEMPORARY):
            state = refusal.code if refusal is not None else error.detail
            if state == self.current:
                log.debug(
                    "smtp upstream problem for account {account} persists: {detail}",
                    account=self.account,
                    detail=error.detail,
                )
                return
            self.current = state
            log.error(
                "smtp upstream problem for account {account}: {detail}",
                account=self.account,
                detail=error.detail,
            )
            return
        log.warn(
            "smtp upstream problem for account {account}: {detail}",
            account=self.account,
            detail=error.detail,
        )

    def logged_in(self) -> None:
        """An upstream session logged in: a trouble logged before is over."""
        if self.current is not None:
            log.info(
                "smtp upstream login for account {account} works again (was: {trouble})",
                account=self.account,
                trouble=self.current,
            )
            self.current = None
