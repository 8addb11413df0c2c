"""What happens to message bytes between `354` and the spool.

Each chunk the parser un-stuffed goes through the From: rewrite (when the
account asks for it), is measured (size, 8-bit), has its lines over 998
octets folded (`gateway.smtp.folding`, `long_lines = "fold"`, the default)
or measured for a refusal (`"refuse"`), and is written to the spool file.
Once the message is known to be refused (too big, a line over the limit
when refusing), nothing more is written, but the rest is still read to the
terminating "." so that no byte of the body is ever taken for a command; the
refusal is the reply to that ".".

Folding is done here, while the message streams to the spool, and not by
the relay: the stored message is the one that goes upstream (its size, the
`SIZE=` the relay declares, and what `gateway queue` shows are right), the
relay stays a byte pump, and a line of any length costs no memory (only the
line's length so far is kept between chunks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.logger import Logger

from gateway.model import Account, Device, LongLines
from gateway.sessions import log_value
from gateway.smtp.folding import LineFolder
from gateway.smtp.headers import FromRewriter
from gateway.smtp.parser import LineMeter
from gateway.smtp.policy import account_address
from gateway.smtp.spool import Envelope, IncomingMessage

log = Logger(namespace="gateway.smtp")


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
        txn: Transaction,
        *,
        max_size: int,
        max_line: int,
        long_lines: LongLines = "fold",
    ) -> None:
        self.incoming = incoming
        self._max_size = max_size
        self._max_line = max_line
        self._device = txn.device.name
        account = txn.account
        self._rewriter = (
            FromRewriter(account_address(account)) if account.rewrite_from_header else None
        )
        self._folder = LineFolder(max_line) if long_lines == "fold" else None
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
        if self._folder is None and self._meter.feed(chunk) > self._max_line + 1:
            return self._refuse(
                Refusal(
                    554,
                    "5.6.0",
                    f"message has a line longer than {self._max_line} octets (RFC 5321 4.5.3.1.6)",
                )
            )
        if not self.eight_bit and not chunk.isascii():
            self.eight_bit = True
        data = self._rewriter.feed(chunk) if self._rewriter else chunk
        self.incoming.write(self._folder.feed(data) if self._folder else data)

    def finish(self) -> None:
        """The terminating "." arrived: flush what the rewriter and folder still hold."""
        if self.refusal is not None:
            return
        rest = self._rewriter.close() if self._rewriter is not None else b""
        folder = self._folder
        if folder is not None:
            rest = folder.feed(rest) + folder.close()
            if folder.folds:
                # Postfix logs the same once per message ("breaking line > 998 bytes").
                log.info(
                    "smtp message {id} from device {device}: lines over {limit} octets "
                    "folded with CRLF SPACE ({folds} folds)",
                    id=self.incoming.id,
                    device=log_value(self._device),
                    limit=self._max_line,
                    folds=folder.folds,
                )
        if rest:
            self.incoming.write(rest)

    @property
    def from_rewritten(self) -> bool:
        return self._rewriter is not None and self._rewriter.rewritten

    def _refuse(self, refusal: Refusal) -> None:
        self.refusal = refusal
        self.incoming.abort()
