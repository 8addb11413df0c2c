"""Tokens from the test authorization server (a real process), stored in a
gateway's state directory the way `gateway oauth authorize` stores them: the
integration tests start a gateway with accounts already authorized, without
driving the CLI's interactive sign-in each time."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from gateway.model import OAuthSettings
from gateway.oauth.keys import load_key
from gateway.oauth.store import TokenRecord, TokenStore
from gateway.oauth.tokens import parse_token_response
from tests.harness.oauth_server import DEVICE_GRANT, OAuthServerProcess

MAIL_SCOPES = "mail offline_access"


def post_form(url: str, fields: dict[str, str]) -> dict[str, Any]:
    data = urllib.parse.urlencode(fields).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as r:
        answer: dict[str, Any] = json.loads(r.read())
        return answer


def device_grant_tokens(
    idp: OAuthServerProcess, client_secret: str, username: str = "alice", scope: str = MAIL_SCOPES
) -> dict[str, Any]:
    """What a completed device grant returns (as if `username` had signed in)."""
    client = {"client_id": "gateway", "client_secret": client_secret}
    start = post_form(f"{idp.url}/device", {**client, "scope": scope})
    idp.control("approve", user_code=start["user_code"], username=username)
    return post_form(
        f"{idp.url}/token",
        {**client, "grant_type": DEVICE_GRANT, "device_code": start["device_code"]},
    )


def store_for(state: Path) -> TokenStore:
    """The token store of a gateway whose key is in its state directory."""
    return TokenStore.open(state, load_key(OAuthSettings(), state, environ={}))


def store_device_grant(
    state: Path,
    idp: OAuthServerProcess,
    account: str,
    client_secret: str,
    username: str = "alice",
    scope: str = MAIL_SCOPES,
) -> TokenRecord:
    """Tokens for `account` (signed in as `username`), stored in `state`."""
    answer = device_grant_tokens(idp, client_secret, username, scope)
    now = time.time()
    record = TokenRecord.authorized(account, "device_code", parse_token_response(answer, now), now)
    store_for(state).update(account, lambda _: record, replace_unreadable=True)
    return record
