"""Requests from `gateway queue retry|delete` to a running gateway.

The command cannot change the spool under a running gateway (the gateway
holds its index in memory), so it leaves an empty file `VERB.ID` in
spool/control/ and the relay carries it out at its next look (every couple of
seconds).

Whatever else turns up there must never stop the requests beside it: a
directory, a link or a device node is left alone and reported once; a
regular file that is not a request is deleted with a log line; a request
file that cannot be removed after it was carried out is reported once and
not carried out again. Temp files of a `gateway queue` command still writing
are left to it.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Final, Literal

from twisted.logger import Logger

from gateway.smtp.spool_records import valid_id
from gateway.state import atomic_write

log = Logger(namespace="gateway.smtp.spool")

Verb = Literal["retry", "delete"]
VERBS: Final[tuple[Verb, ...]] = ("retry", "delete")
# `atomic_write`'s temp file of a command writing a request right now.
_WRITING_GRACE: Final = 60.0


class ControlRequests:
    """The control directory: one empty file per pending request."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # Entries already reported as skipped, so a stray entry costs one log
        # line, not one every poll; forgotten when the entry goes away.
        self._reported: set[str] = set()
        # Requests carried out whose file could not be removed.
        self._stuck: set[str] = set()

    def request(self, verb: Verb, message_id: str) -> None:
        if not valid_id(message_id):
            raise ValueError(f"not a queue id: {message_id!r}")
        atomic_write(self.directory / f"{verb}.{message_id}", b"")

    def pending(self) -> list[tuple[Verb, str]]:
        """The requests waiting, oldest first. Raises `OSError` only when the
        directory itself cannot be read."""
        found: list[tuple[float, str, tuple[Verb, str]]] = []
        present: set[str] = set()
        with os.scandir(self.directory) as entries:
            for entry in entries:
                present.add(entry.name)
                mtime = self._request_time(entry)
                request = parse_request(entry.name)
                if mtime is not None and request is not None:
                    found.append((mtime, entry.name, request))
        self._reported &= present
        self._stuck &= present
        return [request for _, _, request in sorted(found)]

    def _request_time(self, entry: os.DirEntry[str]) -> float | None:
        """The entry's mtime if it is a request to carry out; otherwise deal
        with it (skip, report, delete) and return None."""
        name = entry.name
        if name in self._stuck:
            return None
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            return None  # carried out or withdrawn meanwhile
        except OSError as e:
            self._skip(name, f"cannot be examined ({e.strerror or e})")
            return None
        if not stat.S_ISREG(info.st_mode):
            self._skip(name, f"is {_kind(info.st_mode)}, not a request file; left alone")
            return None
        if parse_request(name) is not None:
            return info.st_mtime
        if name.startswith(".") and time.time() - info.st_mtime < _WRITING_GRACE:
            return None
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._skip(name, f"is not a request and cannot be removed ({e.strerror or e})")
            return None
        log.warn(
            "smtp queue control: removed {name!r} from {directory}: not a request",
            name=name,
            directory=str(self.directory),
        )
        return None

    def _skip(self, name: str, why: str) -> None:
        if name in self._reported:
            return
        self._reported.add(name)
        log.error(
            "smtp queue control: skipping {name!r} in {directory}: {why}",
            name=name,
            directory=str(self.directory),
            why=why,
        )

    def done(self, verb: str, message_id: str) -> None:
        name = f"{verb}.{message_id}"
        try:
            (self.directory / name).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            self._stuck.add(name)
            self._reported.discard(name)
            self._skip(
                name,
                f"carried out, but the file cannot be removed ({e.strerror or e}); "
                "not carried out again",
            )


def parse_request(name: str) -> tuple[Verb, str] | None:
    verb, _, message_id = name.partition(".")
    for known in VERBS:
        if verb == known and valid_id(message_id):
            return known, message_id
    return None


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"
