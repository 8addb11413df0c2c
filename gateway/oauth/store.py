"""The embedded token store: one AES-256-GCM encrypted file per account, under state_dir/oauth.

Why one file per account: a torn or corrupt file then costs one account, not
all of them; the running gateway notices another process's write by one
`stat` of one file; and a write for one account never rewrites another's.
The file holds the record sealed by `gateway.oauth.cipher`.

Several processes write here: the gateway's worker processes (refreshes,
errors) and the `gateway oauth` command (authorize, revoke). Every write is a
read-modify-write under an exclusive `flock` on ``.lock``, and the new file
replaces the old atomically (temp file, fsync, rename, fsync dir). Each
authorisation gets a random `lineage`; the gateway saves a refresh only if
the lineage it refreshed is still the one on disk, so it can never overwrite
tokens an admin has just (re-)authorised, and the command never loses a
rotated refresh token because it re-reads before writing.

One refresh per account across the worker processes of a host: a process
refreshes only while it holds the account's refresh claim, an exclusive
`flock` on ``.<account file>.refresh`` taken without blocking (the kernel
drops it if the process dies). A process that finds it taken waits, then
re-reads the file: the winner's tokens (and its rotated refresh token) are
there, so it does not refresh again.

`TokenStore` keeps its blocking methods (`load`, `update`) for the command
and answers the asynchronous `TokenBackend` interface (`gateway.oauth.backend`)
at once, with fired Deferreds.

Nothing here logs, and no exception text carries a token.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from twisted.internet.defer import Deferred, fail, succeed

from gateway.oauth.cipher import MAGIC, TokenCipher
from gateway.oauth.keys import GatewayKey
from gateway.oauth.record import State, StoreUnreadable, TokenRecord, TokenStoreError
from gateway.state import StateError, atomic_write, check_private, ensure_dir

__all__ = [
    "MAGIC",
    "FileRefreshClaim",
    "Signature",
    "State",
    "StoreUnreadable",
    "TokenRecord",
    "TokenStore",
    "TokenStoreError",
]

STORE_DIR = "oauth"
SUFFIX = ".token"
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,100}")

Signature = tuple[int, int, int]
T = TypeVar("T")


def _now(work: Callable[[], T]) -> Deferred[T]:
    """`work()`'s result (or exception) as a fired Deferred."""
    try:
        return succeed(work())
    except Exception:
        return fail()


class FileRefreshClaim:
    """This process's right to refresh one account: a held `flock`."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> Deferred[None]:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        return succeed(None)


class TokenStore:
    """The encrypted per-account token files under one directory."""

    shared = False

    def __init__(self, directory: Path, key: GatewayKey) -> None:
        self.directory = directory
        self._key = key
        self._cipher = TokenCipher(key)

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

    def describe(self, account: str) -> str:
        """Where the account's tokens are, for the admin."""
        return str(self.path_for(account))

    def problem(self) -> str | None:
        """Why the store cannot be used now (health checks), None if it can."""
        try:
            with os.scandir(self.directory):
                pass
        except OSError as e:
            return f"token store {self.directory}: {e.strerror or e}"
        return None

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
        return self._cipher.unseal(account, path, data)

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
        return self._cipher.seal(account, plain)

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

    # -- TokenBackend: the same, as the gateway's asynchronous interface -------------

    def stamp(self, account: str, *, fresh: bool = False) -> Deferred[object]:
        return _now(lambda: self.signature(account))

    def fetch(self, account: str) -> Deferred[TokenRecord | None]:
        return _now(lambda: self.load(account))

    def change(
        self,
        account: str,
        change: Callable[[TokenRecord | None], TokenRecord | None],
        *,
        replace_unreadable: bool = False,
    ) -> Deferred[TokenRecord | None]:
        return _now(lambda: self.update(account, change, replace_unreadable=replace_unreadable))

    def stored_accounts(self) -> Deferred[list[str]]:
        return _now(self.accounts_on_disk)

    def claim_refresh(self, account: str) -> Deferred[FileRefreshClaim | None]:
        """The account's refresh claim, or None while another process holds it."""
        return _now(lambda: self._claim(account))

    def _claim(self, account: str) -> FileRefreshClaim | None:
        path = self.path_for(account)
        lock = path.with_name(f".{path.name}.refresh")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise TokenStoreError(
                f"cannot lock the token store {self.directory}: {e.strerror or e}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise TokenStoreError(
                f"cannot lock the token store {self.directory}: {e.strerror or e}"
            ) from None
        return FileRefreshClaim(fd)
