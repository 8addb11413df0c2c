"""`gateway oauth ...`: onboard OAuth2 accounts and look after their tokens.

- ``gateway oauth authorize ACCOUNT``: runs the account's grant (device code,
  authorization code with PKCE; for app-only client credentials and service
  account grants, which the gateway runs by itself anyway, it proves the
  set-up) and stores the tokens, encrypted, in the gateway's state
  directory (with ``[state] backend = "postgresql"``: in the shared
  database). A running gateway picks them up by itself (it notices the
  change); no restart.
- ``gateway oauth status [ACCOUNT...]``: per account, its state, token expiry,
  last refresh and last error, as the running gateway last recorded them.
- ``gateway oauth revoke ACCOUNT``: asks the provider to revoke the grant
  where it has a revocation endpoint (Google), then forgets the account's
  tokens whatever the provider answered; devices get "not authorised" until
  the next `authorize`.
- ``gateway oauth new-key``: prints a fresh gateway key, for GATEWAY_KEY.

The work is done by `gateway.oauth.admin`; this module wires it to argparse,
the global reactor and standard input.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

from gateway.cli.common import add_command, emit_json, fail, load_or_report
from gateway.oauth.admin import (
    CommandFailed,
    authorize_account,
    format_status,
    has_revocation,
    revoke_account,
    revoke_at_provider,
    status_report,
)
from gateway.oauth.endpoint import NoOAuthClient
from gateway.oauth.errors import AuthorizationFailed, OAuthError
from gateway.oauth.http import TreqPoster
from gateway.oauth.keys import KEY_ENV, encode_key, new_key
from gateway.state import StateError
from gateway.state.database import StateUnavailable

if TYPE_CHECKING:
    from gateway.cli.common import Commands


# -- argparse wiring ---------------------------------------------------------------


def register(commands: Commands) -> None:
    """Add `gateway oauth` and its subcommands to the admin command."""
    oauth = add_command(
        commands,
        "oauth",
        _missing_subcommand,
        "onboard OAuth2 accounts and manage their tokens",
        "Authorise OAuth2 accounts, show their token state, revoke tokens.",
    )
    # The names in the metavar, so "the following arguments are required" lists them.
    sub = oauth.add_subparsers(
        title="oauth commands", metavar="{authorize,status,revoke,new-key}", required=True
    )
    authorize = add_command(
        sub,
        "authorize",
        _run_authorize,
        "obtain and store tokens for an account (its configured grant)",
        "Run the account's grant and store its tokens, encrypted, under the state "
        "directory. Device code: prints a URL and a code to enter in any browser. "
        "Authorization code: prints a URL; the redirect is caught on the loopback "
        "address (127.0.0.1 and ::1) or pasted back here. Client credentials and "
        "service account (app-only): the gateway fetches these tokens itself; this "
        "fetches one now to check the set-up. A running gateway uses the new tokens "
        "without a restart.",
    )
    authorize.add_argument("account", metavar="ACCOUNT")
    authorize.add_argument(
        "--port",
        type=int,
        default=0,
        help="authorization code: port of the localhost redirect listener (default: any)",
    )
    authorize.add_argument(
        "--redirect-uri",
        help="authorization code: the redirect URI registered for the app "
        "(default: the provider's loopback form, http://localhost:PORT for "
        "Microsoft, http://127.0.0.1:PORT for Google)",
    )
    authorize.add_argument(
        "--no-listen",
        action="store_true",
        help="authorization code: do not listen on localhost; only accept a pasted URL",
    )
    status = add_command(
        sub,
        "status",
        _run_status,
        "show each OAuth2 account's token state",
        "Per account: state, access token expiry, last refresh and last error.",
    )
    status.add_argument("accounts", nargs="*", metavar="ACCOUNT")
    revoke = add_command(
        sub,
        "revoke",
        _run_revoke,
        "revoke the grant at the provider (where possible) and forget the tokens",
        "Ask the provider to revoke the account's grant where it has a revocation "
        "endpoint (Google does; Microsoft has none for refresh tokens), then delete "
        "the tokens from the gateway's store, even if the provider's call failed. "
        "Devices of the account are refused until it is authorised again.",
    )
    revoke.add_argument("account", metavar="ACCOUNT")
    add_command(
        sub,
        "new-key",
        _run_new_key,
        f"print a new gateway key (for ${KEY_ENV})",
        f"Print a new random gateway key. Set it as ${KEY_ENV} (or write it to "
        "[oauth] key_file, mode 0600) before the first authorisation; tokens "
        "stored under one key cannot be read with another.",
    )


def _missing_subcommand(args: argparse.Namespace) -> int:  # pragma: no cover - argparse
    print("gateway oauth: give a command (authorize, status, revoke, new-key)", file=sys.stderr)
    return 2


def _run_authorize(args: argparse.Namespace) -> int:
    config = load_or_report(args)
    if config is None:
        return 1
    # With --json, stdout carries only the result document; the instructions
    # for the admin go to stderr.
    console = sys.stderr if args.json else sys.stdout

    async def flow(reactor: Any) -> dict[str, Any]:
        return await authorize_account(
            config,
            args.account,
            reactor=reactor,
            clock=reactor,
            poster=TreqPoster(reactor),
            out=console,
            paste=lambda: stdin_line(reactor),
            listen=not args.no_listen,
            port=args.port,
            redirect_uri=args.redirect_uri,
        )

    try:
        result = run_on_reactor(flow)
    except OAuthError as e:
        refusal = getattr(e, "refusal", None)
        advice = f" [{refusal.for_account(args.account)}]" if refusal is not None else ""
        return fail("oauth authorize", f"{e}{advice}")
    except (CommandFailed, StateError, StateUnavailable, NoOAuthClient) as e:
        return fail("oauth authorize", str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    _print_result(args, result, _describe_authorized(result))
    return 0


def _run_status(args: argparse.Namespace) -> int:
    config = load_or_report(args)
    if config is None:
        return 1
    try:
        report = status_report(config, args.accounts, now=time.time())
    except (CommandFailed, StateError, StateUnavailable) as e:
        return fail("oauth status", str(e))
    if args.json:
        emit_json({"accounts": report})
    else:
        for line in format_status(report):
            print(line)
    return 0


def _run_revoke(args: argparse.Namespace) -> int:
    config = load_or_report(args)
    if config is None:
        return 1

    async def at_provider(reactor: Any) -> str:
        return await revoke_at_provider(
            config, args.account, poster=TreqPoster(reactor), clock=reactor
        )

    try:
        # Only a provider with a revocation endpoint needs the reactor.
        provider_outcome = (
            run_on_reactor(at_provider) if has_revocation(config, args.account) else "no_endpoint"
        )
    except (CommandFailed, StateError, StateUnavailable) as e:
        return fail("oauth revoke", str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    try:
        result = revoke_account(config, args.account, now=time.time())
    except (CommandFailed, StateError, StateUnavailable) as e:
        return fail("oauth revoke", str(e))
    result["provider_revocation"] = provider_outcome
    _print_result(args, result, _describe_revoked(args.account, provider_outcome))
    return 0


def _describe_revoked(name: str, outcome: str) -> str:
    local = (
        f"account {name}: tokens deleted from the gateway; its devices are refused "
        f"until `gateway oauth authorize {name}`."
    )
    if outcome == "revoked":
        return local + " The provider revoked the grant too."
    if outcome == "no_tokens":
        return local + " There were no tokens to revoke at the provider."
    if outcome == "no_endpoint":
        return local + (
            " The provider has no revocation endpoint (Microsoft has none for refresh "
            "tokens): withdraw the consent or the app's permissions in its portal if the "
            "gateway should lose access there."
        )
    return local + (
        f" The provider's revocation call {outcome}; the tokens were forgotten here all "
        "the same: revoke the app's access at the provider too."
    )


def _run_new_key(args: argparse.Namespace) -> int:
    key = encode_key(new_key())
    _print_result(args, {"key": key}, key)
    return 0


def _print_result(args: argparse.Namespace, document: dict[str, Any], text: str) -> None:
    if args.json:
        emit_json(document)
    else:
        print(text)


def run_on_reactor(flow: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    """Run one coroutine on the global reactor and return its result (or raise).

    Like `twisted.internet.task.react`, without its `sys.exit`.
    """
    from twisted.internet import reactor

    outcome: list[Any] = []

    def start() -> None:
        d = ensureDeferred(flow(reactor))

        def finish(result: Any) -> None:
            outcome.append(result)
            reactor.stop()

        d.addBoth(finish)

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome:
        raise KeyboardInterrupt
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def stdin_line(reactor: Any, fd: int = 0) -> Deferred[str]:
    """The first non-empty line typed or pasted on standard input, read on the reactor.

    Fails with `AuthorizationFailed` at end of input (Ctrl-D, or a closed
    pipe): nothing will be pasted then, so the admin is told at once instead
    of after the whole sign-in timeout.
    """
    d: Deferred[str] = Deferred()
    reader = _LineReader(reactor, d, fd)
    reactor.addReader(reader)

    def stop(result: Any) -> Any:
        reactor.removeReader(reader)
        return result

    d.addBoth(stop)
    return d


class _LineReader:
    """Minimal IReadDescriptor on fd 0: no StandardIO, which would make stdout non-blocking."""

    def __init__(self, reactor: Any, d: Deferred[str], fd: int = 0) -> None:
        self._reactor = reactor
        self._d = d
        self._fd = fd
        self._buffer = b""

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "stdin"

    def doRead(self) -> None:
        data = os.read(self._fd, 65536)
        if not data:
            self._reactor.removeReader(self)
            last = self._buffer.decode("utf-8", "replace").strip()
            if last and not self._d.called:
                self._d.callback(last)  # a last line without its newline
            elif not self._d.called:
                self._d.errback(
                    AuthorizationFailed(
                        "standard input closed before a redirect address was pasted; "
                        "nothing was stored"
                    )
                )
            return None
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            text = line.decode("utf-8", "replace").strip()
            if text and not self._d.called:
                self._d.callback(text)
        return None

    def connectionLost(self, reason: Any) -> None:
        pass


def _describe_authorized(result: dict[str, Any]) -> str:
    refresh = "with a refresh token" if result["refresh_token"] else "no refresh token"
    minutes = round(result["expires_in"] / 60)
    return (
        f"Authorised: tokens for account {result['account']} stored ({refresh}; access "
        f"token valid for {minutes} min). A running gateway uses them from its next login."
    )
