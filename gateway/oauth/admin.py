"""The OAuth2 account operations behind `gateway oauth`: authorise, report, revoke.

Each is a plain function over a loaded `Config` with its clock, HTTP client
and input injected, so tests drive the real flows in-process against the test
authorization server, and any front end (the `gateway` command today) can
call them; `gateway.cli.oauth` wires them to argparse and a reactor.

Run them as the user the gateway runs as: the token files are created 0600
for whoever writes them. With ``[state] backend = "postgresql"`` they work on
the shared `gateway_oauth_tokens` table instead (`open_store`), through a
blocking connection: the store's Deferreds have fired when they are returned,
which is what lets the plain functions here read their results at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from gateway.model import APP_ONLY_GRANTS, Account, Config
from gateway.oauth.backend import TokenBackend, open_command_backend
from gateway.oauth.code_flow import LoopbackListener, run_code_flow
from gateway.oauth.device_flow import run_device_flow
from gateway.oauth.endpoint import DeviceAuthorization, TokenEndpoint
from gateway.oauth.errors import OAuthError
from gateway.oauth.http import FormPoster
from gateway.oauth.keys import KEY_ENV, GatewayKeyError, key_path, load_key
from gateway.oauth.record import StoreUnreadable, TokenRecord, TokenStoreError
from gateway.oauth.refusal import KINDS_BY_NAME
from gateway.oauth.tokens import Tokens

T = TypeVar("T")

GRANT_NAMES = {
    "device_code": "device code grant",
    "authorization_code": "authorization code grant with PKCE",
    "client_credentials": "client credentials grant (app-only)",
    "service_account": "JWT bearer grant of the service account (app-only)",
}


class CommandFailed(Exception):
    """What the admin is told, on one line, before exit status 1."""


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


def fired(d: Deferred[T]) -> T:
    """The result of a store Deferred that has fired (the command's stores
    answer at once); its exception if it failed."""
    results: list[T | Failure] = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError("the token store did not answer at once")
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    assert not isinstance(result, Failure)
    return result


def open_store(
    config: Config, *, create_key: bool, environ: Mapping[str, str] = os.environ
) -> TokenBackend | None:
    """The token store of the configured state backend (blocking calls), or
    None if no key exists yet and `create_key` is False."""
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
        return open_command_backend(config, key)
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
    grant = account.grant or provider.default_grant
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
    elif grant == "service_account":
        tokens = await endpoint.service_account(account.username)
    else:
        tokens = await endpoint.client_credentials()
    now = clock.seconds()
    record = TokenRecord.authorized(name, grant, tokens, now)
    await store.change(name, lambda _current: record, replace_unreadable=True)
    return {
        "account": name,
        "grant": grant,
        "state": "ok",
        "expires_at": _iso(tokens.expires_at),
        "expires_in": round(tokens.expires_at - now),
        "refresh_token": tokens.refresh_token is not None,
        "scope": tokens.scope,
        "store": store.describe(name),
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
                record = fired(store.fetch(account.name))
            except StoreUnreadable as e:
                unreadable = e.reason
        report.append(_account_status(account, _grant(config, account), record, unreadable, now))
    return report


def _grant(config: Config, account: Account) -> str:
    provider = config.providers.get(account.provider)
    return account.grant or (provider.default_grant if provider else "device_code")


def _account_status(
    account: Account, grant: str, record: TokenRecord | None, unreadable: str | None, now: float
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "account": account.name,
        "provider": account.provider,
        "username": account.username,
        "grant": grant,
    }
    if unreadable is not None:
        return {**document, "state": "unreadable", "last_error": unreadable}
    if record is None:
        return {**document, "state": "app_only" if grant in APP_ONLY_GRANTS else "not_authorized"}
    tokens = record.tokens
    document.update(
        state=record.state,
        authorized_at=_iso(record.authorized_at),
        last_refresh=_iso(record.last_refresh),
        last_error=record.last_error,
        last_error_at=_iso(record.last_error_at),
        # The classified refusal: kind, the provider's code, what to do.
        error_kind=record.error_kind,
        error_code=record.error_code,
        error_advice=record.error_advice,
        # "login": a mail server refused a login with a valid token (cleared
        # by the next successful login); "token": the token endpoint refused.
        error_source=("login" if record.error_from_login else "token")
        if record.error_code
        else None,
        expires_at=_iso(tokens.expires_at) if tokens else None,
        access_token_valid=bool(tokens and tokens.valid_at(now)),
        refresh_token=bool(tokens and tokens.refresh_token),
    )
    if record.graph_tokens is not None:
        document.update(
            graph_expires_at=_iso(record.graph_tokens.expires_at),
            graph_token_valid=record.graph_tokens.valid_at(now),
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
        if state == "app_only":
            lines.append("  no token yet: the gateway fetches one at the first login")
            lines.append(
                f"  (`gateway oauth authorize {name}` fetches one now, to check the set-up)"
            )
            continue
        if state == "unreadable":
            lines.append(f"  token file unreadable: {entry['last_error']}")
            lines.append(f"  supply the right key, or run `gateway oauth authorize {name}`")
            continue
        if entry.get("expires_at"):
            validity = "valid" if entry["access_token_valid"] else "expired"
            lines.append(f"  access token {validity} until {entry['expires_at']}")
        if entry.get("graph_expires_at"):
            validity = "valid" if entry["graph_token_valid"] else "expired"
            lines.append(f"  Graph token {validity} until {entry['graph_expires_at']}")
        if entry.get("last_refresh"):
            lines.append(f"  last refresh {entry['last_refresh']}")
        if entry.get("last_error"):
            lines.append(f"  last error {entry['last_error_at']}: {entry['last_error']}")
        if entry.get("error_code"):
            kind = KINDS_BY_NAME.get(entry.get("error_kind") or "")
            label = f" ({kind.label})" if kind is not None else ""
            who = "provider code"
            if entry.get("error_source") == "login":
                who = "login refused by the mail server: code"
            lines.append(f"  {who} {entry['error_code']}{label}")
        if entry.get("error_advice"):
            lines.append(f"  what to do: {entry['error_advice']}")
        elif state in ("needs_reauth", "revoked"):
            lines.append(f"  run `gateway oauth authorize {name}`")
    return lines


def revoke_account(
    config: Config, name: str, *, now: float, environ: Mapping[str, str] = os.environ
) -> dict[str, Any]:
    store = open_store(config, create_key=True, environ=environ)
    assert store is not None
    return fired(ensureDeferred(forget_tokens(config, name, store, now=now)))


async def forget_tokens(
    config: Config, name: str, store: TokenBackend, *, now: float
) -> dict[str, Any]:
    """Mark the account's tokens revoked in `store` (the gateway stops using them)."""
    account = oauth_account(config, name)

    def revoke(current: TokenRecord | None) -> TokenRecord:
        if current is None:
            current = TokenRecord(name, _grant(config, account), "none")
        return current.revoked(now)

    try:
        await store.change(name, revoke, replace_unreadable=True)
    except (StoreUnreadable, TokenStoreError) as e:
        raise CommandFailed(str(e)) from None
    return {"account": name, "state": "revoked"}


