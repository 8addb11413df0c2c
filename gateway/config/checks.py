"""Checks across sections: what a device needs from its account's provider.

They look only at objects that were built, so an entry that already had a
problem of its own is not blamed a second time here.
"""

from __future__ import annotations

# Moved next to the account builder (it also fills in each account's default
# grant); re-exported here for the loader.
from gateway.config.accounts import check_oauth_accounts
from gateway.config.reader import Reader, key_path
from gateway.model import Account, Device, Provider
from gateway.smtp.relay_path import can_relay


def served_protocols(
    accounts: dict[str, Account], providers: dict[str, Provider]
) -> dict[str, frozenset[str]]:
    """The device protocols each account's provider can serve: POP3 when it has
    the account's maildrop endpoint (pop3, or imap for an IMAP-backed account),
    SMTP when it has an smtp endpoint or the account relays through Graph."""
    served: dict[str, frozenset[str]] = {}
    for account in accounts.values():
        provider = providers.get(account.provider)
        if provider is None:
            continue
        protocols = set()
        if getattr(provider, account.mailbox) is not None:
            protocols.add("pop3")
        if can_relay(account, provider):
            protocols.add("smtp")
        served[account.name] = frozenset(protocols)
    return served


def check_upstreams(
    devices: dict[str, Device],
    accounts: dict[str, Account],
    providers: dict[str, Provider],
    reader: Reader,
    *,
    smtp_listening: bool,
) -> None:
    """A device needs an account whose provider has the endpoint it will use:
    POP3 (or IMAP, for an IMAP-backed account) for a POP3 device, SMTP for an
    SMTP device when SMTP listeners exist.

    An account without one is fine as long as no device needs it (an
    SMTP-only relay account, say), so this is checked across sections.
    """
    for device in devices.values():
        account = accounts.get(device.account)
        provider = providers.get(account.provider) if account else None
        if account is None or provider is None:
            continue
        needs: list[tuple[str, str]] = []
        if "pop3" in device.protocols:
            needs.append(("pop3", account.mailbox))
        if "smtp" in device.protocols and smtp_listening:
            needs.append(("smtp", "smtp"))
        for protocol, endpoint in needs:
            if protocol == "smtp" and can_relay(account, provider):
                continue
            if getattr(provider, endpoint) is None:
                reader.add(
                    key_path(key_path("devices", device.name), "account"),
                    f"account {device.account!r} uses provider {provider.name!r}, which has no "
                    f"{endpoint} endpoint, yet this device may use {protocol} (set protocols, "
                    f"or add {key_path(key_path('providers', provider.name), endpoint)})",
                )


__all__ = ["check_oauth_accounts", "check_upstreams", "served_protocols"]
