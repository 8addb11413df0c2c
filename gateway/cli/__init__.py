"""The `gateway` admin command (console script `gateway = "gateway.cli:main"`).

One module per group of commands, each with a `register(commands)`:
`config` (hash-password, check-config), `oauth`, `queue`, `check`, `state`; what they share
(common options, JSON output, problem reports) is in `common`, which imports
none of them, so adding a command touches nothing else.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gateway.cli import check, config, oauth, queue, state
from gateway.cli.common import PROG, add_common_options

__all__ = ["build_parser", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Administer the mail gateway.",
    )
    add_common_options(parser, at_top=True)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for register in (
        config.register_hash_password,
        config.register_check_config,
        oauth.register,
        queue.register,
        check.register,
        state.register,
    ):
        register(commands)
    return parser
