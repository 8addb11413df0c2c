"""`[pop3]`, `[smtp]`, `[oauth]` and `[proxy]`: listeners and the tunables of each service.

A tunable that had a problem falls back to the model's default here; the
object is never used then, since the loader raises for every problem.
"""

from __future__ import annotations

from typing import TypeVar

from gateway.config.devices import network
from gateway.config.listeners import listeners
from gateway.config.reader import Table
from gateway.config.secrets import check_secret_file
from gateway.model import OAuthSettings, POP3Settings, ProxySettings, SMTPSettings

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
