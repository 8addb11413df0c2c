"""The gateway key: the one secret that encrypts the token store at rest.

It is 32 random bytes (an AES-256-GCM key), written as one line of URL-safe
base64. Where it comes from, first match wins:

1. the ``GATEWAY_KEY`` environment variable (containers, secret managers);
2. ``[oauth] key_file`` in the config;
3. ``state_dir/gateway.key``.

A missing key file is generated on first use with mode 0600; one that group or
others can read is refused. Generation is create-if-absent (`os.link` of a
finished temp file), so the gateway and a concurrent `gateway oauth` command
can never end up with two different keys.

The key has nothing to do with device passwords: changing a device's password
never touches the tokens. Its `key_id` (a short hash, useless for decrypting)
is stored with every record, so a record written under another key is
reported as "wrong key" rather than as corruption.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.model import OAuthSettings
from gateway.state import StateError, check_private, ensure_dir, fsync_dir

KEY_ENV = "GATEWAY_KEY"
KEY_FILE_NAME = "gateway.key"
KEY_BYTES = 32


class GatewayKeyError(StateError):
    """The gateway key cannot be used; the text says which key and why."""


@dataclass(frozen=True)
class GatewayKey:
    key: bytes = field(repr=False)
    origin: str

    @property
    def key_id(self) -> str:
        return key_id(self.key)


def key_id(key: bytes) -> str:
    """A short public name for a key, so "wrong key" can be told from "corrupt"."""
    return hashlib.sha256(b"gateway token-store key id\0" + key).hexdigest()[:16]


def key_path(settings: OAuthSettings, state_dir: Path) -> Path:
    return settings.key_file or state_dir / KEY_FILE_NAME


def load_key(
    settings: OAuthSettings,
    state_dir: Path,
    *,
    environ: Mapping[str, str] = os.environ,
    create: bool = True,
) -> GatewayKey:
    """The gateway key from the environment, the key file, or a new key file.

    Raises `GatewayKeyError` with the origin in its text; never shows key bytes.
    """
    value = environ.get(KEY_ENV)
    if value is not None:
        return GatewayKey(decode_key(value, f"${KEY_ENV}"), f"${KEY_ENV}")
    path = key_path(settings, state_dir)
    origin = f"key file {path}"
    if not path.exists():
        if not create:
            raise GatewayKeyError(f"{origin} does not exist")
        if settings.key_file is None:
            try:
                ensure_dir(state_dir)
            except StateError as e:
                raise GatewayKeyError(str(e)) from None
        generate_key_file(path)
    try:
        check_private(path)
        text = path.read_text(encoding="ascii")
    except StateError as e:
        raise GatewayKeyError(f"refusing the gateway key: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise GatewayKeyError(f"cannot read {origin}: {reason}") from None
    return GatewayKey(decode_key(text, origin), origin)


def decode_key(text: str, origin: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(text.strip().encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        key = b""
    if len(key) != KEY_BYTES:
        raise GatewayKeyError(
            f"{origin} is not a gateway key (expected {KEY_BYTES} bytes in URL-safe "
            "base64, as `gateway oauth new-key` prints)"
        )
    return key


def encode_key(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).decode("ascii")


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def generate_key_file(path: Path) -> bool:
    """Create `path` holding a new key, mode 0600, unless it already exists.

    Returns True if this call created it. The file appears complete or not
    at all: it is written and fsynced under a temp name, then hard-linked
    into place, which fails (and leaves the winner's key) if another process
    got there first.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise GatewayKeyError(f"cannot create the gateway key {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(encode_key(new_key()) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        fsync_dir(path.parent)
        return True
    except OSError as e:
        raise GatewayKeyError(f"cannot create the gateway key {path}: {e.strerror or e}") from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
