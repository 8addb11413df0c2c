"""`[accounts.NAME]`: one upstream identity, how it logs in, and its mailbox."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Final

from gateway.config.reader import Reader, Table, key_path
from gateway.config.secrets import check_secret_file, read_secret_file
from gateway.model import (
    ACCOUNT_AUTH_CHOICES,
    DELETE_POLICIES,
    GRANTS,
    MAILBOX_CHOICES,
    RELAY_CHOICES,
    Account,
    Grant,
    Provider,
    Secret,
    field_default,
)
from gateway.oauth.presets import grant_problem

_SENDER: Final = re.compile(r"(\*|[^@\s*]+)@[^@\s*]+\.?[^@\s*]*")


def account(name: str, table: Table, providers: set[str]) -> Account | None:
    mark = table.reader.mark()
    provider = table.string("provider")
    if provider is not None and provider not in providers:
        table.problem("provider", f"unknown provider {provider!r}")
    username = table.string("username")
    auth = table.choice("auth", ACCOUNT_AUTH_CHOICES, field_default(Account, "auth"))
    password = None
    grant: Grant | None = None
    if auth == "oauth2":
        # None: the provider's default grant, filled in by check_oauth_accounts.
        grant = table.choice("grant", GRANTS, None)
        for key in ("password", "password_file"):
            if table.has(key):
                table.problem(key, 'not used with auth = "oauth2": the gateway holds tokens')
    elif auth == "password":
        password = _password(table)
        if table.has("grant"):
            table.problem("grant", 'only used with auth = "oauth2"')
    else:
        # auth itself was wrong and reported; its dependants are not unknown keys.
        for key in ("password", "password_file", "grant"):
            table.has(key)
    mailbox = table.choice("mailbox", MAILBOX_CHOICES, field_default(Account, "mailbox"))
    folder = table.string("folder", field_default(Account, "folder"))
    on_delete = table.choice("on_delete", DELETE_POLICIES, field_default(Account, "on_delete"))
    move_to = table.string("move_to", None)
    if on_delete == "move" and move_to is None and not table.has("move_to"):
        if mailbox == "graph":
            # Graph's well-known name for Deleted Items, what Outlook's delete does.
            move_to = "deleteditems"
        else:
            table.problem("move_to", 'required with on_delete = "move": the folder to move to')
    if move_to is not None and on_delete != "move":
        table.problem("move_to", 'only used with on_delete = "move"')
    mark_seen = table.boolean("mark_seen", field_default(Account, "mark_seen"))
    keep_connection = table.boolean("keep_connection", field_default(Account, "keep_connection"))
    keep_idle = table.seconds("keep_idle", field_default(Account, "keep_idle"))
    senders = tuple(_senders(table))
    rewrite_sender = table.boolean("rewrite_sender", field_default(Account, "rewrite_sender"))
    rewrite_from_header = table.boolean(
        "rewrite_from_header", field_default(Account, "rewrite_from_header")
    )
    relay = table.choice("relay", RELAY_CHOICES, None)
    save_to_sent = table.boolean("save_to_sent", field_default(Account, "save_to_sent"))
    if save_to_sent is False:
        # api/user-sendmail: a MIME send "saves the message in the Sent Items
        # folder"; saveToSentItems exists only for JSON messages, and a draft's
        # send (api/message-send) saves it too.
        table.problem(
            "save_to_sent",
            "Microsoft Graph keeps a copy of every MIME message it sends in Sent Items; "
            "it cannot be turned off for relayed mail",
        )
    if relay == "graph" and auth != "oauth2":
        table.problem("relay", 'relay = "graph" needs auth = "oauth2"')
    if (
        not table.reader.clean_since(mark)
        or provider is None
        or username is None
        or auth is None
        or mailbox is None
        or folder is None
        or on_delete is None
        or mark_seen is None
        or keep_connection is None
        or keep_idle is None
        or rewrite_sender is None
        or rewrite_from_header is None
    ):
        return None
    return Account(
        name=name,
        provider=provider,
        username=username,
        password=password,
        auth=auth,
        grant=grant,
        mailbox=mailbox,
        folder=folder,
        on_delete=on_delete,
        move_to=move_to,
        mark_seen=mark_seen,
        keep_connection=keep_connection,
        keep_idle=keep_idle,
        allowed_senders=senders,
        rewrite_sender=rewrite_sender,
        rewrite_from_header=rewrite_from_header,
        relay=relay,
    )


def check_oauth_accounts(
    accounts: dict[str, Account], providers: dict[str, Provider], reader: Reader
) -> None:
    """An OAuth2 account needs its provider's OAuth client, with what its grant
    uses, and a grant the provider allows (`presets.grant_problem` says what
    to do instead). An account that names no grant gets its provider's
    default (Gmail: authorization_code; others: device_code) here, in
    `accounts`, so everything after the loader sees the grant in use."""
    for name, account in list(accounts.items()):
        provider = providers.get(account.provider)
        if account.auth != "oauth2" or provider is None:
            continue
        if account.grant is None:
            account = dataclasses.replace(account, grant=provider.default_grant)
            accounts[name] = account
        problem = grant_problem(account, provider)
        if problem is not None:
            reader.add(key_path(key_path("accounts", name), "provider"), problem)


def _senders(table: Table) -> Iterator[str]:
    for path, text in table.strings("allowed_senders"):
        if _SENDER.fullmatch(text):
            yield text.lower()
        else:
            table.reader.add(path, f"{text!r} is not an address or *@domain")


def _password(table: Table) -> Secret | None:
    inline = table.secret("password", None)
    path = table.existing_file("password_file", None)
    if table.has("password") == table.has("password_file"):
        table.problem(None, "needs exactly one of password or password_file")
        return None
    if inline is not None:
        table.reader.inline_secrets.append(table.at("password"))
        return Secret(inline)
    if path is None:
        return None
    check_secret_file(table, "password_file", path)
    return read_secret_file(table, "password_file", path)
