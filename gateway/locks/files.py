"""Mailbox locks for the embedded backend: the worker processes of one host.

One file per mailbox under `state_dir/locks`, named by a hash of the mailbox
key (keys hold user names and folder names, which are no file names). A
session holds an exclusive `flock` on its own open file description of that
file for as long as it lasts. `flock` belongs to the open file description,
not to the process, so two sessions of one process exclude each other just
as two workers do; the dict here only answers those without a system call.

Why `flock` rather than a pid written into a file: the kernel releases the
lock when the descriptor is closed, and it closes every descriptor of a
process that dies, kill -9 included, so a dead worker's mailboxes are free
at once and nobody has to judge whether a pid is still alive. `LOCK_NB`
keeps the reactor from ever waiting: a held lock is an answer ([IN-USE]),
not something to wait for.

Lock files are never deleted: unlinking one while another process has it
open would let two processes lock two different files for one mailbox.
There is one small file per mailbox ever used. The holder writes its label
(and pid) into the file so that a refused session's log line can name it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from pathlib import Path

from twisted.internet.defer import Deferred, fail, succeed

from gateway.locks.interface import InUse, LockUnavailable, MailboxLease
from gateway.state.files import StateError, ensure_dir

# Enough for any label a holder writes.
_LABEL_BYTES = 512


def lock_file_name(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40] + ".lock"


class FileMailboxLocks:
    """`MailboxLocks` for the worker processes of one host (`flock`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._held: dict[str, MailboxLease] = {}
        self._ready = False

    def acquire(self, key: str, label: str) -> Deferred[MailboxLease | InUse]:
        held = self._held.get(key)
        if held is not None:
            return succeed(InUse(held.label))
        try:
            return succeed(self._lock(key, label))
        except LockUnavailable as e:
            return fail(e)

    def _lock(self, key: str, label: str) -> MailboxLease | InUse:
        if not self._ready:
            # Created at the first login, after twistd dropped privileges, so
            # the directory belongs to the user the gateway runs as.
            try:
                ensure_dir(self.directory)
            except StateError as e:
                raise LockUnavailable(str(e)) from None
            self._ready = True
        path = self.directory / lock_file_name(key)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            self._ready = False  # check the directory again next time
            raise LockUnavailable(f"lock file {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
            os.close(fd)
            if holder is None:
                raise LockUnavailable(f"lock file {path}: {e.strerror or e}") from None
            return holder
        try:
            # Always the whole record, padded: overwriting blocks the file
            # already has costs the filesystem far less than truncating it
            # and writing anew (which frees and allocates a block each login).
            text = f"{label}\n{os.getpid()}\n".encode("utf-8", "replace")[:_LABEL_BYTES]
            os.pwrite(fd, text.ljust(_LABEL_BYTES, b"\0"), 0)
        except OSError:
            pass  # the label is for log lines only; the lock is what counts
        lease = self._held[key] = MailboxLease(key, label, handle=fd)
        return lease

    def release(self, lease: MailboxLease) -> Deferred[None]:
        if self._held.get(lease.key) is lease:
            del self._held[lease.key]
            assert isinstance(lease.handle, int)
            # Closing the descriptor releases the flock; the file stays.
            os.close(lease.handle)
            lease.handle = None
        return succeed(None)


def _read_holder(fd: int) -> InUse:
    """Who holds the lock, from what it wrote: its label, then its pid."""
    try:
        data = os.pread(fd, _LABEL_BYTES, 0)
    except OSError:
        data = b""
    label, _, pid = data.rstrip(b"\0").decode("utf-8", "replace").partition("\n")
    # Empty in the instant between the holder's flock and its write.
    return InUse(label or "another process", pid.strip() or None)
