"""`gateway oauth ...`: onboard OAuth2 accounts and look after their tokens.

- ``gateway oauth authorize ACCOUNT``: runs the account's grant (device code by
  default, authorization code with PKCE, or client credentials) and stores the
  tokens, encrypted, in the gateway's state directory. A running gateway picks
  them up by itself (it notices the file change); no restart.
- ``gateway oauth status [ACCOUNT...]``: per account, its state, token expiry,
  last refresh and last error, as the running gateway last recorded them.
- ``gateway oauth revoke ACCOUNT``: forgets the account's tokens; devices get
  "not authorised" until the next `authorize`.
- ``gateway oauth new-key``: prints a fresh gateway key, for GATEWAY_KEY.

Run these as the user the gateway runs as (``sudo -u gateway ...``): the token
files are created 0600 for whoever writes them.

Each command is a plain function over a loaded `Config` with its clock,
HTTP client and input injected (`authorize_account`, `status_report`,
`revoke_account`), so tests drive the real flows in-process against the test
authorization server; `register` wires them to argparse and a reactor.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import IO, TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from gateway.model import Account, Config
from gateway.oauth.code_flow import LoopbackListener, run_code_flow
from gateway.oauth.device_flow import run_device_flow
from gateway.oauth.endpoint import DeviceAuthorization, NoOAuthClient, TokenEndpoint
from gateway.oauth.errors import OAuthError
from gateway.oauth.http import FormPoster, TreqPoster
from gateway.oauth.keys import KEY_ENV, GatewayKeyError, encode_key, key_path, load_key, new_key
from gateway.oauth.store import StoreUnreadable, TokenRecord, TokenStore, TokenStoreError
from gateway.oauth.tokens import Tokens
from gateway.state import StateError

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]

GRANT_NAMES = {
    "device_code": "device code grant",
    "authorization_code": "authorization code grant with PKCE",
    "client_credentials": "client credentials grant (app-only)",
}


class CommandFailed(Exception):
    """What the admin is told, on one line, before exit status 1."""


# -- argparse wiring ---------------------------------------------------------------


def register(commands: Commands) -> None:
    """Add `gateway oauth` and its subcommands to the admin command."""
    from gateway import cli as base

    oauth = base._add_command(
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
    authorize = base._add_command(
        sub,
        "authorize",
        _run_authorize,
        "obtain and store tokens for an account (its configured grant)",
        "Run the account's grant and store its tokens, encrypted, under the state "
        "directory. Device code: prints a URL and a code to enter in any browser. "
        "Authorization code: prints a URL; the redirect is caught on localhost or "
        "pasted back here. Client credentials: fetches an app-only token to check "
        "the setup. A running gateway uses the new tokens without a restart.",
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
        "(default http://localhost:PORT/)",
    )
    authorize.add_argument(
        "--no-listen",
        action="store_true",
        help="authorization code: do not listen on localhost; only accept a pasted URL",
    )
    status = base._add_command(
        sub,
        "status",
        _run_status,
        "show each OAuth2 account's token state",
        "Per account: state, access token expiry, last refresh and last error.",
    )
    status.add_argument("accounts", nargs="*", metavar="ACCOUNT")
    revoke = base._add_command(
        sub,
        "revoke",
        _run_revoke,
        "forget an account's tokens",
        "Delete the account's tokens from the gateway's store. Devices of the "
        "account are refused until it is authorised again. Consent given at the "
        "provider is not withdrawn; do that in the provider's portal.",
    )
    revoke.add_argument("account", metavar="ACCOUNT")
    base._add_command(
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


def _load(args: argparse.Namespace, command: str) -> Config | None:
    from gateway import cli as base
    from gateway.config import ConfigError, load_config

    location = base.config_location(args)
    try:
        return load_config(location.path)
    except ConfigError as e:
        base._report_problems(location, e, as_json=args.json)
        return None


def _run_authorize(args: argparse.Namespace) -> int:
    config = _load(args, "oauth authorize")
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
    except (CommandFailed, OAuthError, StateError, NoOAuthClient) as e:
        return _fail("oauth authorize", str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    _print_result(args, result, _describe_authorized(result))
    return 0


def _run_status(args: argparse.Namespace) -> int:
    config = _load(args, "oauth status")
    if config is None:
        return 1
    try:
        report = status_report(config, args.accounts, now=time.time())
    except (CommandFailed, StateError) as e:
        return _fail("oauth status", str(e))
    if args.json:
        from gateway.cli import _emit_json

        _emit_json({"accounts": report})
    else:
        for line in format_status(report):
            print(line)
    return 0


def _run_revoke(args: argparse.Namespace) -> int:
    config = _load(args, "oauth revoke")
    if config is None:
        return 1
    try:
        result = revoke_account(config, args.account, now=time.time())
    except (CommandFailed, StateError) as e:
        return _fail("oauth revoke", str(e))
    _print_result(
        args,
        result,
        f"account {args.account}: tokens deleted from the gateway; its devices are refused "
        f"until `gateway oauth authorize {args.account}`. Withdraw the consent at the "
        "provider too if the gateway should lose access there.",
    )
    return 0


def _run_new_key(args: argparse.Namespace) -> int:
    key = encode_key(new_key())
    _print_result(args, {"key": key}, key)
    return 0


def _print_result(args: argparse.Namespace, document: dict[str, Any], text: str) -> None:
    if args.json:
        from gateway.cli import _emit_json

        _emit_json(document)
    else:
        print(text)


def _fail(command: str, message: str) -> int:
    print(f"gateway {command}: {message}", file=sys.stderr)
    return 1


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
            reactor.stop()  # type: ignore[attr-defined]

        d.addBoth(finish)

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if not outcome:
        raise KeyboardInterrupt
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def stdin_line(reactor: Any) -> Deferred[str]:
    """The first non-empty line typed or pasted on standard input, read on the reactor."""
    d: Deferred[str] = Deferred()
    reader = _LineReader(reactor, d)
    reactor.addReader(reader)

    def stop(result: Any) -> Any:
        reactor.removeReader(reader)
        return result

    d.addBoth(stop)
    return d


class _LineReader:
    """Minimal IReadDescriptor on fd 0: no StandardIO, which would make stdout non-blocking."""

    def __init__(self, reactor: Any, d: Deferred[str]) -> None:
        self._reactor = reactor
        self._d = d
        self._buffer = b""

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "stdin"

    def doRead(self) -> None:
        data = os.read(0, 65536)
        if not data:
            self._reactor.removeReader(self)
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


# -- the commands, testable -------------------------------------------------------


def oauth_account(config: Config, name: str) -> Account:
    account = config.accounts.get(name)
    if account is None:
        known = sorted(a.name for a in config.accounts.values() if a.auth == "oauth2")
        raise CommandFailed(
            f"no account {name!r} in the configuration"
            + (f" (OAuth2 accounts: {', '.join(known)})" if known else "")
        )
    if account.auth != "oauth2":
        raise CommandFailed(f'account {name} does not use auth = "oauth2"')
    return account


def open_store(
    config: Config, *, create_key: bool, environ: Mapping[str, str] = os.environ
) -> TokenStore | None:
    """The token store, or None if no key exists yet and `create_key` is False."""
    try:
        key = load_key(config.oauth, config.state_dir, environ=environ, create=create_key)
    except GatewayKeyError:
        if (
            not create_key
            and KEY_ENV not in environ
            and not key_path(config.oauth, config.state_dir).exists()
        ):
            return None
        raise
    try:
        return TokenStore.open(config.state_dir, key)
    except PermissionError as e:
        raise CommandFailed(f"{e}; run this command as the user the gateway runs as") from None


async def authorize_account(
    config: Config,
    name: str,
    *,
    reactor: Any,
    clock: IReactorTime,
    poster: FormPoster,
    out: IO[str],
    paste: Callable[[], Deferred[str]] | None = None,
    listen: bool = True,
    port: int = 0,
    redirect_uri: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> dict[str, Any]:
    """Run `name`'s grant, store the tokens, return a summary (no secrets)."""
    account = oauth_account(config, name)
    provider = config.providers[account.provider]
    endpoint = TokenEndpoint(provider, poster, clock)
    # Open (and if need be create) the store first: a key problem should
    # show before the admin has gone through a sign-in.
    store = open_store(config, create_key=True, environ=environ)
    assert store is not None
    grant = account.grant or "device_code"
    print(
        f"Account {name} ({account.username}) at provider {provider.name}: {GRANT_NAMES[grant]}.",
        file=out,
        flush=True,
    )
    tokens: Tokens
    if grant == "device_code":
        tokens = await run_device_flow(
            endpoint,
            clock,
            lambda auth: _show_device_code(auth, account, clock, out),
            lambda text: print(f"  ({text})", file=out, flush=True),
        )
    elif grant == "authorization_code":
        tokens = await run_code_flow(
            endpoint,
            clock,
            login_hint=account.username,
            show=lambda url, redirect: _show_code_url(url, redirect, account, listen, out),
            pasted=paste() if paste is not None else None,
            listener=LoopbackListener(reactor, port) if listen else None,
            redirect_uri=redirect_uri,
        )
    else:
        tokens = await endpoint.client_credentials()
    now = clock.seconds()
    record = TokenRecord.authorized(name, grant, tokens, now)
    store.update(name, lambda _current: record, replace_unreadable=True)
    return {
        "account": name,
        "grant": grant,
        "state": "ok",
        "expires_at": _iso(tokens.expires_at),
        "expires_in": round(tokens.expires_at - now),
        "refresh_token": tokens.refresh_token is not None,
        "scope": tokens.scope,
        "store": str(store.path_for(name)),
    }


