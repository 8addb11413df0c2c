"""A small Microsoft Graph mail client over treq (`http` the request rules,
`client` the calls), for Graph-backed maildrops (`gateway.maildrop.graph`)."""

from gateway.upstream.graph.client import (
    BodyPump,
    GraphMailbox,
    GraphTokens,
    TokenSourceGraphTokens,
)
from gateway.upstream.graph.http import (
    SHARED_SLOTS,
    GraphHTTP,
    GraphNotFound,
    MailboxSlots,
    RequestStats,
)

__all__ = [
    "SHARED_SLOTS",
    "BodyPump",
    "GraphHTTP",
    "GraphMailbox",
    "GraphNotFound",
    "GraphTokens",
    "MailboxSlots",
    "RequestStats",
    "TokenSourceGraphTokens",
]
