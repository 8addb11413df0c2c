"""The token store: one AES-256-GCM encrypted file per account, under state_dir/oauth.

Why one file per account: a torn or corrupt file then costs one account, not
all of them; the running gateway notices another process's write by one
`stat` of one file; and a write for one account never rewrites another's.

File layout: ``MAGIC | key id (8 bytes) | nonce (12 bytes) | ciphertext+tag``,
with the magic, key id and account name as associated data, so a file copied
over another account's name, or written under another key, is refused with
its real reason instead of being read as the wrong account's tokens.

Two processes write here: the gateway (refreshes, errors) and the
`gateway oauth` command (authorize, revoke). Every write is a
read-modify-write under an exclusive `flock` on ``.lock``, and the new file
replaces the old atomically (temp file, fsync, rename, fsync dir). Each
authorisation gets a random `lineage`; the gateway saves a refresh only if
the lineage it refreshed is still the one on disk, so it can never overwrite
tokens an admin has just (re-)authorised, and the command never loses a
rotated refresh token because it re-reads before writing.

Nothing here logs, and no exception text carries a token.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.model import Secret
from gateway.oauth.keys import GatewayKey
from gateway.oauth.refusal import Refusal, RefusalKind
from gateway.oauth.tokens import Tokens
from gateway.state import (
    StateError,
    atomic_write,
    check_private,
    decode_record,
    encode_record,
    ensure_dir,
    json_records,
)

MAGIC = b"GWTOKENS1\n"
_KEY_ID_BYTES = 8
_NONCE_BYTES = 12
_HEADER = len(MAGIC) + _KEY_ID_BYTES + _NONCE_BYTES
_TAG_BYTES = 16
STORE_DIR = "oauth"
SUFFIX = ".token"
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,100}")

State = Literal["ok", "needs_reauth", "failed", "revoked"]


class TokenStoreError(StateError):
    """The store cannot be used at all (directory, permissions)."""


class StoreUnreadable(TokenStoreError):
    """One account's file cannot be read; `reason` is short, for `oauth status`."""

    def __init__(self, account: str, path: Path, reason: str) -> None:
        super().__init__(f"token store file {path} (account {account}): {reason}")
        self.account = account
        self.path = path
        self.reason = reason


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
            last_error=None,
            last_error_at=None,
            error_kind=None,
            error_code=None,
            error_advice=None,
            error_from_login=False,
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
            last_error=None,
            last_error_at=None,
            error_kind=None,
            error_code=None,
            error_advice=None,
            error_from_login=False,
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
            last_error=None,
            last_error_at=None,
            error_kind=None,
            error_code=None,
            error_advice=None,
            error_from_login=False,
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


Signature = tuple[int, int, int]