def _show_device_code(
    auth: DeviceAuthorization, account: Account, clock: IReactorTime, out: IO[str]
) -> None:
    minutes = max(1, round((auth.expires_at - clock.seconds()) / 60))
    print(f"To sign in, open  {auth.verification_uri}", file=out)
    print(f"and enter the code  {auth.user_code}", file=out)
    if auth.verification_uri_complete:
        print(f"(or open {auth.verification_uri_complete})", file=out)
    print(
        f"Sign in as {account.username}. Waiting; the code expires in {minutes} min...",
        file=out,
        flush=True,
    )


def _show_code_url(url: str, redirect: str, account: Account, listen: bool, out: IO[str]) -> None:
    print(f"Open this URL in a browser and sign in as {account.username}:", file=out)
    print(f"  {url}", file=out)
    if listen:
        print(
            f'The browser is then sent to {redirect}. If that page says "Signed in", you '
            "are done. If it does not load (browser on another machine), copy the whole "
            "address from the address bar, paste it here and press Enter:",
            file=out,
            flush=True,
        )
    else:
        print(
            f"The browser is then sent to {redirect}; copy the whole address from the "
            "address bar, paste it here and press Enter:",
            file=out,
            flush=True,
        )


def _describe_authorized(result: dict[str, Any]) -> str:
    refresh = "with a refresh token" if result["refresh_token"] else "no refresh token"
    minutes = round(result["expires_in"] / 60)
    return (
        f"Authorised: tokens for account {result['account']} stored ({refresh}; access "
        f"token valid for {minutes} min). A running gateway uses them from its next login."
    )


