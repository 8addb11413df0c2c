"""Per-message delivery claims for the embedded spool, shared by processes.

Worker processes of one host share `state_dir/spool`. Before a process
delivers (or changes) a message it takes an exclusive `flock` on
`claims/ID`, and holds it until the attempt is written down. The kernel
drops the lock when the process dies, however it dies (kill -9 included), so
a message is never stuck with a dead worker: another worker claims it at its
next look. A process that removes a message (delivered, deleted) writes
"done" into the claim file before it lets go, so another process whose
index still lists the message learns that it is gone, rather than taking
the missing file for damage.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

_DONE: Final = b"done"
# Claim files of messages gone this long are removed by `sweep`.
_KEEP: Final = 600.0


@dataclass
class Claim:
    """A held claim: the open, locked claim file."""

    message_id: str
    fd: int
    # Another process removed the message (its claim file says "done").
    gone: bool = False

    def mark_removed(self) -> None:
        with contextlib.suppress(OSError):
            os.pwrite(self.fd, _DONE, 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the lock goes with the last descriptor
            self.fd = -1


class Claims:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def take(self, message_id: str) -> Claim | None:
        """The claim, or None while another process (or another claim of
        this one) holds it."""
        fd = os.open(self.directory / message_id, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return Claim(message_id, fd, gone=os.pread(fd, len(_DONE), 0) == _DONE)

    def discard(self, claim: Claim) -> None:
        """A lone process removed the message: nobody needs the mark."""
        with contextlib.suppress(OSError):
            os.unlink(self.directory / claim.message_id)

    def held_elsewhere(self, message_id: str) -> bool:
        """For `gateway queue`: whether some process is delivering it now."""
        claim = self.take(message_id)
        if claim is None:
            return True
        claim.release()
        return False

    def sweep(self, present: set[str], now: float | None = None) -> None:
        """Remove claim files of messages gone from the spool for a while."""
        now = time.time() if now is None else now
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.name in present:
                    continue
                with contextlib.suppress(OSError):
                    if now - entry.stat(follow_symlinks=False).st_mtime > _KEEP:
                        os.unlink(entry.path)
