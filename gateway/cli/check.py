"""`gateway check ACCOUNT...` / `gateway check --all`: does an account work end to end?

Runs `gateway.check` for each account on the global reactor, with the token
manager the gateway itself would use (same configuration, key and token
store), prints each step with its outcome and, on failure, the fix, and
exits non-zero when any step failed. `--json` gives one document.
"""

from __future__ import annotations

import argparse
import socket
from typing import TYPE_CHECKING, Any

from gateway.check import AccountCheck, check_account, format_check
from gateway.cli.common import (
    add_command,
    config_location,
    emit_json,
    fail,
    load_or_report,
    location_json,
)
from gateway.cli.oauth import run_on_reactor
from gateway.model import Config

if TYPE_CHECKING:
    from gateway.cli.common import Commands


def register(commands: Commands) -> None:
    """Add `gateway check` to the admin command."""
    check = add_command(
        commands,
        "check",
        _run_check,
        "check an account's whole upstream path (token, connect, TLS, login, mailbox, SMTP)",
        "Walk an account's path as the gateway would: the OAuth2 token (from the "
        "gateway's token store), then for its mailbox protocol connect, TLS "
        "verification, login and opening the mailbox (POP3 STAT or IMAP EXAMINE, "
        "read-only), and for SMTP connect, TLS, EHLO and AUTH, then QUIT without "
        "sending. Prints each step and, for a failed one, what to fix; exit status 1 "
        "if any step failed. Run it as the user the gateway runs as.",
    )
    check.add_argument("accounts", nargs="*", metavar="ACCOUNT")
    check.add_argument("--all", action="store_true", help="check every configured account")


def _run_check(args: argparse.Namespace) -> int:
    config = load_or_report(args)
    if config is None:
        return 1
    if args.all == bool(args.accounts):
        return fail("check", "name one or more accounts, or give --all")
    names = sorted(config.accounts) if args.all else args.accounts
    unknown = [name for name in names if name not in config.accounts]
    if unknown:
        known = ", ".join(sorted(config.accounts)) or "none"
        return fail("check", f"no account {unknown[0]!r} in the configuration (accounts: {known})")

    async def walk(reactor: Any) -> list[AccountCheck]:
        return await check_accounts(config, names, reactor=reactor)

    results: list[AccountCheck] = run_on_reactor(walk)
    ok = all(result.ok for result in results)
    if args.json:
        emit_json(
            {
                **location_json(config_location(args)),
                "ok": ok,
                "accounts": [result.as_dict() for result in results],
            }
        )
    else:
        for n, result in enumerate(results):
            if n:
                print()
            for line in format_check(result):
                print(line)
    return 0 if ok else 1


async def check_accounts(config: Config, names: list[str], *, reactor: Any) -> list[AccountCheck]:
    """Each account in turn (one at a time: a provider's connection limits are the
    gateway's too), sharing one token manager as the running gateway does."""
    tokens = None
    if any(config.accounts[name].auth == "oauth2" for name in names):
        from gateway.oauth.manager import TokenManager

        tokens = TokenManager(config, clock=reactor, reactor=reactor)
    helo = socket.gethostname()
    return [
        await check_account(
            config, config.accounts[name], reactor=reactor, tokens=tokens, helo_name=helo
        )
        for name in names
    ]
