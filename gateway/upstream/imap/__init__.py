"""The upstream IMAP client in layers: `parser`, `responses` and `commands` (pure),
`client` (the Twisted protocol, holding the shared `gateway.upstream.pipeline`),
`session` (TLS, capabilities, login). The names most callers need are
re-exported here."""

from gateway.upstream.imap.client import BodyReceiver, IMAPClient, Tagged
from gateway.upstream.imap.commands import Literal, astring, encode_mailbox, uid_sets
from gateway.upstream.imap.parser import (
    STREAMED,
    Continuation,
    IMAPProtocolError,
    LiteralData,
    LiteralStart,
    Response,
    ResponseParser,
    parse_values,
)
from gateway.upstream.imap.responses import (
    Capabilities,
    ServerError,
    Status,
    number,
    parse_fetch,
    parse_search,
    parse_status,
)
from gateway.upstream.imap.session import connect, login, login_refused, open_session

__all__ = [
    "STREAMED",
    "BodyReceiver",
    "Capabilities",
    "Continuation",
    "IMAPClient",
    "IMAPProtocolError",
    "Literal",
    "LiteralData",
    "LiteralStart",
    "Response",
    "ResponseParser",
    "ServerError",
    "Status",
    "Tagged",
    "astring",
    "connect",
    "encode_mailbox",
    "login",
    "login_refused",
    "number",
    "open_session",
    "parse_fetch",
    "parse_search",
    "parse_status",
    "parse_values",
    "uid_sets",
]
