"""Requests from `gateway queue retry|delete` to a running gateway.

The command cannot change the spool under a running gateway (the gateway
holds its index in memory), so it leaves an empty file `VERB.ID` in
spool/control/ and the relay carries it out at its next look (every couple of
seconds). Anything else found there is junk and is removed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Literal

from gateway.smtp.spool_records import valid_id
from gateway.state import atomic_write

Verb = Literal["retry", "delete"]
VERBS: tuple[Verb, ...] = ("retry", "delete")


class ControlRequests:
    """The control directory: one empty file per pending request."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def request(self, verb: Verb, message_id: str) -> None:
        if not valid_id(message_id):
            raise ValueError(f"not a queue id: {message_id!r}")
        atomic_write(self.directory / f"{verb}.{message_id}", b"")

    def pending(self) -> list[tuple[Verb, str]]:
        """The requests waiting, oldest first."""
        found: list[tuple[Verb, str]] = []
        for path in sorted(self.directory.iterdir(), key=lambda p: p.stat().st_mtime):
            request = parse_request(path.name)
            if request is not None:
                found.append(request)
            else:
                path.unlink()
        return found

    def done(self, verb: str, message_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"{verb}.{message_id}").unlink()


def parse_request(name: str) -> tuple[Verb, str] | None:
    verb, _, message_id = name.partition(".")
    for known in VERBS:
        if verb == known and valid_id(message_id):
            return known, message_id
    return None
