"""Checks across sections: what a device needs from its account's provider.

They look only at objects that were built, so an entry that already had a
problem of its own is not blamed a second time here.
"""

from __future__ import annotations

from gateway.config.reader import Reader, key_path
from gateway.model import Account, Device, Provider


def served_protocols(
    accounts: dict[str, Account], providers: dict[str, Provider]
) -> dict[str, frozenset[str]]:
    """The device protocols each account's provider can serve: POP3 when it has
    the account's maildrop endpoint (pop3, or imap for an IMAP-backed account),
    SMTP when it has an smtp endpoint."""
    served: dict[str, frozenset[str]] = {}
    for account in accounts.values():
        provider = providers.get(account.provider)
        if provider is None:
            continue
        protocols = set()
        if getattr(provider, account.mailbox) is not None:
            protocols.add("pop3")
        if provider.smtp is not None:
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
            if getattr(provider, endpoint) is None:
                reader.add(
                    key_path(key_path("devices", device.name), "account"),
                    f"account {device.account!r} uses provider {provider.name!r}, which has no "
                    f"{endpoint} endpoint, yet this device may use {protocol} (set protocols, "
                    f"or add {key_path(key_path('providers', provider.name), endpoint)})",
                )


def check_oauth_accounts(
    accounts: dict[str, Account], providers: dict[str, Provider], reader: Reader
) -> None:
    """An OAuth2 account needs its provider's OAuth client, with what its grant uses."""
    for account in accounts.values():
        provider = providers.get(account.provider)
        if account.auth != "oauth2" or provider is None:
            continue
        where = key_path(key_path("accounts", account.name), "provider")
        oauth = provider.oauth
        if oauth is None:
            reader.add(
                where,
                f"provider {provider.name!r} has no OAuth2 client: add a preset or an oauth table",
            )
        elif account.grant == "device_code" and not oauth.device_authorization_url:
            reader.add(where, f"provider {provider.name!r} has no device_authorization_url")
        elif account.grant == "authorization_code" and not oauth.authorization_url:
            reader.add(where, f"provider {provider.name!r} has no authorization_url")
        elif account.grant == "client_credentials" and oauth.client_secret is None:
            reader.add(
                where,
                f"provider {provider.name!r} has no client secret, which the "
                "client_credentials grant needs",
            )
