"""`[providers.NAME]`: upstream endpoints, trust roots, presets and the OAuth2 client."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlsplit

from gateway.config.listeners import default_port
from gateway.config.reader import REQUIRED, TOKEN, Table
from gateway.config.secrets import check_secret_file, read_secret_file
from gateway.model import (
    POP3_AUTH_CHOICES,
    SASL_CHOICES,
    TLS_MODES,
    UPSTREAM_PROTOCOLS,
    Endpoint,
    OAuthClient,
    Provider,
    Secret,
    UpstreamProtocol,
    field_default,
)
from gateway.oauth.presets import NEEDS_TENANT, PRESETS, Preset
from gateway.tls import TLSSetupError, load_trust_root


def provider(name: str, table: Table) -> Provider | None:
    mark = table.reader.mark()
    preset = _preset(table)
    present = [protocol for protocol in UPSTREAM_PROTOCOLS if table.has(protocol)]
    graph_url = _url(table, "graph_url", required=False)  # graph
    if not present and preset is None and graph_url is None and table.reader.clean_since(mark):
        table.problem(None, "needs at least one endpoint: pop3, imap or smtp (or a preset)")
    endpoints = {protocol: _endpoint(table.table(protocol), protocol) for protocol in present}
    if preset is not None:
        for protocol in UPSTREAM_PROTOCOLS:
            endpoints.setdefault(protocol, getattr(preset, protocol))
    oauth = _oauth_client(table.table("oauth"), table.has("oauth")) or (
        preset.oauth if preset is not None else None
    )
    ca_file = table.existing_file("ca_file", None)
    if ca_file is not None:
        try:
            load_trust_root(ca_file)
        except TLSSetupError as e:
            table.problem("ca_file", str(e).partition(": ")[2] or str(e))
    timeout = table.seconds("timeout", field_default(Provider, "timeout"))
    pop3_auth = table.choice("pop3_auth", POP3_AUTH_CHOICES, field_default(Provider, "pop3_auth"))
    sasl = table.choice("sasl", SASL_CHOICES, field_default(Provider, "sasl"))
    if not table.reader.clean_since(mark) or timeout is None or pop3_auth is None or sasl is None:
        return None
    preset_name = table.data.get("preset")
    return Provider(
        name=name,
        pop3=endpoints.get("pop3"),
        imap=endpoints.get("imap"),
        smtp=endpoints.get("smtp"),
        ca_file=ca_file,
        timeout=timeout,
        pop3_auth=pop3_auth,
        preset=preset_name if isinstance(preset_name, str) else None,
        oauth=oauth,
        sasl=sasl,
        # graph: an explicit graph_url wins over the default (and a preset's, once presets set one)
        **({"graph_url": graph_url} if graph_url is not None else {}),
    )


def _preset(table: Table) -> Preset | None:
    """The built-in provider named by `preset`, with the app registration in
    `client_id` / `client_secret_file` (and `tenant` for Microsoft 365)."""
    name = table.choice("preset", tuple(PRESETS), None)
    tenant = table.string("tenant", None)
    client_id = table.string("client_id", None)
    secret_file = table.existing_file("client_secret_file", None)
    if name is None:
        for key in ("tenant", "client_id", "client_secret_file"):
            if table.has(key) and not table.has("preset"):
                table.problem(key, "only used with a preset; put it in the oauth table instead")
        return None
    if name in NEEDS_TENANT and tenant is None and not table.has("tenant"):
        table.problem("tenant", f"required with preset {name!r} (e.g. contoso.onmicrosoft.com)")
    if client_id is None and not table.has("client_id"):
        table.problem("client_id", f"required with preset {name!r}: the app registration's id")
    secret = _client_secret(table, secret_file)
    if client_id is None or (name in NEEDS_TENANT and tenant is None):
        return None
    return PRESETS[name](tenant, client_id, secret)


def _client_secret(table: Table, path: Path | None) -> Secret | None:
    if path is None:
        return None
    check_secret_file(table, "client_secret_file", path)
    return read_secret_file(table, "client_secret_file", path)


def _oauth_client(table: Table, present: bool) -> OAuthClient | None:
    if not present or not table.valid:
        return None
    mark = table.reader.mark()
    token_url = _url(table, "token_url", required=True)
    device_authorization_url = _url(table, "device_authorization_url", required=False)
    authorization_url = _url(table, "authorization_url", required=False)
    client_id = table.string("client_id")
    secret_file = table.existing_file("client_secret_file", None)
    secret = _client_secret(table, secret_file)
    scopes = tuple(text for _, text in table.strings("scopes"))
    app_scopes = tuple(text for _, text in table.strings("app_scopes"))
    table.finish()
    if not table.reader.clean_since(mark) or token_url is None or client_id is None:
        return None
    return OAuthClient(
        token_url=token_url,
        client_id=client_id,
        device_authorization_url=device_authorization_url,
        authorization_url=authorization_url,
        client_secret=secret,
        scopes=scopes,
        app_scopes=app_scopes,
    )


def _url(table: Table, key: str, *, required: bool) -> str | None:
    """An https URL; plain http only to a loopback address (a test server)."""
    value = table.string(key, REQUIRED if required else None)
    if value is None:
        return None
    parts = urlsplit(value)
    loopback = parts.hostname in ("localhost",) or _is_loopback(parts.hostname or "")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        table.problem(key, f"{value!r} must be an https:// URL (http only on loopback)")
        return None
    if not parts.hostname:
        table.problem(key, f"{value!r} has no host name")
        return None
    return value


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _endpoint(table: Table, protocol: UpstreamProtocol) -> Endpoint | None:
    if not table.valid:
        return None
    mark = table.reader.mark()
    host = table.string("host")
    if host is not None and not TOKEN.fullmatch(host):
        table.problem("host", f"{host!r} is not a host name")
    tls = table.choice("tls", TLS_MODES, field_default(Endpoint, "tls"))
    port = table.integer("port", default_port(protocol, tls), low=1, high=65535)
    table.finish()
    if not table.reader.clean_since(mark) or host is None or tls is None or port is None:
        return None
    return Endpoint(host=host, port=port, tls=tls)
