"""`[providers.NAME]`: upstream endpoints, trust roots, presets and the OAuth2 client."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from gateway.config.listeners import default_port
from gateway.config.reader import REQUIRED, TOKEN, Table
from gateway.config.secrets import check_secret_file, read_secret_file
from gateway.model import (
    CLIENT_TYPES,
    CLOUDS,
    POP3_AUTH_CHOICES,
    SASL_CHOICES,
    TLS_MODES,
    UPSTREAM_PROTOCOLS,
    Endpoint,
    OAuthClient,
    Provider,
    Secret,
    ServiceAccountKey,
    UpstreamProtocol,
    field_default,
)
from gateway.oauth.jwt_bearer import ServiceAccountKeyError, load_service_account
from gateway.oauth.presets import NEEDS_TENANT, PRESETS, Preset, PresetOptions
from gateway.tls import TLSSetupError, load_trust_root


def provider(name: str, table: Table) -> Provider | None:
    mark = table.reader.mark()
    preset = _preset(table)
    present = [protocol for protocol in UPSTREAM_PROTOCOLS if table.has(protocol)]
    # A provider with only graph_url is a Graph upstream: that is an endpoint too.
    graph_url = _url(table, "graph_url", required=False)
    if not present and preset is None and graph_url is None and table.reader.clean_since(mark):
        table.problem(
            None, "needs at least one endpoint: pop3, imap, smtp or graph_url (or a preset)"
        )
    endpoints = {protocol: _endpoint(table.table(protocol), protocol) for protocol in present}
    if preset is not None:
        for protocol in UPSTREAM_PROTOCOLS:
            endpoints.setdefault(protocol, getattr(preset, protocol))
    oauth = _oauth_client(
        table.table("oauth"), table.has("oauth"), preset.oauth if preset is not None else None
    )
    ca_file = table.existing_file("ca_file", None)
    if ca_file is not None:
        try:
            load_trust_root(ca_file)
        except TLSSetupError as e:
            table.problem("ca_file", str(e).partition(": ")[2] or str(e))
    timeout = table.seconds("timeout", field_default(Provider, "timeout"))
    pop3_auth = table.choice("pop3_auth", POP3_AUTH_CHOICES, field_default(Provider, "pop3_auth"))
    # A preset's documented mechanism (XOAUTH2) unless the admin says otherwise.
    sasl = table.choice(
        "sasl", SASL_CHOICES, preset.sasl if preset is not None else field_default(Provider, "sasl")
    )
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
        tenant=preset.tenant if preset is not None else None,
        cloud=preset.cloud if preset is not None else None,
        graph_url=(
            graph_url
            or (preset.graph_url if preset is not None else None)
            or field_default(Provider, "graph_url")
        ),
        default_grant=(
            preset.default_grant if preset is not None else field_default(Provider, "default_grant")
        ),
    )


_PRESET_KEYS = (
    "tenant",
    "cloud",
    "client_id",
    "client_secret_file",
    "client_type",
    "service_account_file",
)


def _preset(table: Table) -> Preset | None:
    """The built-in provider named by `preset`, with the app registration in
    `client_id` / `client_secret_file` (and `tenant` for Microsoft 365)."""
    name = table.choice("preset", tuple(PRESETS), None)
    tenant = table.string("tenant", None)
    cloud = table.choice("cloud", CLOUDS, None)
    client_id = table.string("client_id", None)
    client_type = table.choice(
        "client_type", CLIENT_TYPES, field_default(OAuthClient, "client_type")
    )
    secret_file = table.existing_file("client_secret_file", None)
    account_file = table.existing_file("service_account_file", None)
    if name is None:
        for key in _PRESET_KEYS:
            if table.has(key) and not table.has("preset"):
                table.problem(key, "only used with a preset; put it in the oauth table instead")
        return None
    if name in NEEDS_TENANT and tenant is None and not table.has("tenant"):
        table.problem("tenant", f"required with preset {name!r} (e.g. contoso.onmicrosoft.com)")
    if tenant is not None and name not in NEEDS_TENANT:
        table.problem("tenant", f"not used with preset {name!r}")
    if cloud is not None and name != "microsoft365":
        table.problem(
            "cloud", 'only used with preset "microsoft365" (Microsoft\'s national clouds)'
        )
    if client_id is None and not table.has("client_id"):
        table.problem("client_id", f"required with preset {name!r}: the app registration's id")
    if account_file is not None and name != "gmail":
        table.problem(
            "service_account_file", 'only used with preset "gmail" (or in an oauth table)'
        )
    secret = _client_secret(table, secret_file)
    service_account = _service_account(table, account_file)
    if client_id is None or client_type is None or (name in NEEDS_TENANT and tenant is None):
        return None
    return PRESETS[name](
        PresetOptions(
            client_id=client_id,
            client_secret=secret,
            tenant=tenant,
            cloud=cloud,
            client_type=client_type,
            service_account=service_account,
        )
    )


def _client_secret(table: Table, path: Path | None) -> Secret | None:
    if path is None:
        return None
    check_secret_file(table, "client_secret_file", path)
    return read_secret_file(table, "client_secret_file", path)


def _service_account(table: Table, path: Path | None) -> ServiceAccountKey | None:
    """A Google service account's JSON key, checked now so that a wrong file
    is a check-config problem rather than a refusal at first use."""
    if path is None:
        return None
    check_secret_file(table, "service_account_file", path)
    text = read_secret_file(table, "service_account_file", path)
    if text is None:
        return None
    try:
        return load_service_account(text.reveal())
    except ServiceAccountKeyError as e:
        table.problem("service_account_file", f"{path}: {e}")
        return None


def _oauth_client(table: Table, present: bool, base: OAuthClient | None) -> OAuthClient | None:
    """The `oauth` table: the whole client without a preset, or overrides of
    the preset's (endpoint URLs pointing elsewhere, other scopes...)."""
    if not present or not table.valid:
        return base
    mark = table.reader.mark()
    required = base is None
    token_url = _url(table, "token_url", required=required)
    device_authorization_url = _url(table, "device_authorization_url", required=False)
    authorization_url = _url(table, "authorization_url", required=False)
    revocation_url = _url(table, "revocation_url", required=False)
    client_id = table.string("client_id", REQUIRED if required else None)
    secret_file = table.existing_file("client_secret_file", None)
    secret = _client_secret(table, secret_file)
    account_file = table.existing_file("service_account_file", None)
    service_account = _service_account(table, account_file)
    scopes = tuple(text for _, text in table.strings("scopes"))
    app_scopes = tuple(text for _, text in table.strings("app_scopes"))
    client_type = table.choice("client_type", CLIENT_TYPES, None)
    loopback_host = table.choice("loopback_host", ("localhost", "127.0.0.1"), None)
    table.finish()
    if not table.reader.clean_since(mark):
        return None
    if base is None:
        if token_url is None or client_id is None:
            return None
        base = OAuthClient(token_url=token_url, client_id=client_id)
    return replace(
        base,
        token_url=token_url or base.token_url,
        client_id=client_id or base.client_id,
        device_authorization_url=device_authorization_url or base.device_authorization_url,
        authorization_url=authorization_url or base.authorization_url,
        revocation_url=revocation_url or base.revocation_url,
        client_secret=secret or base.client_secret,
        service_account=service_account or base.service_account,
        scopes=scopes or base.scopes,
        app_scopes=app_scopes or base.app_scopes,
        client_type=client_type or base.client_type,
        loopback_host=loopback_host or base.loopback_host,
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
