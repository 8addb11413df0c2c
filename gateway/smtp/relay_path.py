"""Which way an account's relayed mail leaves, and how large it may be.

An account relays through Microsoft Graph (`gateway.smtp.graph_delivery`)
when it says `relay = "graph"`, or says nothing while its provider has no
SMTP endpoint and its maildrop is Graph already (a tenant that switched
SMTP AUTH off); everything else goes to the provider's SMTP service.

Graph takes a MIME message in one `sendMail` request whose body is the
base64 of the message (api/user-sendmail). Graph requests are limited to
about 4 MB (the request limit Microsoft's engineers quote, e.g.
microsoftgraph/aspnet-snippets-sample#18; graph/outlook-large-attachments
draws its own line for a single POST at 3 MB), and base64 makes 3 octets 4,
so the gateway takes at most `GRAPH_MAX_MESSAGE` octets for a Graph-relayed
account, which leaves room for the recipient headers the relay may add
(`gateway.smtp.graph_recipients`). Larger messages are refused at MAIL
(SIZE=) or at the end of DATA with 552 5.3.4; see the README.
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.model import Account, Device, Provider

# 3,000,000 octets of message: 4,000,000 of base64, below 4 MiB with room
# for rewritten To/Cc/Bcc lines.
GRAPH_MAX_MESSAGE = 3_000_000


def relays_via_graph(account: Account, provider: Provider) -> bool:
    if account.relay is not None:
        return account.relay == "graph"
    return provider.smtp is None and account.mailbox == "graph"


def can_relay(account: Account, provider: Provider) -> bool:
    """Is there any way out for this account's mail?"""
    return provider.smtp is not None or relays_via_graph(account, provider)


def message_size_limit(account: Account, provider: Provider, listener_limit: int) -> int:
    """The largest message the gateway accepts for `account`."""
    if relays_via_graph(account, provider):
        return min(listener_limit, GRAPH_MAX_MESSAGE)
    return listener_limit


def device_size_limit(
    device: Device | None,
    accounts: Mapping[str, Account],
    providers: Mapping[str, Provider],
    listener_limit: int,
) -> int:
    """The listener's limit, or less for a Graph-relayed account (the
    listener's for no device, or one whose account is gone)."""
    account = accounts.get(device.account) if device is not None else None
    provider = providers.get(account.provider) if account is not None else None
    if account is None or provider is None:
        return listener_limit
    return message_size_limit(account, provider, listener_limit)


def too_large_text(limit: int) -> str:
    return f"message larger than the {limit} octets Microsoft Graph takes for this account"
