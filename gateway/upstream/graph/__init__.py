"""A small Microsoft Graph mail client over treq (`http` the request rules,
`client` the calls), for Graph-backed maildrops (`gateway.maildrop.graph`)
and the Graph relay (`gateway.smtp.graph_delivery`)."""

from gateway.upstream.graph.client import (
    BodyPump,
    GraphMailbox,
    GraphTokens,
    TokenSourceGraphTokens,
)
from gateway.upstream.graph.http import (
    SHARED_SLOTS,
    GraphFailed,
    GraphHTTP,
    GraphNotFound,
    GraphRejected,
    GraphThrottled,
    MailboxSlots,
    RequestStats,
)

__all__ = [
    "SHARED_SLOTS",
    "BodyPump",
    "GraphFailed",
    "GraphHTTP",
    "GraphMailbox",
    "GraphNotFound",
    "GraphRejected",
    "GraphThrottled",
    "GraphTokens",
    "MailboxSlots",
    "RequestStats",
    "TokenSourceGraphTokens",
]
