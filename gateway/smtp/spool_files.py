"""The durable SMTP spool: nothing is acknowledged before it is on disk.

Layout under ``state_dir/spool``::

    tmp/       messages being received; whatever is here at start is junk
    queue/     ID.msg: the message, then its envelope (JSON), then a trailer
               ID.state: delivery progress (attempts, next try, recipients done)
    dead/      the same two files for dead letters, with the reason
    control/   requests from `gateway queue` (retry.ID, delete.ID)
    claims/    ID: flock()ed by the process delivering or changing message ID
               (`gateway.smtp.spool_claims`)
    lock       flock()ed by the running gateway: exclusively by a lone
               process, shared by the worker processes of one gateway

One file holds a message and its envelope, written while DATA streams in, so
accepting a message costs two fsyncs: the file, then the directory after the
rename from tmp/ to queue/. The rename is the commit point; `250` is sent only
after both fsyncs. A crash before it leaves a file in tmp/ (the client got no
`250` and will resend); after it the message is in queue/ and is delivered
after the restart. The envelope is a trailer (JSON, then a fixed-size line with
its length) rather than a header because its size and flags are known only at
the end of DATA, and a header would mean copying the message.

Delivery progress lives in a separate small ID.state file, replaced atomically
(`gateway.state.atomic_write`), so the message file is never rewritten. A
delivered message is removed by unlinking ID.msg (then ID.state) and fsyncing
the directory; an ID.state without its ID.msg is junk from a crash in between.

The exactly-once window: the upstream has the message once it answered `250`
to the end of DATA; until the unlink of ID.msg is on disk (one unlink and one
fsync, well under a millisecond here), a crash means the message is sent again
after the restart. The same holds for a connection lost after the final "."
but before the upstream's `250` arrived (RFC 1047). Both are duplicates, never
losses, and both need a crash or a network failure at that exact moment.

`SpoolDir` is the synchronous file layer, shared by the gateway (through a
thread, so fsync never blocks the reactor) and the `gateway queue` command.
`Spool` is the embedded implementation of `gateway.smtp.spool_store.SpoolStore`
(the PostgreSQL one is `gateway.smtp.spool_pg`). Worker processes sharing the
directory each keep an index and look for one another's messages every
`control_interval`; a message is delivered by whoever claims it, so once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from twisted.logger import Logger

from gateway.smtp.spool_claims import Claims
from gateway.smtp.spool_control import ControlRequests, Verb
from gateway.smtp.spool_records import (
    DeliveryState,
    Envelope,
    QueueEntry,
    SpoolError,
    Status,
    valid_id,
)
from gateway.state import atomic_write, ensure_dir, fsync_dir

log = Logger(namespace="gateway.smtp.spool")

_MAGIC = b"GWSPOOL1 "
_TRAILER = len(_MAGIC) + 10 + 1  # magic, ten digits, LF


class IncomingMessage:
    """A message being received; becomes a queue entry at commit.

    Up to `SPILL` bytes stay in memory and the file is created at commit, in
    the spool's thread, so a typical message costs the reactor no blocking
    file system call at all; a larger one goes to tmp/ as it streams in.
    """

    SPILL = 256 * 1024

    def __init__(self, spool: SpoolDir, message_id: str) -> None:
        self.id = message_id
        self.path = spool.tmp / f"{message_id}.msg"
        self._buffer = bytearray()
        self._file: BinaryIO | None = None
        self._open = True
        self.size = 0

    def write(self, data: bytes) -> None:
        if not self._open or not data:
            return
        self.size += len(data)
        if self._file is not None:
            self._file.write(data)  # page cache only; the fsync is at commit
            return
        self._buffer += data
        if len(self._buffer) > self.SPILL:
            self._file = self._create()
            self._file.write(self._buffer)
            self._buffer = bytearray()

    def _create(self) -> BinaryIO:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return os.fdopen(fd, "wb")

    def finish(self, envelope: Envelope) -> None:
        """Write what is left and the envelope trailer, and fsync (spool thread)."""
        assert self._open
        self._open = False
        f = self._file if self._file is not None else self._create()
        self._file = None
        try:
            blob = envelope.to_json()
            f.write(bytes(self._buffer) + blob + b"\n" + _MAGIC + b"%010d\n" % len(blob))
            self._buffer = bytearray()
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()

    def abort(self) -> None:
        """Drop the partial message (no 250 was sent for it)."""
        self._open = False
        self._buffer = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class SpoolDir:
    """The spool's files: every operation is synchronous and crash-safe."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.queue = self.root / "queue"
        self.dead = self.root / "dead"
        self.control = self.root / "control"
        self.requests_dir = ControlRequests(self.control)
        self.claims = Claims(self.root / "claims")
        self._lock_fd: int | None = None
        self.shared = False

    def prepare(self) -> SpoolDir:
        for path in (
            self.root,
            self.tmp,
            self.queue,
            self.dead,
            self.control,
            self.claims.directory,
        ):
            ensure_dir(path)
        return self

    # -- the running gateway's lock ----------------------------------------

    def lock(self, timeout: float = 3.0, *, shared: bool = False) -> None:
        """Take the spool for this process; refuse a second gateway on it.

        `shared`: for the worker processes of one gateway, which deliver
        through per-message claims; a lone gateway or a `gateway queue`
        command working offline still cannot take it while they run."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + timeout
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise SpoolError(
                        f"spool {self.root} is in use by another gateway process"
                    ) from None
                time.sleep(0.05)
        self._lock_fd = fd
        self.shared = shared

    @property
    def locked(self) -> bool:
        """Whether this process holds the spool (readiness)."""
        return self._lock_fd is not None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def offline(self) -> Iterator[bool]:
        """For `gateway queue`: yields True, holding the lock, when no gateway
        runs (the command may change files itself); False when one does (the
        command leaves a request in control/ for it)."""
        path = self.root / "lock"
        if not path.exists():
            yield True
            return
        fd = os.open(path, os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    # -- receiving -----------------------------------------------------------

    def incoming(self, message_id: str) -> IncomingMessage:
        return IncomingMessage(self, message_id)

    def commit(self, incoming: IncomingMessage, envelope: Envelope) -> QueueEntry:
        """fsync the message, move it into queue/, fsync the directory."""
        [result] = self.commit_many([(incoming, envelope)])
        if isinstance(result, BaseException):
            raise result
        return result

    def commit_many(
        self, items: list[tuple[IncomingMessage, Envelope]]
    ) -> list[QueueEntry | OSError]:
        """Group commit: each message fsynced and renamed, then one directory fsync.

        A message that failed (disk full) is reported alone; if the final
        directory fsync fails, none of them is committed.
        """
        results: list[QueueEntry | OSError] = []
        for incoming, envelope in items:
            try:
                incoming.finish(envelope)
                os.rename(incoming.path, self.queue / f"{envelope.id}.msg")
            except OSError as e:
                incoming.abort()
                results.append(e)
            else:
                results.append(QueueEntry(envelope, DeliveryState()))
        if any(isinstance(r, QueueEntry) for r in results):
            try:
                fsync_dir(self.queue)
            except OSError as e:
                return [e] * len(items)
        return results

    def add(self, envelope: Envelope, message: bytes) -> QueueEntry:
        """Spool a message the gateway wrote itself (a bounce)."""
        incoming = self.incoming(envelope.id)
        try:
            incoming.write(message)
        except BaseException:
            incoming.abort()
            raise
        return self.commit(incoming, replace(envelope, size=len(message)))

    # -- reading ---------------------------------------------------------------

    def message_path(self, entry: QueueEntry) -> Path:
        return (self.queue if entry.status == "queued" else self.dead) / f"{entry.id}.msg"

    def open_message(self, entry: QueueEntry) -> BinaryIO:
        """The spooled file; the message is its first `envelope.size` bytes."""
        return open(self.message_path(entry), "rb")

    def scan(self, *, clean: bool = True, junk_age: float = 0.0) -> list[QueueEntry]:
        """Every queued and dead entry, oldest first.

        With `clean` (only the gateway, at start, holding the lock) crash junk
        goes first: partial messages in tmp/, a state file whose message was
        already removed or moved, temp files of an interrupted state update.
        `gateway queue list` reads with `clean=False` while the gateway runs.
        Worker processes sharing the spool pass `junk_age`: a file younger
        than that may be another worker's message arriving right now.
        """
        if clean:
            for junk in self.tmp.iterdir():
                if _older(junk, junk_age):
                    junk.unlink(missing_ok=True)
        entries: list[QueueEntry] = []
        for directory, status in self._directories():
            names = {p.name for p in directory.iterdir()}
            for name in sorted(names):
                stem, _, suffix = name.partition(".")
                if suffix == "msg":
                    try:
                        entries.append(self._read(directory, stem, status))
                    except SpoolError as e:
                        # Left where it is for the admin; one bad file must
                        # not keep every other message from going out.
                        if clean:
                            log.error("smtp spool: skipping {problem}", problem=str(e))
                elif (
                    clean
                    and (
                        (suffix == "state" and f"{stem}.msg" not in names)
                        or (name.startswith(".") and name.endswith(".tmp"))
                    )
                    and _older(directory / name, junk_age)
                ):
                    (directory / name).unlink(missing_ok=True)
        return sorted(entries, key=lambda e: e.id)

    def _directories(self) -> tuple[tuple[Path, Status], ...]:
        return ((self.queue, "queued"), (self.dead, "dead"))

    def read(self, message_id: str) -> QueueEntry | None:
        for directory, status in self._directories():
            if (directory / f"{message_id}.msg").exists():
                return self._read(directory, message_id, status)
        return None

    def _read(self, directory: Path, message_id: str, status: Status) -> QueueEntry:
        path = directory / f"{message_id}.msg"
        try:
            envelope = read_envelope(path)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise SpoolError(f"spool file {path} is damaged: {e}") from None
        state_path = directory / f"{message_id}.state"
        try:
            state = DeliveryState.from_json(state_path.read_bytes())
        except FileNotFoundError:
            state = DeliveryState()
        except (ValueError, TypeError) as e:
            raise SpoolError(f"spool file {state_path} is damaged: {e}") from None
        return QueueEntry(envelope, state, status)

    def reread(self, entry: QueueEntry) -> bool:
        """After a claim: bring `entry` up to date with what another process
        may have written (status, delivery state). False if its file is gone."""
        for directory, status in self._directories():
            if (directory / f"{entry.id}.msg").exists():
                try:
                    entry.state = DeliveryState.from_json(
                        (directory / f"{entry.id}.state").read_bytes()
                    )
                except FileNotFoundError:
                    entry.state = DeliveryState()
                except (ValueError, TypeError) as e:
                    raise SpoolError(f"spool state of {entry.id} is damaged: {e}") from None
                entry.status = status
                return True
        return False

    def names(self) -> dict[str, Status]:
        """The ids in the spool now, and where (one directory listing each)."""
        found: dict[str, Status] = {}
        for directory, status in self._directories():
            for name in os.listdir(directory):
                stem, _, suffix = name.partition(".")
                if suffix == "msg" and valid_id(stem):
                    found[stem] = status
        return found

    # -- progress ----------------------------------------------------------------

    def save_state(self, entry: QueueEntry) -> None:
        directory = self.queue if entry.status == "queued" else self.dead
        atomic_write(directory / f"{entry.id}.state", entry.state.to_json())

    def remove(self, entry: QueueEntry) -> None:
        """Delivered or deleted: the unlink of ID.msg is the commit."""
        [result] = self.remove_many([entry])
        if result is not None:
            raise result

    def remove_many(self, entries: list[QueueEntry]) -> list[OSError | None]:
        """Unlink each message, fsync the directories once, then the state files."""
        directories = set()
        for entry in entries:
            directory = self.queue if entry.status == "queued" else self.dead
            directories.add(directory)
            with contextlib.suppress(FileNotFoundError):
                (directory / f"{entry.id}.msg").unlink()
        try:
            for directory in directories:
                fsync_dir(directory)
        except OSError as e:
            return [e] * len(entries)
        for entry in entries:
            directory = self.queue if entry.status == "queued" else self.dead
            with contextlib.suppress(FileNotFoundError):
                (directory / f"{entry.id}.state").unlink()
        return [None] * len(entries)

    def _move(self, entry: QueueEntry, source: Path, target: Path) -> None:
        """Move an entry between queue/ and dead/: its state written anew in
        `target`, the message renamed, both directories synced, then the old
        state removed: the message file says where the entry is."""
        atomic_write(target / f"{entry.id}.state", entry.state.to_json())
        os.rename(source / f"{entry.id}.msg", target / f"{entry.id}.msg")
        fsync_dir(target)
        fsync_dir(source)
        with contextlib.suppress(FileNotFoundError):
            (source / f"{entry.id}.state").unlink()

    def bury(self, entry: QueueEntry, reason: str) -> None:
        """Move a queued entry to dead/, keeping the message and why it died."""
        entry.state.dead_reason = reason
        self._move(entry, self.queue, self.dead)
        entry.status = "dead"

    def revive(self, entry: QueueEntry, now: float) -> None:
        """Queue a dead letter again (admin retry); recipients already served stay so."""
        entry.state = DeliveryState(
            retry_base=now, next_attempt=now, delivered=list(entry.state.delivered)
        )
        self._move(entry, self.dead, self.queue)
        entry.status = "queued"

    def retry_now(self, entry: QueueEntry, now: float) -> None:
        """Admin retry of a queued entry: try at once, lifetime restarts now."""
        if entry.status == "dead":
            self.revive(entry, now)
            return
        entry.state.next_attempt = now
        entry.state.retry_base = now
        self.save_state(entry)

    # -- requests from `gateway queue` while the gateway runs ---------------------

    def request(self, verb: Verb, message_id: str) -> None:
        self.requests_dir.request(verb, message_id)

    def requests(self) -> list[tuple[Verb, str]]:
        return self.requests_dir.pending()

    def request_done(self, verb: str, message_id: str) -> None:
        self.requests_dir.done(verb, message_id)


def _older(path: Path, age: float) -> bool:
    if age <= 0:
        return True
    try:
        return time.time() - path.stat().st_mtime > age
    except FileNotFoundError:
        return False


def read_envelope(path: Path) -> Envelope:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        total = f.tell()
        if total < _TRAILER:
            raise ValueError("no envelope trailer")
        f.seek(total - _TRAILER)
        trailer = f.read(_TRAILER)
        if not trailer.startswith(_MAGIC) or not trailer.endswith(b"\n"):
            raise ValueError("no envelope trailer")
        length = int(trailer[len(_MAGIC) : -1])
        start = total - _TRAILER - 1 - length
        if start < 0:
            raise ValueError("envelope length out of range")
        f.seek(start)
        envelope = Envelope.from_json(f.read(length))
    if envelope.size != start:
        raise ValueError(f"message size {start} does not match the envelope's {envelope.size}")
    return envelope
