"""The gateway's state directory: tokens, spool, UIDL maps, all under one root.

Every writer goes through `atomic_write` so a crash or `kill -9` leaves either
the old file or the new one, never a torn one. The operator's config file is
never written.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class StateError(Exception):
    """The state directory or a file in it cannot be used; the text says why."""


def ensure_dir(path: Path, mode: int = 0o700) -> Path:
    """Create `path` if missing; refuse one that others can write to."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
        info = path.stat()
    except OSError as e:
        raise StateError(f"state directory {path}: {e.strerror or e}") from None
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateError(f"state directory {path} is writable by others; chmod go-w it")
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` via a temp file, fsync and rename, then fsync the dir."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def check_private(path: Path) -> None:
    """Refuse a secret file that group or others may read."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StateError(f"{path} has mode {stat.filemode(mode)}; it must be 0600")