class TokenStore:
    """The encrypted per-account token files under one directory."""

    def __init__(self, directory: Path, key: GatewayKey) -> None:
        self.directory = directory
        self._key = key
        self._aead = AESGCM(key.key)
        self._key_id = bytes.fromhex(key.key_id)[:_KEY_ID_BYTES]

    @classmethod
    def open(cls, state_dir: Path, key: GatewayKey) -> TokenStore:
        """Create or check state_dir/oauth (0700) and every file in it (0600)."""
        ensure_dir(state_dir)
        directory = ensure_dir(state_dir / STORE_DIR)
        store = cls(directory, key)
        store.check_modes()
        return store

    @property
    def key(self) -> GatewayKey:
        return self._key

    def check_modes(self) -> None:
        """Refuse token files that group or others can read ("file modes checked at start")."""
        for path in self._files():
            try:
                check_private(path)
            except StateError as e:
                raise TokenStoreError(f"refusing the token store: {e}") from None
            except FileNotFoundError:
                continue

    # -- reading --------------------------------------------------------------

    def path_for(self, account: str) -> Path:
        if _SAFE_NAME.fullmatch(account):
            name = account
        else:
            # "=" never occurs in a safe name, so the two forms cannot collide.
            name = "=" + account.encode("utf-8").hex()
        return self.directory / f"{name}{SUFFIX}"

    def signature(self, account: str) -> Signature | None:
        """Changes whenever the file is replaced (new inode) or rewritten; None if absent."""
        try:
            info = os.stat(self.path_for(account))
        except FileNotFoundError:
            return None
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def load(self, account: str) -> TokenRecord | None:
        """The account's record, None if it has none. Raises `StoreUnreadable`."""
        path = self.path_for(account)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreUnreadable(account, path, f"cannot read: {e.strerror or e}") from None
        return self._decrypt(account, path, data)

    def accounts_on_disk(self) -> list[str]:
        """Account names that have a file (for `oauth status` of removed accounts)."""
        names = []
        for path in self._files():
            stem = path.name[: -len(SUFFIX)]
            if stem.startswith("="):
                try:
                    stem = bytes.fromhex(stem[1:]).decode("utf-8")
                except ValueError:
                    continue
            names.append(stem)
        return sorted(names)

    def _files(self) -> Iterator[Path]:
        try:
            entries = sorted(self.directory.iterdir())
        except FileNotFoundError:
            return
        for path in entries:
            if path.name.endswith(SUFFIX) and not path.name.startswith("."):
                yield path

    def _decrypt(self, account: str, path: Path, data: bytes) -> TokenRecord:
        if len(data) < _HEADER + _TAG_BYTES:
            raise StoreUnreadable(
                account, path, f"truncated ({len(data)} bytes): torn or damaged file"
            )
        if not data.startswith(MAGIC):
            raise StoreUnreadable(account, path, "not a gateway token file (bad header)")
        stored_id = data[len(MAGIC) : len(MAGIC) + _KEY_ID_BYTES]
        if stored_id != self._key_id:
            raise StoreUnreadable(
                account,
                path,
                f"encrypted with a different gateway key (key id {stored_id.hex()}; "
                f"the key from {self._key.origin} has id {self._key_id.hex()}): wrong key",
            )
        nonce = data[len(MAGIC) + _KEY_ID_BYTES : _HEADER]
        try:
            plain = self._aead.decrypt(nonce, data[_HEADER:], self._aad(account))
        except InvalidTag:
            raise StoreUnreadable(
                account, path, "corrupt: authentication failed (damaged, torn or tampered file)"
            ) from None
        try:
            record = TokenRecord.from_json(plain)
        except ValueError:
            raise StoreUnreadable(account, path, "corrupt: unreadable content") from None
        if record.account != account:
            raise StoreUnreadable(account, path, f"holds account {record.account!r}")
        return record

    def _aad(self, account: str) -> bytes:
        return MAGIC + self._key_id + account.encode("utf-8")

    # -- writing --------------------------------------------------------------

    def update(
        self,
        account: str,
        change: Callable[[TokenRecord | None], TokenRecord | None],
        *,
        replace_unreadable: bool = False,
    ) -> TokenRecord | None:
        """Re-read the account's record under the store lock, apply `change`, save.

        `change` gets the record on disk now (None if there is none) and
        returns the record to save, or the same object to leave the file
        alone. An unreadable file raises `StoreUnreadable` unless
        `replace_unreadable` (an admin's new authorisation), when `change`
        sees None. Returns what is on disk afterwards.
        """
        with self._locked():
            try:
                current = self.load(account)
            except StoreUnreadable:
                if not replace_unreadable:
                    raise
                current = None
            new = change(current)
            if new is None or new is current:
                return current
            self._write(account, new)
            return new

    def seal(self, account: str, plain: bytes) -> bytes:
        """The file content for `plain`, encrypted for `account` under this key."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plain, self._aad(account))
        return MAGIC + self._key_id + nonce + sealed

    def _write(self, account: str, record: TokenRecord) -> None:
        try:
            atomic_write(self.path_for(account), self.seal(account, record.to_json()))
        except OSError as e:
            raise TokenStoreError(
                f"cannot write the token store file for account {account}: {e.strerror or e}"
            ) from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Held only around a read-modify-write, never across network I/O."""
        try:
            fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise TokenStoreError(
                f"cannot lock the token store {self.directory}: {e.strerror or e}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
