"""The upstream POP3 client in layers: `parser` (pure), `client` (the Twisted
protocol, holding the shared `gateway.upstream.pipeline`), `session` (TLS,
CAPA, login). The names most callers need are re-exported here."""

from gateway.upstream.pop3.client import Listing, POP3Client
from gateway.upstream.pop3.parser import (
    BodyChunk,
    Capabilities,
    Continuation,
    Expect,
    POP3ProtocolError,
    ResponseParser,
    ServerError,
    Status,
    parse_status,
)
from gateway.upstream.pop3.session import (
    connect,
    login,
    login_method,
    login_refused,
    open_session,
    open_session_then,
)

__all__ = [
    "BodyChunk",
    "Capabilities",
    "Continuation",
    "Expect",
    "Listing",
    "POP3Client",
    "POP3ProtocolError",
    "ResponseParser",
    "ServerError",
    "Status",
    "connect",
    "login",
    "login_method",
    "login_refused",
    "open_session",
    "open_session_then",
    "parse_status",
]
