"""The sealing of a token record under the gateway key, for every store.

Layout: ``MAGIC | key id (8 bytes) | nonce (12 bytes) | ciphertext+tag``
(AES-256-GCM), with the magic, key id and account name as associated data,
so a blob copied over another account's name, or written under another key,
is refused with its real reason instead of being read as the wrong account's
tokens. The files of the embedded store and the `blob` column of PostgreSQL
hold exactly these bytes: the database never sees a token in the clear.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.oauth.keys import GatewayKey
from gateway.oauth.record import StoreUnreadable, TokenRecord

MAGIC = b"GWTOKENS1\n"
_KEY_ID_BYTES = 8
_NONCE_BYTES = 12
_HEADER = len(MAGIC) + _KEY_ID_BYTES + _NONCE_BYTES
_TAG_BYTES = 16


class TokenCipher:
    """Seals and opens records of one gateway key."""

    def __init__(self, key: GatewayKey) -> None:
        self.key = key
        self._aead = AESGCM(key.key)
        self._key_id = bytes.fromhex(key.key_id)[:_KEY_ID_BYTES]

    def seal(self, account: str, plain: bytes) -> bytes:
        """The blob for `plain`, encrypted for `account` under this key."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plain, self._aad(account))
        return MAGIC + self._key_id + nonce + sealed

    def unseal(self, account: str, where: Path | str, data: bytes) -> TokenRecord:
        """The record in `data`; `StoreUnreadable` (naming `where`) if it is not one."""
        if len(data) < _HEADER + _TAG_BYTES:
            raise StoreUnreadable(
                account, where, f"truncated ({len(data)} bytes): torn or damaged file"
            )
        if not data.startswith(MAGIC):
            raise StoreUnreadable(account, where, "not a gateway token file (bad header)")
        stored_id = data[len(MAGIC) : len(MAGIC) + _KEY_ID_BYTES]
        if stored_id != self._key_id:
            raise StoreUnreadable(
                account,
                where,
                f"encrypted with a different gateway key (key id {stored_id.hex()}; "
                f"the key from {self.key.origin} has id {self._key_id.hex()}): wrong key",
            )
        nonce = data[len(MAGIC) + _KEY_ID_BYTES : _HEADER]
        try:
            plain = self._aead.decrypt(nonce, data[_HEADER:], self._aad(account))
        except InvalidTag:
            raise StoreUnreadable(
                account, where, "corrupt: authentication failed (damaged, torn or tampered file)"
            ) from None
        try:
            record = TokenRecord.from_json(plain)
        except ValueError:
            raise StoreUnreadable(account, where, "corrupt: unreadable content") from None
        if record.account != account:
            raise StoreUnreadable(account, where, f"holds account {record.account!r}")
        return record

    def _aad(self, account: str) -> bytes:
        return MAGIC + self._key_id + account.encode("utf-8")
