"""What the gateway knows about one account's authorisation: `TokenRecord`.

The record is what every token store keeps (the files of the embedded
backend, the rows of PostgreSQL), always sealed with the gateway key before
it is written: the serialisation below only ever exists inside the
encryption, which is why tokens are stored revealed in it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal

from gateway.model import Secret
from gateway.oauth.refusal import Refusal, RefusalKind
from gateway.oauth.tokens import Tokens
from gateway.state import StateError, decode_record, encode_record, json_records

State = Literal["ok", "needs_reauth", "failed", "revoked"]


class TokenStoreError(StateError):
    """The store cannot be used at all (directory, permissions)."""


class StoreUnreadable(TokenStoreError):
    """One account's file (or row) cannot be read; `reason` is short, for `oauth status`."""

    def __init__(self, account: str, path: Path | str, reason: str) -> None:
        where = f"token store file {path}" if isinstance(path, Path) else path
        super().__init__(f"{where} (account {account}): {reason}")
        self.account = account
        self.path = path
        self.reason = reason


# The fields of a record's last error, as they are when there is none: a
# refresh or login that succeeds clears all of them.
_NO_ERROR: dict[str, Any] = {
    "last_error": None,
    "last_error_at": None,
    "error_kind": None,
    "error_code": None,
    "error_advice": None,
    "error_from_login": False,
}


@dataclass(frozen=True)
class TokenRecord:
    """Everything the gateway knows about one account's authorisation.

    `state`: "ok"; "needs_reauth" (the provider refused the grant, an admin
    must run `gateway oauth authorize`); "failed" (refused for a reason a
    config fix may cure, e.g. invalid_client); "revoked" (by the admin).
    """

    account: str
    grant: str
    lineage: str
    state: State = "ok"
    tokens: Tokens | None = None
    authorized_at: float | None = None
    last_refresh: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    # The last refusal, classified (gateway.oauth.refusal): its kind
    # ("reauthorize", "misconfigured", "temporary"), the provider's code
    # (AADSTS700082, invalid_grant...) and one sentence on what to do.
    error_kind: str | None = None
    error_code: str | None = None
    error_advice: str | None = None
    # The last error came from a mail server refusing a login (not from the
    # token endpoint): a later successful login clears it.
    error_from_login: bool = False
    # The account's Microsoft Graph access token (a second resource minted
    # from the same refresh token, or by client credentials with Graph's
    # .default scope) and when it was fetched. Records written before Graph
    # existed have neither, and still load.
    graph_tokens: Tokens | None = None
    graph_refresh: float | None = None

    @classmethod
    def authorized(cls, account: str, grant: str, tokens: Tokens, now: float) -> TokenRecord:
        """A fresh record from an admin's authorisation: a new lineage."""
        return cls(
            account=account,
            grant=grant,
            lineage=secrets.token_hex(8),
            tokens=tokens,
            authorized_at=now,
            last_refresh=now,
        )

    @classmethod
    def app_only(cls, account: str, grant: str) -> TokenRecord:
        """The record of an app-only account (client credentials, service
        account) before the gateway's first fetch: nobody authorises those."""
        return cls(account=account, grant=grant, lineage=secrets.token_hex(8))

    def refreshed(self, tokens: Tokens, now: float) -> TokenRecord:
        return replace(
            self,
            state="ok",
            tokens=tokens,
            last_refresh=now,
            **_NO_ERROR,
        )

    def graph_refreshed(self, tokens: Tokens, now: float) -> TokenRecord:
        """A new Graph token; a rotated refresh token replaces the stored one
        (the same refresh token serves both resources)."""
        main = self.tokens
        if main is not None and tokens.refresh_token is not None:
            main = replace(main, refresh_token=tokens.refresh_token)
        return replace(
            self,
            state="ok",
            tokens=main,
            graph_tokens=Tokens(tokens.access_token, tokens.expires_at, None, tokens.scope),
            graph_refresh=now,
            **_NO_ERROR,
        )

    def login_failed(self, error: str, now: float, refusal: Refusal) -> TokenRecord:
        """A mail server refused the login: "failed" unless it was temporary."""
        state: State = "ok" if refusal.kind is RefusalKind.TEMPORARY else "failed"
        if self.state != "ok":
            state = self.state
        return replace(self.failed(state, error, now, refusal), error_from_login=True)

    def login_cleared(self) -> TokenRecord:
        """A login succeeded after a recorded login refusal."""
        if not self.error_from_login:
            return self
        return replace(
            self,
            state="ok",
            **_NO_ERROR,
        )

    def failed(
        self, state: State, error: str, now: float, refusal: Refusal | None = None
    ) -> TokenRecord:
        return replace(
            self,
            state=state,
            last_error=error,
            last_error_at=now,
            error_kind=refusal.kind.value if refusal is not None else None,
            error_code=refusal.code if refusal is not None else None,
            error_advice=refusal.advice if refusal is not None else None,
            error_from_login=False,
        )

    def revoked(self, now: float) -> TokenRecord:
        return replace(
            self,
            state="revoked",
            tokens=None,
            graph_tokens=None,
            lineage=secrets.token_hex(8),
            last_error="revoked by the administrator",
            last_error_at=now,
            error_kind=None,
            error_code=None,
            error_advice=None,
        )

    # -- serialisation (inside the encryption only) --------------------------

    def to_json(self) -> bytes:
        return encode_record(_JSON, self)

    @classmethod
    def from_json(cls, data: bytes) -> TokenRecord:
        """Raises `ValueError` naming the field of a damaged record (never its value)."""
        return decode_record(_JSON, data, cls)


def _secret(value: object, _: object) -> Secret:
    if not isinstance(value, str) or not value:
        raise TypeError("expected a non-empty string")
    return Secret(value)


# Tokens are stored revealed: the whole record is encrypted before it is written.
_JSON: Final = json_records()
_JSON.register_structure_hook(Secret, _secret)
_JSON.register_unstructure_hook(Secret, Secret.reveal)
