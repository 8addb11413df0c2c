"""What every `gateway` command shares: options, registration, output, failures.

Each command module (`config`, `oauth`, `queue`) has a `register(commands)`
that adds its parsers with `add_command`, and run functions that take the
parsed arguments and return the exit status. All commands take `--config FILE`
and `--json`, before or after the command name, and say which configuration
file they used whenever they fail.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.config import ConfigError, ConfigLocation, load_config, locate_config
from gateway.model import Config

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

PROG = "gateway"

Run = Callable[[argparse.Namespace], int]


class CommandFailed(Exception):
    """What the admin is told, on one line, before exit status 1."""


def add_common_options(parser: argparse.ArgumentParser, *, at_top: bool) -> None:
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


def add_command(
    commands: Commands,
    name: str,
    run: Run,
    summary: str,
    description: str,
) -> argparse.ArgumentParser:
    """A (sub)command that takes the common options and runs `run`."""
    parser = commands.add_parser(name, help=summary, description=description)
    add_common_options(parser, at_top=False)
    parser.set_defaults(run=run)
    return parser


def fail(command: str, message: str) -> int:
    """Tell the admin what went wrong, on stderr, prefixed with the command; status 1."""
    print(f"{PROG} {command}: {message}", file=sys.stderr)
    return 1


def emit_json(document: dict[str, Any]) -> None:
    print(json.dumps(document, indent=2))


def config_location(args: argparse.Namespace) -> ConfigLocation:
    """The file a command works on: `--config`, `$GATEWAY_CONFIG` or the default."""
    return locate_config(getattr(args, "file", None) or args.config)


def load_or_report(args: argparse.Namespace) -> Config | None:
    """The configuration, or None after its problems were printed (as check-config does)."""
    location = config_location(args)
    try:
        return load_config(location.path)
    except ConfigError as e:
        report_problems(location, e, as_json=args.json)
        return None


def report_problems(location: ConfigLocation, error: ConfigError, *, as_json: bool) -> None:
    """One line per problem, each starting with the file, like a compiler's:
    grep-able, and an editor can jump from it."""
    problems = error.problems
    if as_json:
        emit_json(
            {
                **location_json(location),
                "valid": False,
                "unreadable": error.unreadable,
                "problems": [{"path": p.path, "message": p.message} for p in problems],
                "warnings": [{"path": w.path, "message": w.message} for w in error.warnings],
            }
        )
        return
    # When the file cannot even be opened, how it was chosen is likely the mistake.
    suffix = f" ({location.origin})" if error.unreadable else ""
    for problem in problems:
        print(f"{location.path}: {problem}{suffix}")
    for warning in error.warnings:
        print(f"{location.path}: warning: {warning}")


def location_json(location: ConfigLocation) -> dict[str, str]:
    return {"config": str(location.path), "config_origin": location.origin}
