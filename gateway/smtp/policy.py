"""Who may relay, and as which sender: the two decisions that keep the relay closed.

A session may relay only as a device: one that authenticated with its own
password, or one configured with `relay_without_auth` whose `allow_from`
networks contain the client's address. Nothing else is ever relayed, and a
`relay_without_auth` device whose networks include the whole Internet
(0.0.0.0/0, ::/0: the default when allow_from is not set) is ignored, so a
forgotten allow_from cannot turn the gateway into an open relay.

The sender policy is per account, because the provider judges the account:
Microsoft 365 and Gmail refuse envelope senders other than the mailbox.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.model import Account, Device, IPNetwork
from gateway.net import parse_peer_address


@dataclass(frozen=True)
class NetworkDevices:
    """The devices that relay without AUTH, looked up by client address."""

    entries: tuple[tuple[IPNetwork, Device], ...]
    ignored: tuple[str, ...]

    @classmethod
    def from_devices(cls, devices: Iterable[Device]) -> NetworkDevices:
        entries: list[tuple[IPNetwork, Device]] = []
        ignored: list[str] = []
        for device in devices:
            if not device.relay_without_auth or "smtp" not in device.protocols:
                continue
            networks = [net for net in device.allow_from if net.prefixlen > 0]
            if len(networks) < len(device.allow_from):
                # An "any address" entry would relay for the whole Internet.
                ignored.append(device.name)
                continue
            entries += [(net, device) for net in networks]
        # Most specific network first; equal prefixes by device name, so the
        # choice never depends on the order of the config file.
        entries.sort(key=lambda e: (-e[0].prefixlen, e[1].name))
        return cls(tuple(entries), tuple(sorted(ignored)))

    def find(self, peer: str) -> Device | None:
        """The device a client at `peer` is, by its address alone, if any."""
        ip = parse_peer_address(peer)
        if ip is None:
            return None
        for network, device in self.entries:
            if ip.version == network.version and ip in network:
                return device
        return None


def account_address(account: Account) -> str:
    """The mailbox address the provider knows the account by: its login."""
    return account.username


def sender_allowed(account: Account, sender: str) -> bool:
    """Whether a device of `account` may use `sender` as its envelope sender.

    `allowed_senders` holds exact addresses and "*@domain" patterns, compared
    without regard to case; empty means only the account's own address. The
    null sender (bounces) is only accepted when it will be rewritten anyway.
    """
    if sender == "":
        return account.rewrite_sender
    wanted = sender.lower()
    patterns = account.allowed_senders or (account_address(account),)
    domain = wanted.rpartition("@")[2]
    for pattern in (p.lower() for p in (*patterns, account_address(account))):
        if pattern == wanted:
            return True
        if pattern.startswith("*@") and pattern[2:] == domain:
            return True
    return False


def envelope_sender(account: Account, sender: str) -> str:
    """The MAIL FROM the upstream gets for an allowed `sender`."""
    return account_address(account) if account.rewrite_sender else sender


def relay_device(
    authenticated: Device | None, by_network: Device | None
) -> tuple[Device, str] | None:
    """The device a session relays as, and how it was identified."""
    if authenticated is not None:
        return authenticated, "password"
    if by_network is not None:
        return by_network, "network"
    return None
