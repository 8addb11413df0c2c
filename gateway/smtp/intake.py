"""What happens to message bytes between `354` and the spool.

Each chunk the parser un-stuffed goes through the From: rewrite (when the
account asks for it), is measured (size, longest line, 8-bit), and is written
to the spool file. Once the message is known to be refused (too big, a line
over the limit), nothing more is written, but the rest is still read to the
terminating "." so that no byte of the body is ever taken for a command; the
refusal is the reply to that ".".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.model import Account, Device
from gateway.smtp.headers import FromRewriter
from gateway.smtp.parser import LineMeter
from gateway.smtp.spool import Envelope, IncomingMessage


@dataclass
class Transaction:
    """One mail transaction, from an accepted MAIL to the end of its data."""

    device: Device
    account: Account
    identified_by: str
    original_sender: str
    sender: str
    body: str | None
    recipients: list[str] = field(default_factory=list)

    def envelope(self, intake: MessageIntake, peer: str, received: float) -> Envelope:
        """What the spool keeps next to the message the intake took in."""
        return Envelope(
            id=intake.incoming.id,
            account=self.account.name,
            device=self.device.name,
            peer=peer,
            identified_by=self.identified_by,
            original_sender=self.original_sender,
            sender=self.sender,
            recipients=tuple(self.recipients),
            received=received,
            size=intake.incoming.size,
            eight_bit=intake.eight_bit,
            body=self.body.upper() if self.body else None,
            from_rewritten=intake.from_rewritten,
        )


@dataclass(frozen=True)
class Refusal:
    code: int
    enhanced: str
    text: str


class MessageIntake:
    def __init__(
        self,
        incoming: IncomingMessage,
        *,
        max_size: int,
        max_line: int,
        rewrite_from_to: str | None = None,
    ) -> None:
        self.incoming = incoming
        self._max_size = max_size
        self._max_line = max_line
        self._rewriter = FromRewriter(rewrite_from_to) if rewrite_from_to else None
        self._meter = LineMeter()
        self.received = 0
        self.eight_bit = False
        self.refusal: Refusal | None = None

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.refusal is not None:
            return
        if self.received > self._max_size:
            return self._refuse(
                Refusal(552, "5.3.4", f"message larger than the limit of {self._max_size} octets")
            )
        if self._meter.feed(chunk) > self._max_line + 1:
            return self._refuse(
                Refusal(
                    554,
                    "5.6.0",
                    f"message has a line longer than {self._max_line} octets (RFC 5321 4.5.3.1.6)",
                )
            )
        if not self.eight_bit and not chunk.isascii():
            self.eight_bit = True
        self.incoming.write(self._rewriter.feed(chunk) if self._rewriter else chunk)

    def finish(self) -> None:
        """The terminating "." arrived: flush what the rewriter still holds."""
        if self.refusal is None and self._rewriter is not None:
            self.incoming.write(self._rewriter.close())

    @property
    def from_rewritten(self) -> bool:
        return self._rewriter is not None and self._rewriter.rewritten

    def _refuse(self, refusal: Refusal) -> None:
        self.refusal = refusal
        self.incoming.abort()
