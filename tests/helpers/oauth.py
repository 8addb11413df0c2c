"""Configurations and seeded token stores for the OAuth2 tests, built in code."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.model import (
    Account,
    Config,
    Endpoint,
    Grant,
    OAuthClient,
    OAuthSettings,
    Provider,
    Secret,
    ServiceAccountKey,
)
from gateway.oauth.keys import GatewayKey, new_key
from gateway.oauth.presets import PRESETS, PresetOptions
from gateway.oauth.store import TokenRecord, TokenStore
from gateway.oauth.tokens import parse_token_response
from tests.harness.oauth_server import AuthServer

CLIENT_SECRET = "s3cret-client"


def oauth_client(base_url: str, *, secret: str | None = CLIENT_SECRET) -> OAuthClient:
    return OAuthClient(
        token_url=f"{base_url}/token",
        client_id="gateway",
        device_authorization_url=f"{base_url}/device",
        authorization_url=f"{base_url}/authorize",
        client_secret=Secret(secret) if secret else None,
        scopes=("mail", "offline_access"),
        app_scopes=("mail/.default",),
    )


def oauth_config(
    state_dir: Path,
    base_url: str = "http://127.0.0.1:9",
    *,
    grant: Grant = "device_code",
    accounts: tuple[str, ...] = ("scanner",),
    margin: float = 300.0,
    idle: float = 3 * 24 * 3600.0,
    sasl: Any = "auto",
    pop3: Endpoint | None = None,
    ca_file: Path | None = None,
    secret: str | None = CLIENT_SECRET,
    key_file: Path | None = None,
) -> Config:
    provider = Provider(
        name="idp",
        pop3=pop3 or Endpoint("localhost", 995, "implicit"),
        oauth=oauth_client(base_url, secret=secret),
        sasl=sasl,
        ca_file=ca_file,
    )
    return Config(
        state_dir=state_dir,
        tls=None,
        oauth=OAuthSettings(key_file=key_file, refresh_margin=margin, idle_refresh_interval=idle),
        providers={"idp": provider},
        accounts={
            name: Account(name=name, provider="idp", username="alice", auth="oauth2", grant=grant)
            for name in accounts
        },
    )


def fresh_key() -> GatewayKey:
    return GatewayKey(new_key(), "test")


def seed(
    store: TokenStore,
    server: AuthServer,
    now: float,
    account: str = "scanner",
    *,
    username: str = "alice",
    grant: str = "device_code",
) -> TokenRecord:
    """Tokens issued by `server` for `username`, stored as an admin's authorisation would."""
    refresh = grant != "client_credentials"
    answer = server._issue(username, server.client_id, "mail", refresh=refresh)
    record = TokenRecord.authorized(account, grant, parse_token_response(answer, now), now)
    store.update(account, lambda _current: record, replace_unreadable=True)
    return record


def _moved(url: str | None, base_url: str) -> str | None:
    """A provider's URL with its path kept, under the test server."""
    return None if url is None else base_url + urlsplit(url).path


def preset_provider(
    preset: str,
    base_url: str,
    *,
    secret: str | None = None,
    tenant: str | None = "contoso.onmicrosoft.com",
    client_type: Any = "auto",
    service_account: ServiceAccountKey | None = None,
    pop3: Endpoint | None = None,
    ca_file: Path | None = None,
) -> Provider:
    """A preset exactly as the loader builds it, its OAuth2 endpoints moved
    (paths kept) to the test authorization server at `base_url`."""
    built = PRESETS[preset](
        PresetOptions(
            client_id="gateway",
            client_secret=Secret(secret) if secret else None,
            tenant=tenant if preset == "microsoft365" else None,
            client_type=client_type,
            service_account=service_account,
        )
    )
    oauth = built.oauth
    moved = replace(
        oauth,
        token_url=base_url + urlsplit(oauth.token_url).path,
        device_authorization_url=_moved(oauth.device_authorization_url, base_url),
        authorization_url=_moved(oauth.authorization_url, base_url),
        revocation_url=_moved(oauth.revocation_url, base_url),
    )
    return Provider(
        name=preset,
        pop3=pop3 or built.pop3,
        imap=built.imap,
        smtp=built.smtp,
        ca_file=ca_file,
        preset=preset,
        oauth=moved,
        sasl=built.sasl,
        tenant=built.tenant,
        cloud=built.cloud,
        graph_url=built.graph_url,
        default_grant=built.default_grant,
    )


def preset_config(
    state_dir: Path,
    provider: Provider,
    *,
    grant: Grant | None = None,
    username: str = "alice",
    margin: float = 300.0,
) -> Config:
    """One account, "scanner", at `provider` (its default grant unless given)."""
    return Config(
        state_dir=state_dir,
        tls=None,
        oauth=OAuthSettings(refresh_margin=margin),
        providers={provider.name: provider},
        accounts={
            "scanner": Account(
                name="scanner",
                provider=provider.name,
                username=username,
                auth="oauth2",
                grant=grant or provider.default_grant,
            )
        },
    )
