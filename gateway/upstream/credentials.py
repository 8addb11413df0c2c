"""How an upstream client gets what it logs in with, whatever the protocol.

A password account carries its password in the config. An OAuth2 account
gets a bearer token from a `TokenSource` (gateway.oauth), which keeps tokens
fresh and makes concurrent logins share one refresh. POP3, IMAP and SMTP
clients all log in through `mechanism_for`, so the choice of SASL mechanism
and the "refresh once after a 401" rule live in one place.
"""

from __future__ import annotations

from typing import Protocol

from gateway.model import Account


class TokenSource(Protocol):
    async def access_token(self, account: Account, *, force_refresh: bool = False) -> str:
        """A currently valid access token for `account`.

        Raises a `gateway.maildrop.MaildropError`: `UpstreamRejected`
        (SYS/PERM) when the account needs re-authorisation by an admin,
        `UpstreamUnavailable` (SYS/TEMP) when no valid token can be had now.
        """
        ...
