"""`gateway hash-password` and `gateway check-config`: a device's password
hash, and the configuration checked as the gateway would load it."""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import sys
from typing import TYPE_CHECKING, Any

from argon2 import PasswordHasher, profiles

from gateway.cli.common import (
    add_command,
    config_location,
    emit_json,
    fail,
    location_json,
    report_problems,
)
from gateway.config import ConfigError, ConfigLocation, load_config
from gateway.model import Config, Listener

if TYPE_CHECKING:
    from gateway.cli.common import Commands


# -- hash-password ---------------------------------------------------------------


def register_hash_password(commands: Commands) -> None:
    add_command(
        commands,
        "hash-password",
        _run_hash_password,
        "print an argon2id hash of a device password",
        "Print an argon2id hash of a new device password, to paste into a "
        "[devices.NAME] password_hash. Asks twice on a terminal; otherwise reads "
        "one line from standard input.",
    )


class _Refused(Exception):
    """A password that will not be hashed; the text says why."""


def _run_hash_password(args: argparse.Namespace) -> int:
    try:
        password = _read_new_password()
    except _Refused as e:
        return fail("hash-password", str(e))
    hashed = password_hasher().hash(password)
    if args.json:
        emit_json({"password_hash": hashed})
    else:
        print(hashed)
    return 0


def password_hasher() -> PasswordHasher:
    """RFC 9106's second recommended profile (64 MiB, t=3, p=4), named rather
    than taken from the library's current default so hashes stay predictable
    across argon2-cffi upgrades."""
    return PasswordHasher.from_parameters(profiles.RFC_9106_LOW_MEMORY)


def _read_new_password() -> str:
    """Ask twice on a terminal, where a typo is invisible; read one line when
    piped, so scripts can feed it."""
    if sys.stdin.isatty():
        try:
            password = getpass.getpass("Device password: ")
            if getpass.getpass("Same password again: ") != password:
                raise _Refused("the two passwords differ; nothing was hashed")
        except EOFError:
            raise _Refused("no password given") from None
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    if not password:
        raise _Refused("an empty password is refused")
    return password


# -- check-config ---------------------------------------------------------------------


def register_check_config(commands: Commands) -> None:
    parser = add_command(
        commands,
        "check-config",
        _run_check_config,
        "validate the configuration file and list every problem",
        "Load the configuration as the gateway would, including certificate, key "
        "and password files, and list every problem found. Exits 1 if there is any.",
    )
    parser.add_argument("file", nargs="?", metavar="FILE", help="same as --config FILE")


def _run_check_config(args: argparse.Namespace) -> int:
    if args.file is not None and args.config is not None and args.file != args.config:
        return fail("check-config", "give the file either as FILE or with --config, not both")
    location = config_location(args)
    try:
        config = load_config(location.path)
    except ConfigError as e:
        report_problems(location, e, as_json=args.json)
        return 1
    _report_valid(location, config, as_json=args.json)
    return 0


def _report_valid(location: ConfigLocation, config: Config, *, as_json: bool) -> None:
    listeners = config.pop3.listeners + config.smtp.listeners
    if as_json:
        emit_json(
            {
                **location_json(location),
                "valid": True,
                "problems": [],
                "warnings": list(config.warnings),
                "listeners": [_listener_json(listener) for listener in listeners],
                "providers": sorted(config.providers),
                "accounts": sorted(config.accounts),
                "devices": sorted(config.devices),
            }
        )
        return
    print(f"{location.path}: valid")
    for warning in config.warnings:
        print(f"{location.path}: warning: {warning}")
    for listener in listeners:
        print(f"  {_describe_listener(listener)}")
    if not listeners:
        print("  no listeners")
    counts = (
        _count(len(config.providers), "provider"),
        _count(len(config.accounts), "account"),
        _count(len(config.devices), "device"),
    )
    print(f"  {', '.join(counts)}")


def _listener_json(listener: Listener) -> dict[str, Any]:
    return {
        "protocol": listener.protocol,
        "address": listener.address,
        "port": listener.port,
        "tls": listener.tls,
        "min_tls": listener.min_tls,
        "allow_plaintext_auth": listener.allow_plaintext_auth,
        "proxy_protocol": listener.proxy_protocol,
    }


def _describe_listener(listener: Listener) -> str:
    host = listener.address
    if ipaddress.ip_address(host).version == 6:
        host = f"[{host}]"
    tls = "implicit TLS" if listener.tls == "implicit" else "STARTTLS"
    text = f"{listener.protocol} on {host}:{listener.port}, {tls}, TLS {listener.min_tls} or newer"
    if listener.allow_plaintext_auth:
        text += ", plaintext login allowed before " + (
            "STLS" if listener.protocol == "pop3" else "STARTTLS"
        )
    if listener.proxy_protocol:
        text += ", behind a proxy (PROXY protocol header required)"
    return text


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
