"""The spool as the relay, the SMTP server and the console see it.

Two implementations, picked from the state backend: `gateway.smtp.spool.Spool`
(files under `state_dir/spool`, shared by the worker processes of one host)
and `gateway.smtp.spool_pg.PgSpool` (PostgreSQL, shared by every node).

Both keep `entries`, an index of the messages this process may deliver; the
relay asks `claim` before each attempt (so one process delivers a message,
whatever the others' indexes say) and `release` after it, and `refresh`
every `control_interval` brings in messages other processes accepted or left
behind when they died.

Failures to store raise `OSError` (`SpoolUnavailable` when the database is
unreachable), which the SMTP server turns into `451 4.3.0`: nothing gets a
`250` that is not stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO, Protocol

from gateway.smtp.spool_control import Verb
from gateway.smtp.spool_files import IncomingMessage, SpoolDir
from gateway.smtp.spool_records import Envelope, QueueEntry

__all__ = ["QueueEntry", "SpoolStore", "SpoolUnavailable"]


class SpoolUnavailable(OSError):
    """The spool's database cannot be reached; the text says why."""


class SpoolStore(Protocol):
    entries: dict[str, QueueEntry]
    # Files: the embedded spool itself; with PostgreSQL, large messages
    # being received (tmp/) and the readiness check.
    dir: SpoolDir

    def open(self) -> list[QueueEntry]:
        """At start, before the reactor runs; what this process may deliver."""
        ...

    def close(self) -> None: ...

    @property
    def location(self) -> str:
        """Where the spool is, for log lines and `gateway queue`."""
        ...

    @property
    def usable(self) -> str | None:
        """None when ready, else why not (readiness)."""
        ...

    def incoming(self, now: float) -> IncomingMessage: ...

    async def commit(self, incoming: IncomingMessage, envelope: Envelope) -> QueueEntry: ...

    async def add(self, envelope: Envelope, message: bytes) -> QueueEntry: ...

    def track(self, entry: QueueEntry) -> None: ...

    def forget(self, entry: QueueEntry) -> None: ...

    def queued(self, account: str) -> list[QueueEntry]: ...

    def iter_queued(self, account: str) -> Iterator[QueueEntry]: ...

    async def claim(self, entry: QueueEntry) -> QueueEntry | None:
        """Hold `entry` for one attempt, brought up to date; None when another
        process holds it or it is gone (then it has left the index)."""
        ...

    async def release(self, entry: QueueEntry) -> None: ...

    async def open_message(self, entry: QueueEntry) -> BinaryIO:
        """The message: its first `envelope.size` bytes."""
        ...

    async def save(self, entry: QueueEntry) -> None: ...

    async def remove(self, entry: QueueEntry) -> None: ...

    async def bury(self, entry: QueueEntry, reason: str) -> None: ...

    async def retry_now(self, entry: QueueEntry, now: float) -> None: ...

    async def refresh(self, now: float) -> list[QueueEntry]:
        """Messages other processes accepted or left behind, now in the index."""
        ...

    async def listing(self) -> list[QueueEntry]:
        """Every message, queued and dead, oldest first (console, CLI)."""
        ...

    async def request(self, verb: Verb, message_id: str) -> bool:
        """An admin's retry or delete; False if there is no such message."""
        ...

    def requests(self) -> list[tuple[Verb, str]]:
        """Requests left by `gateway queue` for the relay to carry out."""
        ...

    def request_done(self, verb: str, message_id: str) -> None: ...
