"""The embedded spool: files under ``state_dir/spool`` (`gateway.smtp.spool_files`)
with an index in memory, shared safely by the worker processes of one host.

A lone gateway locks the spool exclusively, as it always did; the workers of
one gateway lock it shared and each delivers a message only while it holds
that message's claim (`gateway.smtp.spool_claims`): a `flock` the kernel
frees when the worker dies, so a worker killed with -9 loses nothing and
another worker delivers what it had in hand. Each worker looks for the
messages the others accepted every `control_interval` (`refresh`), and
re-reads a message's delivery state when it claims it, so attempts counted
by another worker are not forgotten.
"""

from __future__ import annotations

from typing import BinaryIO

from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from gateway.smtp.spool_claims import Claim
from gateway.smtp.spool_commit import GroupCommit, RunInThread
from gateway.smtp.spool_control import Verb
from gateway.smtp.spool_files import IncomingMessage, SpoolDir, read_envelope
from gateway.smtp.spool_records import (
    DeliveryState,
    Envelope,
    QueueEntry,
    QueueIndex,
    SpoolError,
    Status,
    new_id,
    valid_id,
)

__all__ = [
    "DeliveryState",
    "Envelope",
    "GroupCommit",
    "IncomingMessage",
    "QueueEntry",
    "Spool",
    "SpoolDir",
    "SpoolError",
    "Status",
    "new_id",
    "read_envelope",
    "valid_id",
]

log = Logger(namespace="gateway.smtp.spool")

# With workers sharing the spool, crash junk younger than this may be a
# message another worker is receiving right now.
SHARED_JUNK_AGE = 3600.0


class Spool(QueueIndex):
    """The gateway's view of the spool: an index in memory, file work in a thread.

    `entries` holds every entry (queued and dead) by id; the queued ones are
    also indexed per account in arrival order, so a relay worker's look for
    its next message costs the size of its own queue, not the whole spool's.
    """

    def __init__(
        self,
        directory: SpoolDir,
        *,
        run_in_thread: RunInThread = deferToThread,
        shared: bool = False,
    ) -> None:
        self.dir = directory
        self._run = run_in_thread
        self.shared = shared
        QueueIndex.__init__(self)
        self._commits = GroupCommit(directory.commit_many, run_in_thread)
        self._removals = GroupCommit(directory.remove_many, run_in_thread)
        self._held: dict[str, Claim] = {}

    # -- opening -----------------------------------------------------------------

    def open(self) -> list[QueueEntry]:
        """Directories made, lock taken, crash leftovers cleaned, queue loaded."""
        self.dir.prepare()
        self.dir.lock(shared=self.shared)
        return self.load()

    def close(self) -> None:
        for claim in self._held.values():
            claim.release()
        self._held = {}
        self.dir.unlock()

    @property
    def location(self) -> str:
        return str(self.dir.root)

    @property
    def usable(self) -> str | None:
        if not self.dir.locked:
            return f"spool {self.dir.root} is not open (not locked by this process)"
        if not self.dir.queue.is_dir():
            return f"spool queue {self.dir.queue} is missing"
        return None

    def load(self) -> list[QueueEntry]:
        """At start, before any listener: what a previous run left behind."""
        found = self.dir.scan(junk_age=SHARED_JUNK_AGE if self.shared else 0.0)
        self.entries = {}
        self._queued = {}
        for entry in found:
            self.track(entry)
        return found

    # -- the index ---------------------------------------------------------------

    # -- receiving ---------------------------------------------------------------

    def incoming(self, now: float) -> IncomingMessage:
        return self.dir.incoming(new_id(now))

    async def commit(self, incoming: IncomingMessage, envelope: Envelope) -> QueueEntry:
        """On disk (file and directory fsynced) when this returns; raises OSError."""
        entry: QueueEntry = await self._commits.submit((incoming, envelope))
        self.track(entry)
        return entry

    async def add(self, envelope: Envelope, message: bytes) -> QueueEntry:
        entry: QueueEntry = await self._run(self.dir.add, envelope, message)
        self.track(entry)
        return entry

    # -- delivering ----------------------------------------------------------------

    async def claim(self, entry: QueueEntry) -> QueueEntry | None:
        claim: Claim | None = await self._run(self._claim, entry)
        if claim is None:
            return None
        if claim.gone:
            claim.release()
            self.forget(entry)
            return None
        self._held[entry.id] = claim
        self.track(entry)  # its status may have changed in another process
        return entry

    def _claim(self, entry: QueueEntry) -> Claim | None:
        claim = self.dir.claims.take(entry.id)
        if claim is None or claim.gone:
            return claim
        try:
            # A file gone without a "done" mark was removed behind the
            # gateway's back: the attempt reports it, as it always did.
            self.dir.reread(entry)
        except BaseException:
            claim.release()
            raise
        return claim

    async def release(self, entry: QueueEntry) -> None:
        claim = self._held.pop(entry.id, None)
        if claim is not None:
            claim.release()

    async def open_message(self, entry: QueueEntry) -> BinaryIO:
        return self.dir.open_message(entry)

    async def save(self, entry: QueueEntry) -> None:
        await self._run(self.dir.save_state, entry)

    async def remove(self, entry: QueueEntry) -> None:
        await self._removals.submit(entry)
        claim = self._held.get(entry.id)
        if claim is not None:
            if self.shared:
                claim.mark_removed()  # for the other workers' indexes
            else:
                self.dir.claims.discard(claim)
        self.forget(entry)

    async def bury(self, entry: QueueEntry, reason: str) -> None:
        await self._run(self.dir.bury, entry, reason)
        self.track(entry)

    async def retry_now(self, entry: QueueEntry, now: float) -> None:
        await self._run(self.dir.retry_now, entry, now)
        self.track(entry)

    async def refresh(self, now: float) -> list[QueueEntry]:
        """With workers sharing the spool: the messages the others accepted
        (or a dead one left), and those they removed dropped from the index."""
        if not self.shared:
            return []
        # Only what was indexed before the listing: a message committed
        # meanwhile may be missing from it.
        before = set(self.entries)
        present: dict[str, Status] = await self._run(self.dir.names)
        for message_id in [i for i in before if i not in present and i in self.entries]:
            if message_id not in self._held:
                self.forget(self.entries[message_id])
        new = [i for i in present if i not in self.entries]
        found: list[QueueEntry] = await self._run(self._read_new, new, set(present))
        for entry in found:
            self.track(entry)
        return found

    def _read_new(self, ids: list[str], present: set[str]) -> list[QueueEntry]:
        found = []
        for message_id in ids:
            try:
                entry = self.dir.read(message_id)
            except SpoolError:
                continue  # being written or damaged; the next look tells
            if entry is not None:
                found.append(entry)
        self.dir.claims.sweep(present)
        return found

    async def listing(self) -> list[QueueEntry]:
        if self.shared:  # other workers' messages too, as they are on disk
            found: list[QueueEntry] = await self._run(self.dir.scan, clean=False)
            return found
        return sorted(self.entries.values(), key=lambda e: e.id)

    # -- admin requests ---------------------------------------------------------------

    async def request(self, verb: Verb, message_id: str) -> bool:
        """What `gateway queue retry|delete` does while the gateway runs: a
        request file the relay (of whichever worker) carries out within seconds."""
        if message_id not in self.entries:
            return False
        self.dir.request(verb, message_id)
        return True

    def requests(self) -> list[tuple[Verb, str]]:
        return self.dir.requests()

    def request_done(self, verb: str, message_id: str) -> None:
        self.dir.request_done(verb, message_id)
