"""What each console page shows, read from the objects that own the state.

Nothing here keeps state of its own: listeners from their `ListenerWatch`,
logins from the metrics' `DeviceLogins` and `LoginWindow` (fed by the admin
log observer), the queue from the running spool's index, token state from
the token store through `gateway.oauth.admin.status_report` (what `gateway
oauth status` prints). Every value is plain data for a template, and no
secret (password, hash, token, client secret) is ever put in one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from gateway.admin.listeners import ListenerWatch
from gateway.admin.metrics import GatewayMetrics
from gateway.model import Config
from gateway.oauth.admin import status_report
from gateway.oauth.refusal import KINDS_BY_NAME
from gateway.smtp.spool_store import QueueEntry
from gateway.smtp.spool_store import SpoolStore as Spool
from gateway.units import short_duration

# Token states (as `gateway oauth status` names them) that need the admin.
NEEDS_ADMIN = frozenset({"not_authorized", "needs_reauth", "failed", "revoked", "unreadable"})


def when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def overview(
    config: Config,
    watches: Iterable[ListenerWatch],
    metrics: GatewayMetrics,
    spool: Spool | None,
    now: float,
    environ: Mapping[str, str] = os.environ,
) -> dict[str, Any]:
    """The token states come from the store on disk, like the Accounts page's
    and `gateway oauth status`'s: the token manager's memory learns of a
    sign-in only when it next uses the account."""
    tokens, store_error = token_report(config, now, environ)
    listeners = [
        {"name": w.name, "protocol": w.protocol, "bound": w.bound, "active": w.active()}
        for w in watches
    ]
    logins = metrics.recent_logins.counts(now)
    return {
        "listeners": listeners,
        "sessions_open": sum(each["active"] for each in listeners),
        "logins": sorted(logins.items(), key=lambda item: (item[0] != "success", item[0])),
        "spool": spool_summary(spool, now),
        "attention": [
            {
                "account": name,
                "state": entry["state"],
                "advice": entry.get("error_advice") or "",
            }
            for name, entry in sorted(tokens.items())
            if entry["state"] in NEEDS_ADMIN
        ],
        "store_error": store_error,
        "devices": len(config.devices),
        "accounts": len(config.accounts),
    }


def spool_summary(spool: Spool | None, now: float) -> dict[str, Any] | None:
    if spool is None:
        return None
    queued = [e for e in spool.entries.values() if e.status == "queued"]
    oldest = min((e.envelope.received for e in queued), default=None)
    return {
        "queued": len(queued),
        "dead": len(spool.entries) - len(queued),
        "oldest": when(oldest),
        "oldest_age": short_duration(now - oldest) if oldest is not None else None,
    }


def devices(config: Config, metrics: GatewayMetrics) -> list[dict[str, Any]]:
    rows = []
    for name in sorted(config.devices):
        device = config.devices[name]
        seen = metrics.device_logins.get(name)
        last = seen.last_attempt if seen is not None else None
        rows.append(
            {
                "name": name,
                "account": device.account,
                "protocols": sorted(device.protocols),
                "allow_from": [str(n) for n in device.allow_from],
                "relay_without_auth": device.relay_without_auth,
                "last_success": when(seen.last_success) if seen else "-",
                "last": _attempt(last) if last is not None else None,
                "refusals": [_attempt(a) for a in reversed(seen.refusals)] if seen else [],
            }
        )
    return rows


def _attempt(attempt: Any) -> dict[str, Any]:
    return {
        "when": when(attempt.when),
        "peer": attempt.peer,
        "protocol": attempt.protocol,
        "outcome": attempt.outcome,
        "tls_version": attempt.tls_version,
        "tls_cipher": attempt.tls_cipher,
        "session": attempt.session,
    }


def accounts(
    config: Config,
    now: float,
    checks: Mapping[str, Any],
    flows: Callable[[str], Any],
    environ: Mapping[str, str] = os.environ,
) -> list[dict[str, Any]]:
    """Each account; OAuth2 ones with their token state as `gateway oauth
    status` reads it (the store on disk, so a CLI change shows at once)."""
    tokens, store_error = token_report(config, now, environ)
    rows = []
    for name in sorted(config.accounts):
        account = config.accounts[name]
        token = tokens.get(name)
        if token is not None and token.get("error_kind"):
            kind = KINDS_BY_NAME.get(token["error_kind"])
            token = {**token, "error_label": kind.label if kind is not None else None}
        provider = config.providers.get(account.provider)
        if account.mailbox == "pop3" and provider is not None and provider.pop3 is None:
            folder = "none (sending only)"
        elif account.mailbox == "pop3":
            folder = "POP3 maildrop"
        else:
            folder = (
                f"{account.mailbox.upper()} folder {account.folder} (on delete: {account.on_delete}"
            )
            folder += f" to {account.move_to})" if account.move_to else ")"
        rows.append(
            {
                "name": name,
                "provider": account.provider,
                "username": account.username,
                "auth": account.auth,
                "grant": account.grant,
                "folder": folder,
                "token": token,
                "store_error": store_error if account.auth == "oauth2" else None,
                "check": checks.get(name),
                "flow": flows(name),
            }
        )
    return rows


def token_report(
    config: Config, now: float, environ: Mapping[str, str]
) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Each OAuth2 account's `gateway oauth status` document, or the reason
    the store cannot be read (shown rather than failing the page)."""
    try:
        report = status_report(config, now=now, environ=environ)
    except Exception as e:
        return {}, str(e)
    return {entry["account"]: entry for entry in report}, None


def queue(entries: Iterable[QueueEntry] | None, now: float) -> list[dict[str, Any]]:
    """`entries`: the spool's `listing()` (every node's, on PostgreSQL)."""
    if entries is None:
        return []
    rows = []
    for entry in sorted(entries, key=lambda e: e.id):
        env, state = entry.envelope, entry.state
        rows.append(
            {
                "id": entry.id,
                "status": entry.status,
                "account": env.account,
                "device": env.device if env.identified_by != "bounce" else "(bounce)",
                "sender": env.original_sender,
                "recipients": entry.pending or list(env.recipients),
                "size": env.size,
                "received": when(env.received),
                "age": short_duration(now - env.received),
                "attempts": state.attempts,
                "next_try": (
                    ("now" if state.next_attempt <= now else when(state.next_attempt))
                    if entry.status == "queued"
                    else "-"
                ),
                "last_error": state.last_error or "",
                "dead_reason": state.dead_reason or "",
            }
        )
    return rows
