"""`[devices.NAME]`: a local client, its password hash, networks and protocols."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Final

import argon2

from gateway.config.reader import Reader, Table
from gateway.model import DEVICE_PROTOCOLS, Device, IPNetwork, Secret, field_default

_ARGON2_PREFIXES: Final = ("$argon2id$", "$argon2i$", "$argon2d$")


def device(
    name: str, table: Table, accounts: set[str], served: Mapping[str, frozenset[str]]
) -> Device | None:
    """`served` maps each built account to the device protocols its provider can
    serve: what a device gets when it does not list `protocols`, so a printer
    meant only to send mail needs no `protocols = ["smtp"]`."""
    mark = table.reader.mark()
    password_hash = argon2_password_hash(table)
    account = table.string("account")
    if account is not None and account not in accounts:
        table.problem("account", f"unknown account {account!r}")
    allow_from = _allow_from(table)
    protocols = _protocols(table, served.get(account) if account is not None else None)
    relay_without_auth = table.boolean(
        "relay_without_auth", field_default(Device, "relay_without_auth")
    )
    if relay_without_auth and not table.has("allow_from"):
        table.problem(
            "relay_without_auth",
            "needs allow_from naming the device's own networks, or the gateway "
            "would relay for any address",
        )
    if relay_without_auth and any(network.prefixlen == 0 for network in allow_from):
        table.problem(
            "relay_without_auth",
            "allow_from includes every address, which would make the gateway an open relay",
        )
    if relay_without_auth and "smtp" not in protocols:
        table.problem("relay_without_auth", "the device's protocols do not include smtp")
    if (
        not table.reader.clean_since(mark)
        or password_hash is None
        or account is None
        or relay_without_auth is None
    ):
        return None
    return Device(
        name=name,
        password_hash=password_hash,
        account=account,
        allow_from=allow_from,
        protocols=protocols,
        relay_without_auth=relay_without_auth,
    )


def argon2_password_hash(table: Table) -> Secret | None:
    value = table.secret("password_hash")
    if value is None:
        return None
    if not value.startswith(_ARGON2_PREFIXES) or not _parses_as_argon2(value):
        table.problem(
            "password_hash", "is not an argon2 hash; make one with `gateway hash-password`"
        )
        return None
    return Secret(value)


def _parses_as_argon2(value: str) -> bool:
    try:
        argon2.extract_parameters(value)
    except argon2.exceptions.InvalidHashError:
        return False
    return True


def _allow_from(table: Table) -> tuple[IPNetwork, ...]:
    """Partial after a reported problem; `device` then builds nothing."""
    if not table.has("allow_from"):
        default: tuple[IPNetwork, ...] = field_default(Device, "allow_from")
        return default
    networks = [network(path, text, table.reader) for path, text in table.strings("allow_from")]
    if table.data["allow_from"] == []:
        table.problem("allow_from", "is empty, so the device could never connect")
    return tuple(network for network in networks if network is not None)


def network(path: str, text: str, reader: Reader) -> IPNetwork | None:
    """Strict on purpose: '10.0.0.1/8' is as likely a typo for '10.0.0.1/32' as
    for '10.0.0.0/8', and guessing wrong opens or closes a whole network."""
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        meant = ipaddress.ip_network(text, strict=False)
    except ValueError:
        reader.add(path, f"{text!r} is not a network (write an address or address/prefix)")
        return None
    address = text.partition("/")[0]
    reader.add(
        path,
        f"{text!r} has host bits set: write '{meant}' for the network, "
        f"or '{address}' for the single address",
    )
    return None


def _protocols(table: Table, served: frozenset[str] | None) -> frozenset[str]:
    """Partial after a reported problem; `device` then builds nothing.

    Without `protocols`, what the account's provider can serve (all of them
    when the account itself is broken: that is reported where it is)."""
    if not table.has("protocols"):
        if served is None:
            default: frozenset[str] = field_default(Device, "protocols")
            return default
        if not served:
            table.problem(
                "account",
                "its provider has no endpoint a device could use (pop3, imap or smtp)",
            )
        return served
    names = ", ".join(DEVICE_PROTOCOLS)
    protocols = set()
    for path, text in table.strings("protocols"):
        if text in DEVICE_PROTOCOLS:
            protocols.add(text)
        else:
            table.reader.add(path, f"must be one of {names} (got {text!r})")
    if table.data["protocols"] == []:
        table.problem("protocols", f"is empty: name at least one of {names}")
    return frozenset(protocols)
