"""A maildrop held in memory: a public fake of the `Maildrop` seam.

For unit tests of the POP3 front end (ours, or a user's own) and benchmarks
of the protocol code alone; it keeps the seam's contract (wire form,
dot-stuffed in chunks, deletions only at `commit`) and can fail on demand.
It is not an upstream: integration tests use a real Dovecot
(tests/harness/dovecot.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence

from twisted.internet.interfaces import IConsumer

from gateway.dotstuff import DotStuffer
from gateway.maildrop import MaildropError, NoSuchMessage, UpstreamLost


class MemoryMaildrop:
    """Messages in a list; `fail_next`/`fail_after` make the next call fail."""

    def __init__(self, messages: Sequence[bytes], chunk_size: int = 16384) -> None:
        self.messages = list(messages)
        self.chunk_size = chunk_size
        self.committed: list[int] | None = None
        self.aborted = False
        self.fail_next: MaildropError | None = None
        # Fail after this many message bytes of the next retrieve (mid-message drop).
        self.fail_after: int | None = None

    @property
    def sizes(self) -> Sequence[int]:
        return [len(m) for m in self.messages]

    async def unique_ids(self) -> Sequence[str]:
        self._maybe_fail()
        return [hashlib.sha1(m).hexdigest()[:16] for m in self.messages]

    async def retrieve(self, msg: int, sink: IConsumer, lines: int | None = None) -> None:
        self._maybe_fail()
        if not 1 <= msg <= len(self.messages):
            raise NoSuchMessage(f"message {msg}")
        message = self.messages[msg - 1]
        if lines is not None:
            head, sep, body = message.partition(b"\r\n\r\n")
            kept = body.split(b"\r\n")[:lines] if body else []
            message = head + sep + b"".join(line + b"\r\n" for line in kept)
        stuffer = DotStuffer()
        for offset in range(0, len(message), self.chunk_size):
            if self.fail_after is not None and offset >= self.fail_after:
                self.fail_after = None
                raise UpstreamLost("dropped mid-message (test)")
            sink.write(stuffer.feed(message[offset : offset + self.chunk_size]))
        sink.write(stuffer.close())

    async def commit(self, deleted: Collection[int]) -> None:
        self._maybe_fail()
        self.committed = sorted(deleted)
        for n in sorted(deleted, reverse=True):
            del self.messages[n - 1]

    def abort(self) -> None:
        self.aborted = True

    def _maybe_fail(self) -> None:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
