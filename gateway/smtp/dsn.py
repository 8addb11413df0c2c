"""Bounces: RFC 3464 delivery status notifications for messages that cannot go.

A bounce is a multipart/report (RFC 6522) with three parts: a short text for
people, the machine-readable message/delivery-status, and the headers of the
original message (text/rfc822-headers: enough to recognise it, without sending
a 20 MB scan back). It is spooled like any message and relayed through the
same account, with the null envelope sender (RFC 5321 4.5.5), so that it can
never cause another bounce; a bounce that fails becomes a dead letter only.
"""

from __future__ import annotations

import email.utils
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.smtp.spool import Envelope

# The original's header section is cut here: it identifies the message, and a
# bounce must stay small.
MAX_ORIGINAL_HEADERS = 64 * 1024


@dataclass(frozen=True)
class Failure:
    """Why one recipient failed: the RFC 3463 status and the upstream's words."""

    status: str
    diagnostic: str


def original_headers(message_head: bytes) -> bytes:
    """The header section at the start of a message (CRLF line ends)."""
    head = message_head[:MAX_ORIGINAL_HEADERS]
    end = head.find(b"\r\n\r\n")
    if end >= 0:
        return head[: end + 2]
    end = head.find(b"\n\n")
    if end >= 0:
        return head[: end + 1].replace(b"\n", b"\r\n")
    cut = head.rfind(b"\n")
    return head[: cut + 1] if cut >= 0 else b""


def build_bounce(
    envelope: Envelope,
    failures: Mapping[str, Failure],
    *,
    reporting_mta: str,
    from_address: str,
    headers: bytes,
    now: float,
) -> bytes:
    """The complete bounce message (CRLF line ends), addressed to the original sender."""
    boundary = "=_bounce_" + secrets.token_hex(12)
    date = email.utils.formatdate(now)
    arrival = email.utils.formatdate(envelope.received)
    listing = "\r\n".join(f"  <{rcpt}>: {f.diagnostic}" for rcpt, f in failures.items())
    human = (
        f"This is the mail gateway at {reporting_mta}.\r\n"
        "\r\n"
        f"Your message of {arrival} could not be delivered to the following\r\n"
        "recipients; it will not be tried again:\r\n"
        "\r\n"
        f"{listing}\r\n"
        "\r\n"
        f"The gateway's queue id of the message is {envelope.id}. Its headers follow.\r\n"
    )
    per_message = (
        f"Reporting-MTA: dns; {reporting_mta}\r\n"
        f"X-Gateway-Queue-ID: {envelope.id}\r\n"
        f"Arrival-Date: {arrival}\r\n"
    )
    per_recipient = "".join(
        "\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\n"
        "Action: failed\r\n"
        f"Status: {f.status}\r\n"
        f"Diagnostic-Code: smtp; {_one_line(f.diagnostic)}\r\n"
        f"Last-Attempt-Date: {date}\r\n"
        for rcpt, f in failures.items()
    )
    top = (
        f"From: Mail Delivery System <{from_address}>\r\n"
        f"To: <{envelope.original_sender}>\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Date: {date}\r\n"
        f"Message-ID: <{envelope.id}.bounce.{secrets.token_hex(4)}@{reporting_mta}>\r\n"
        "Auto-Submitted: auto-replied\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"\r\n'
        "\r\n"
        "This is a MIME-encapsulated delivery status notification.\r\n"
    )
    parts = [
        top.encode(),
        f"\r\n--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n".encode(),
        human.encode("ascii", "replace"),
        f"\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n".encode(),
        (per_message + per_recipient).encode("ascii", "replace"),
        f"\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n".encode(),
        headers,
        f"\r\n--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts)


def _one_line(text: str) -> str:
    return " ".join(text.split())
