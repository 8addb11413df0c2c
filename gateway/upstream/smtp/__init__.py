"""The upstream SMTP submission client in layers: `parser` (pure), `client` (the
Twisted protocol, holding the shared `gateway.upstream.pipeline`), `session`
(TLS, EHLO, AUTH, one transaction). The names most callers need are
re-exported here."""

from gateway.upstream.smtp.client import SMTPClient, SMTPUpstreamError
from gateway.upstream.smtp.parser import Reply, ReplyParser, SMTPProtocolError
from gateway.upstream.smtp.session import (
    Transmission,
    choose_mechanism_name,
    connect,
    login,
    open_session,
    send_message,
)

__all__ = [
    "Reply",
    "ReplyParser",
    "SMTPClient",
    "SMTPProtocolError",
    "SMTPUpstreamError",
    "Transmission",
    "choose_mechanism_name",
    "connect",
    "login",
    "open_session",
    "send_message",
]
