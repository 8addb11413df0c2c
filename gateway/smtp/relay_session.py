"""What the relay's lanes talk to: an SMTP session, or another way out.

A lane holds a session, hands it one message at a time and reads back a
reply per recipient, whatever carries the message: the upstream's SMTP
service (`SMTPClient`, `send_message`) or Microsoft Graph
(`gateway.smtp.graph_delivery.GraphSession`, which answers with SMTP-style
replies so that the relay's attempt/settle/bounce logic stays one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, BinaryIO, Protocol

from twisted.internet.defer import Deferred

from gateway.upstream.smtp import Reply, SMTPClient, SMTPUpstreamError, send_message


class RelaySession(Protocol):
    """A session other than SMTP, as a lane uses it."""

    @property
    def peer(self) -> str: ...

    @property
    def ended(self) -> bool: ...

    def abort(self, reason: str) -> None: ...

    def quit(self) -> Deferred[Any]: ...

    async def relay(
        self,
        *,
        sender: str,
        recipients: list[str],
        source: BinaryIO,
        size: int,
        eight_bit: bool,
    ) -> Mapping[str, Reply]: ...


Session = SMTPClient | RelaySession


class SessionDeferred(SMTPUpstreamError):
    """The attempt failed and must not be retried before `retry_after` seconds
    (the upstream said so, e.g. Graph's 429 with `Retry-After`)."""

    def __init__(self, detail: str, *, retry_after: float | None, admin: bool = False) -> None:
        super().__init__(detail, admin=admin)
        self.retry_after = retry_after


async def transmit(
    session: Session,
    *,
    sender: str,
    recipients: list[str],
    source: BinaryIO,
    size: int,
    eight_bit: bool,
) -> Mapping[str, Reply]:
    """One message over `session`: a reply per recipient. Raises
    SMTPUpstreamError when nothing can be said about the message."""
    if isinstance(session, SMTPClient):
        sent = await send_message(
            session,
            sender=sender,
            recipients=recipients,
            source=source,
            size=size,
            eight_bit=eight_bit,
        )
        return sent.replies
    return await session.relay(
        sender=sender, recipients=recipients, source=source, size=size, eight_bit=eight_bit
    )
