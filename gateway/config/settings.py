"""`[pop3]`, `[smtp]`, `[oauth]`, `[proxy]`, `[penalties]`, `[limits]`: each service's tunables.

A tunable that had a problem falls back to the model's default here; the
object is never used then, since the loader raises for every problem.
"""

from __future__ import annotations

from typing import TypeVar

from gateway.config.devices import network
from gateway.config.listeners import listeners
from gateway.config.reader import Table
from gateway.config.secrets import check_secret_file
from gateway.model import (
    LONG_LINES_CHOICES,
    LimitSettings,
    OAuthSettings,
    PenaltySettings,
    POP3Settings,
    ProxySettings,
    SMTPSettings,
)

T = TypeVar("T")


def _or(value: T | None, default: T) -> T:
    return default if value is None else value


def pop3_section(table: Table) -> POP3Settings:
    d = POP3Settings()
    idle_timeout = table.seconds("idle_timeout", d.idle_timeout)
    stall_timeout = table.seconds("stall_timeout", d.stall_timeout)
    line_timeout = table.seconds("line_timeout", d.line_timeout)
    auth_failure_delay = table.seconds("auth_failure_delay", d.auth_failure_delay)
    built = listeners(table, "pop3")
    table.finish()
    return POP3Settings(
        listeners=built,
        idle_timeout=_or(idle_timeout, d.idle_timeout),
        stall_timeout=_or(stall_timeout, d.stall_timeout),
        line_timeout=_or(line_timeout, d.line_timeout),
        auth_failure_delay=_or(auth_failure_delay, d.auth_failure_delay),
    )


def smtp_section(table: Table) -> SMTPSettings:
    d = SMTPSettings()
    built = listeners(table, "smtp")
    idle_timeout = table.seconds("idle_timeout", d.idle_timeout)
    stall_timeout = table.seconds("stall_timeout", d.stall_timeout)
    line_timeout = table.seconds("line_timeout", d.line_timeout)
    auth_failure_delay = table.seconds("auth_failure_delay", d.auth_failure_delay)
    max_message_size = table.integer("max_message_size", d.max_message_size, low=1024, high=2**31)
    max_recipients = table.integer("max_recipients", d.max_recipients, low=1, high=10000)
    retry_first = table.seconds("retry_first", d.retry_first)
    retry_max_interval = table.seconds("retry_max_interval", d.retry_max_interval)
    message_lifetime = table.seconds("message_lifetime", d.message_lifetime)
    long_lines = table.choice("long_lines", LONG_LINES_CHOICES, d.long_lines)
    relay_connections = table.integer("relay_connections", d.relay_connections, low=1, high=100)
    relay_keepalive = table.seconds("relay_keepalive", d.relay_keepalive)
    control_interval = table.seconds("control_interval", d.control_interval)
    table.finish()
    return SMTPSettings(
        listeners=built,
        idle_timeout=_or(idle_timeout, d.idle_timeout),
        stall_timeout=_or(stall_timeout, d.stall_timeout),
        line_timeout=_or(line_timeout, d.line_timeout),
        auth_failure_delay=_or(auth_failure_delay, d.auth_failure_delay),
        max_message_size=_or(max_message_size, d.max_message_size),
        max_recipients=_or(max_recipients, d.max_recipients),
        retry_first=_or(retry_first, d.retry_first),
        retry_max_interval=_or(retry_max_interval, d.retry_max_interval),
        message_lifetime=_or(message_lifetime, d.message_lifetime),
        long_lines=_or(long_lines, d.long_lines),
        relay_connections=_or(relay_connections, d.relay_connections),
        relay_keepalive=_or(relay_keepalive, d.relay_keepalive),
        control_interval=_or(control_interval, d.control_interval),
    )


