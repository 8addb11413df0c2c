"""The `gateway` admin command.

Each subcommand is one `_register_*` function that adds its parser and one
`_run_*` function that does the work and returns the exit status, so adding a
command (oauth, queue) touches nothing else. All of them share `--config FILE`
and `--json`, which may come before or after the command name, and they say
which configuration file they used whenever they fail.
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from argon2 import PasswordHasher, profiles

from gateway.config import ConfigError, ConfigLocation, load_config, locate_config
from gateway.model import Config, Listener

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

PROG = "gateway"

Run = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Administer the mail gateway.",
    )
    _add_common_options(parser, at_top=True)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    from gateway.oauth.cli import register as _register_oauth
    from gateway.smtp.cli import register as _register_queue

    for register in (
        _register_hash_password,
        _register_check_config,
        _register_oauth,
        _register_queue,
    ):
        register(commands)
    return parser


def _add_common_options(parser: argparse.ArgumentParser, *, at_top: bool) -> None:
    """The options every command takes. On a subcommand they default to
    SUPPRESS, so that `gateway --json check-config` is not undone by the
    subcommand's own default."""
    default: Any = None if at_top else argparse.SUPPRESS
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=default,
        help="configuration file (default: $GATEWAY_CONFIG, else /etc/gateway/gateway.toml)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if at_top else argparse.SUPPRESS,
        help="print machine-readable JSON instead of text",
    )


def _add_command(
    commands: Commands,
    name: str,
    run: Run,
    summary: str,
    description: str,
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=summary, description=description)
    _add_common_options(parser, at_top=False)
    parser.set_defaults(run=run)
    return parser


def _fail(command: str, message: str) -> int:
    print(f"{PROG} {command}: {message}", file=sys.stderr)
    return 1


def _emit_json(document: dict[str, Any]) -> None:
    print(json.dumps(document, indent=2))


# -- hash-password ---------------------------------------------------------------


def _register_hash_password(commands: Commands) -> None:
    _add_command(
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
        return _fail("hash-password", str(e))
    hashed = password_hasher().hash(password)
    if args.json:
        _emit_json({"password_hash": hashed})
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


def _register_check_config(commands: Commands) -> None:
    parser = _add_command(
        commands,
        "check-config",
        _run_check_config,
        "validate the configuration file and list every problem",
        "Load the configuration as the gateway would, including certificate, key "
        "and password files, and list every problem found. Exits 1 if there is any.",
    )
    parser.add_argument("file", nargs="?", metavar="FILE", help="same as --config FILE")


def config_location(args: argparse.Namespace) -> ConfigLocation:
    """The file a command works on: `--config`, `$GATEWAY_CONFIG` or the default."""
    return locate_config(getattr(args, "file", None) or args.config)


def _run_check_config(args: argparse.Namespace) -> int:
    if args.file is not None and args.config is not None and args.file != args.config:
        return _fail("check-config", "give the file either as FILE or with --config, not both")
    location = config_location(args)
    try:
        config = load_config(location.path)
    except ConfigError as e:
        _report_problems(location, e, as_json=args.json)
        return 1
    _report_valid(location, config, as_json=args.json)
    return 0


def _report_problems(location: ConfigLocation, error: ConfigError, *, as_json: bool) -> None:
    """One line per problem, each starting with the file, like a compiler's:
    grep-able, and an editor can jump from it."""
    problems = error.problems
    if as_json:
        _emit_json(
            {
                **_location_json(location),
                "valid": False,
                "unreadable": error.unreadable,
                "problems": [{"path": p.path, "message": p.message} for p in problems],
            }
        )
        return
    # When the file cannot even be opened, how it was chosen is likely the mistake.
    suffix = f" ({location.origin})" if error.unreadable else ""
    for problem in problems:
        print(f"{location.path}: {problem}{suffix}")


def _report_valid(location: ConfigLocation, config: Config, *, as_json: bool) -> None:
    listeners = config.pop3.listeners + config.smtp.listeners
    if as_json:
        _emit_json(
            {
                **_location_json(location),
                "valid": True,
                "problems": [],
                "listeners": [_listener_json(listener) for listener in listeners],
                "providers": sorted(config.providers),
                "accounts": sorted(config.accounts),
                "devices": sorted(config.devices),
            }
        )
        return
    print(f"{location.path}: valid")
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


def _location_json(location: ConfigLocation) -> dict[str, str]:
    return {"config": str(location.path), "config_origin": location.origin}


def _listener_json(listener: Listener) -> dict[str, Any]:
    return {
        "protocol": listener.protocol,
        "address": listener.address,
        "port": listener.port,
        "tls": listener.tls,
        "min_tls": listener.min_tls,
        "allow_plaintext_auth": listener.allow_plaintext_auth,
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
    return text


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


if __name__ == "__main__":
    sys.exit(main())