def status_report(
    config: Config,
    names: list[str] | None = None,
    *,
    now: float,
    environ: Mapping[str, str] = os.environ,
) -> list[dict[str, Any]]:
    """One document per OAuth2 account (all, or `names`), as `oauth status` shows it."""
    accounts = (
        [oauth_account(config, n) for n in names]
        if names
        else [a for a in config.accounts.values() if a.auth == "oauth2"]
    )
    store = open_store(config, create_key=False, environ=environ)
    report = []
    for account in sorted(accounts, key=lambda a: a.name):
        record: TokenRecord | None = None
        unreadable: str | None = None
        if store is not None:
            try:
                record = store.load(account.name)
            except StoreUnreadable as e:
                unreadable = e.reason
        report.append(_account_status(account, record, unreadable, now))
    return report


def _account_status(
    account: Account, record: TokenRecord | None, unreadable: str | None, now: float
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "account": account.name,
        "provider": account.provider,
        "username": account.username,
        "grant": account.grant or "device_code",
    }
    if unreadable is not None:
        return {**document, "state": "unreadable", "last_error": unreadable}
    if record is None:
        return {**document, "state": "not_authorized"}
    tokens = record.tokens
    document.update(
        state=record.state,
        authorized_at=_iso(record.authorized_at),
        last_refresh=_iso(record.last_refresh),
        last_error=record.last_error,
        last_error_at=_iso(record.last_error_at),
        expires_at=_iso(tokens.expires_at) if tokens else None,
        access_token_valid=bool(tokens and tokens.valid_at(now)),
        refresh_token=bool(tokens and tokens.refresh_token),
    )
    return document


def format_status(report: list[dict[str, Any]]) -> list[str]:
    if not report:
        return ["no OAuth2 accounts in the configuration"]
    lines = []
    for entry in report:
        name, state = entry["account"], entry["state"]
        head = f"{name}: {state} ({entry['grant']}, {entry['username']} at {entry['provider']})"
        lines.append(head)
        if state == "not_authorized":
            lines.append(f"  no tokens yet: run `gateway oauth authorize {name}`")
            continue
        if state == "unreadable":
            lines.append(f"  token file unreadable: {entry['last_error']}")
            lines.append(f"  supply the right key, or run `gateway oauth authorize {name}`")
            continue
        if entry.get("expires_at"):
            validity = "valid" if entry["access_token_valid"] else "expired"
            lines.append(f"  access token {validity} until {entry['expires_at']}")
        if entry.get("last_refresh"):
            lines.append(f"  last refresh {entry['last_refresh']}")
        if entry.get("last_error"):
            lines.append(f"  last error {entry['last_error_at']}: {entry['last_error']}")
        if state in ("needs_reauth", "revoked"):
            lines.append(f"  run `gateway oauth authorize {name}`")
    return lines


def revoke_account(
    config: Config, name: str, *, now: float, environ: Mapping[str, str] = os.environ
) -> dict[str, Any]:
    account = oauth_account(config, name)
    store = open_store(config, create_key=True, environ=environ)
    assert store is not None

    def revoke(current: TokenRecord | None) -> TokenRecord:
        if current is None:
            current = TokenRecord(name, account.grant or "device_code", "none")
        return current.revoked(now)

    try:
        store.update(name, revoke, replace_unreadable=True)
    except (StoreUnreadable, TokenStoreError) as e:
        raise CommandFailed(str(e)) from None
    return {"account": name, "state": "revoked"}


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