def oauth_section(table: Table) -> OAuthSettings:
    d = OAuthSettings()
    key_file = table.file("key_file", d.key_file)
    if key_file is not None and key_file.is_file():
        check_secret_file(table, "key_file", key_file)
    refresh_margin = table.seconds("refresh_margin", d.refresh_margin)
    idle_refresh_interval = table.seconds("idle_refresh_interval", d.idle_refresh_interval)
    table.finish()
    return OAuthSettings(
        key_file=key_file,
        refresh_margin=_or(refresh_margin, d.refresh_margin),
        idle_refresh_interval=_or(idle_refresh_interval, d.idle_refresh_interval),
    )


def proxy_section(table: Table) -> ProxySettings:
    """The networks allowed to send a PROXY protocol header. Every address is
    refused: anyone could then claim to be any device, `allow_from` and
    `relay_without_auth` included."""
    d = ProxySettings()
    trusted = [network(path, text, table.reader) for path, text in table.strings("trusted")]
    for built in trusted:
        if built is not None and built.prefixlen == 0:
            table.problem(
                "trusted",
                f"{built} includes every address: anyone could claim any client address",
            )
    header_timeout = table.seconds("header_timeout", d.header_timeout)
    table.finish()
    return ProxySettings(
        trusted=tuple(built for built in trusted if built is not None),
        header_timeout=_or(header_timeout, d.header_timeout),
    )


def limits_section(table: Table) -> LimitSettings:
    """Connection limits. Each is a positive number: a limit an admin wants
    out of the way is set high, never switched off by a zero read as "none"."""
    d = LimitSettings()
    most = 1_000_000
    max_connections = table.integer("max_connections", d.max_connections, low=1, high=most)
    per_address = table.integer(
        "max_connections_per_address", d.max_connections_per_address, low=1, high=most
    )
    per_device = table.integer(
        "max_sessions_per_device", d.max_sessions_per_device, low=1, high=most
    )
    lifetime = table.seconds("max_session_lifetime", d.max_session_lifetime)
    table.finish()
    return LimitSettings(
        max_connections=_or(max_connections, d.max_connections),
        max_connections_per_address=_or(per_address, d.max_connections_per_address),
        max_sessions_per_device=_or(per_device, d.max_sessions_per_device),
        max_session_lifetime=_or(lifetime, d.max_session_lifetime),
    )


def penalties_section(table: Table) -> PenaltySettings:
    """Login penalties (gateway.penalties). A trusted network is never
    slowed nor locked out: naming every address would switch them off, which
    `enabled = false` says plainly."""
    d = PenaltySettings()
    enabled = table.boolean("enabled", d.enabled)
    max_delay = table.seconds("max_delay", d.max_delay)
    lockout_after = table.integer("lockout_after", d.lockout_after, low=1, high=10000)
    lockout_window = table.seconds("lockout_window", d.lockout_window)
    lockout_time = table.seconds("lockout_time", d.lockout_time)
    device_slow_after = table.integer(
        "device_slow_after", d.device_slow_after, low=1, high=1_000_000
    )
    ipv6_prefix = table.integer("ipv6_prefix", d.ipv6_prefix, low=16, high=128)
    max_entries = table.integer("max_entries", d.max_entries, low=100, high=10_000_000)
    trusted = [network(path, text, table.reader) for path, text in table.strings("trusted")]
    for built in trusted:
        if built is not None and built.prefixlen == 0:
            table.problem("trusted", f"{built} includes every address: write enabled = false")
    table.finish()
    return PenaltySettings(
        enabled=_or(enabled, d.enabled),
        max_delay=_or(max_delay, d.max_delay),
        lockout_after=_or(lockout_after, d.lockout_after),
        lockout_window=_or(lockout_window, d.lockout_window),
        lockout_time=_or(lockout_time, d.lockout_time),
        device_slow_after=_or(device_slow_after, d.device_slow_after),
        ipv6_prefix=_or(ipv6_prefix, d.ipv6_prefix),
        trusted=tuple(built for built in trusted if built is not None),
        max_entries=_or(max_entries, d.max_entries),
    )
