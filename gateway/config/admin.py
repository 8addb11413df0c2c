"""`[admin]` (the admin HTTP listener) and `[log]` (how the log is written)."""

from __future__ import annotations

import ipaddress

from gateway.config.devices import argon2_password_hash as password_hash
from gateway.config.listeners import addresses_overlap, is_ip_address
from gateway.config.reader import Table
from gateway.model import (
    LOG_FORMATS,
    AdminSettings,
    AdminUser,
    LogSettings,
    TLSFiles,
    field_default,
)

# A console session may idle from one minute to one day.
_IDLE_LIMITS = (60.0, 86400.0)


def admin_section(root: Table, tls: TLSFiles | None) -> AdminSettings | None:
    """The admin listener, or None when the file has no `[admin]` section:
    nothing listens for HTTP unless the admin asks for it."""
    if not root.has("admin"):
        return None
    table = root.table("admin")
    mark = table.reader.mark()
    address = table.string("address", field_default(AdminSettings, "address"))
    if address is not None and not is_ip_address(address):
        table.problem("address", f"{address!r} is not an IP address")
        address = None
    port = table.integer("port", field_default(AdminSettings, "port"), low=1, high=65535)
    wants_tls: bool | None = field_default(AdminSettings, "tls")
    if table.has("tls"):
        wants_tls = table.boolean("tls", False)
    users = admin_users(table.table("users"))
    idle = table.seconds("session_idle", field_default(AdminSettings, "session_idle"))
    if idle is not None and not _IDLE_LIMITS[0] <= idle <= _IDLE_LIMITS[1]:
        table.problem("session_idle", "must be between 60 and 86400 seconds")
    table.finish()
    if address is None or port is None or idle is None or not table.reader.clean_since(mark):
        return None
    settings = AdminSettings(
        address=address, port=port, tls=wants_tls, users=users, session_idle=idle
    )
    loopback = ipaddress.ip_address(address).is_loopback
    if settings.uses_tls and tls is None:
        table.problem(
            "tls" if table.has("tls") else "address",
            "HTTPS on the admin listener needs the [tls] certificate"
            + ("" if loopback else " (plain HTTP is the default only on a loopback address)"),
        )
        return None
    if not settings.uses_tls and not loopback:
        table.reader.warn(
            table.at("tls"),
            f"metrics and health are served in clear text on {address}, not only on loopback",
        )
    for path, listener in table.reader.listeners:
        if listener.port == port and addresses_overlap(listener.address, address):
            table.problem("port", f"{address} port {port} is already taken by {path}")
            return None
    return settings


def admin_users(table: Table) -> dict[str, AdminUser]:
    """`[admin.users.NAME] password_hash = "$argon2id$..."`: the web console's
    logins, hashed like device passwords (`gateway hash-password`)."""
    users: dict[str, AdminUser] = {}
    for name, entry in table.entries():
        hashed = password_hash(entry)
        entry.finish()
        if hashed is not None:
            users[name] = AdminUser(name=name, password_hash=hashed)
    table.finish()
    return users


def log_section(table: Table) -> LogSettings:
    log_format = table.choice("format", LOG_FORMATS, field_default(LogSettings, "format"))
    table.finish()
    return LogSettings(format=log_format or field_default(LogSettings, "format"))
