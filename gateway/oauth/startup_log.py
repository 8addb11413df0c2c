"""What the token manager says about each OAuth2 account when the gateway starts.

One line per account, so an admin reading the start of the log sees which
mailboxes will log in and which wait for `gateway oauth authorize`, with
the last refusal's code and advice for those the provider refused.
"""

from __future__ import annotations

from twisted.logger import Logger

from gateway.model import APP_ONLY_GRANTS, Account
from gateway.oauth.store import TokenRecord


def log_loaded(
    log: Logger, account: Account, record: TokenRecord | None, setup_error: str | None, now: float
) -> None:
    name = account.name
    if setup_error is not None:
        log.error("oauth account {account}: {reason}", account=name, reason=setup_error)
    elif record is None and account.grant in APP_ONLY_GRANTS:
        log.info(
            "oauth account {account}: app-only ({grant}); the token is fetched at first use",
            account=name,
            grant=account.grant,
        )
    elif record is None:
        log.warn(
            "oauth account {account} is not authorised yet: run "
            "`gateway oauth authorize {account}`",
            account=name,
        )
    elif record.state in ("needs_reauth", "revoked", "failed") and record.last_error:
        log.error(
            "oauth account {account}: {state} ({error}); {advice}",
            account=name,
            state=record.state,
            error=(f"{record.error_code}: " if record.error_code else "") + record.last_error,
            advice=record.error_advice or f"run `gateway oauth authorize {name}`",
        )
    else:
        expires = record.tokens.expires_at - now if record.tokens else 0.0
        log.info(
            "oauth account {account}: {grant} tokens loaded, access token {validity}",
            account=name,
            grant=record.grant,
            validity=f"valid for {expires:.0f} s" if expires > 0 else "expired",
        )