def has_revocation(config: Config, name: str) -> bool:
    """Whether the account's provider has a revocation endpoint to call."""
    account = oauth_account(config, name)
    provider = config.providers[account.provider]
    return provider.oauth is not None and provider.oauth.revocation_url is not None


async def revoke_at_provider(
    config: Config,
    name: str,
    *,
    poster: FormPoster,
    clock: IReactorTime,
    environ: Mapping[str, str] = os.environ,
    store: TokenBackend | None = None,
) -> str:
    """Ask the provider to revoke the account's grant (RFC 7009), before the
    tokens are forgotten here. Returns what happened, for the admin:
    "revoked", "no_endpoint" (Microsoft has none for refresh tokens),
    "no_tokens", or "failed: <reason>". Never raises for the provider's
    answer: forgetting the tokens locally must happen all the same."""
    account = oauth_account(config, name)
    provider = config.providers[account.provider]
    if provider.oauth is None or provider.oauth.revocation_url is None:
        return "no_endpoint"
    if store is None:
        store = open_store(config, create_key=False, environ=environ)
    try:
        record = await store.fetch(name) if store is not None else None
    except StoreUnreadable:
        record = None
    tokens = record.tokens if record is not None else None
    if tokens is None:
        return "no_tokens"
    # Revoking the refresh token ends the whole grant at Google.
    token, hint = (
        (tokens.refresh_token, "refresh_token")
        if tokens.refresh_token is not None
        else (tokens.access_token, "access_token")
    )
    try:
        await TokenEndpoint(provider, poster, clock).revoke(token, hint)
    except OAuthError as e:
        return f"failed: {e}"
    return "revoked"


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
