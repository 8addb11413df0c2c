"""Built-in providers: Microsoft 365, Outlook.com and Gmail as they document themselves.

A preset saves the admin from copying endpoint names and scope strings out
of vendor documentation, and it knows what each provider refuses, so
`check-config` can say so before a sign-in fails: Google's device flow does
not allow the mail scope, Google has no client-credentials grant, Microsoft
cannot do client credentials on `common`, a public Microsoft client must not
send a secret. Any endpoint can still be overridden in the provider table.

Sources (checked 2026):
- Microsoft: "Authenticate an IMAP, POP or SMTP connection using OAuth"
  (scopes, XOAUTH2 only, app-only `.default`), "POP, IMAP, and SMTP settings"
  (hosts; Outlook.com sends through smtp-mail.outlook.com), the v2.0 token,
  device-code and auth-code flow pages (public clients send no secret:
  AADSTS700025), redirect URI restrictions (http://localhost, port ignored);
  national clouds: see `gateway.oauth.clouds`.
- Google: "OAuth 2.0 for Mobile & Desktop Apps" (loopback redirect
  http://127.0.0.1:PORT; the desktop client's secret is sent with the code
  and refresh requests), "OAuth 2.0 for TV and Limited-Input Device
  Applications" (allowed scopes: no Gmail), "OAuth 2.0 for Server to Server
  Applications" (service accounts, JWT bearer grant, domain-wide delegation),
  "Gmail IMAP/SMTP: XOAUTH2", revocation at https://oauth2.googleapis.com/revoke.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from gateway.model import (
    Account,
    ClientType,
    Cloud,
    Endpoint,
    Grant,
    OAuthClient,
    Provider,
    SASLChoice,
    Secret,
    ServiceAccountKey,
)
from gateway.oauth.clouds import CLOUDS

GOOGLE_MAIL_SCOPE = "https://mail.google.com/"
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"
GOOGLE_REVOKE_URL = "https://oauth2.googleapis.com/revoke"
# Entra's multi-tenant aliases: fine for delegated sign-in, not for app-only
# (AADSTS9001023: client credentials need the tenant).
SHARED_TENANTS: Final = frozenset({"common", "organizations", "consumers"})


@dataclass(frozen=True)
class PresetOptions:
    """What the admin writes next to `preset = "..."` in the provider table."""

    client_id: str
    client_secret: Secret | None = None
    tenant: str | None = None
    cloud: Cloud | None = None
    client_type: ClientType = "auto"
    service_account: ServiceAccountKey | None = None


@dataclass(frozen=True)
class Preset:
    pop3: Endpoint | None
    imap: Endpoint | None
    smtp: Endpoint | None
    oauth: OAuthClient
    sasl: SASLChoice
    default_grant: Grant
    tenant: str | None = None
    cloud: Cloud | None = None
    graph_url: str | None = None
    # Grants the provider refuses, with what to do instead (for check-config).
    refused: dict[Grant, str] = field(default_factory=dict)


def _microsoft(
    options: PresetOptions, tenant: str, cloud: Cloud, smtp_host: str | None = None
) -> Preset:
    hosts = CLOUDS[cloud]
    base = f"https://{hosts.login}/{tenant}/oauth2/v2.0"
    resource = f"https://{hosts.delegated_resource}"
    refused: dict[Grant, str] = {
        "service_account": (
            "service_account is Google's JWT bearer grant; Microsoft 365 app-only "
            'access is grant = "client_credentials"'
        )
    }
    if tenant.lower() in SHARED_TENANTS:
        refused["client_credentials"] = (
            f"tenant {tenant!r} cannot do client credentials (Microsoft answers "
            "AADSTS9001023): set the provider's tenant to the tenant id or its "
            "domain (contoso.onmicrosoft.com)"
        )
    return Preset(
        pop3=Endpoint(hosts.exchange, 995, "implicit"),
        imap=Endpoint(hosts.exchange, 993, "implicit"),
        smtp=Endpoint(smtp_host or hosts.smtp, 587, "starttls"),
        oauth=OAuthClient(
            token_url=f"{base}/token",
            device_authorization_url=f"{base}/devicecode",
            authorization_url=f"{base}/authorize",
            client_id=options.client_id,
            client_secret=options.client_secret,
            # offline_access: without it there is no refresh token.
            scopes=(
                f"{resource}/POP.AccessAsUser.All",
                f"{resource}/IMAP.AccessAsUser.All",
                f"{resource}/SMTP.Send",
                "offline_access",
            ),
            # App-only (client credentials) takes the resource's .default scope;
            # the app needs POP.AccessAsApp / IMAP.AccessAsApp / SMTP.SendAsApp.
            app_scopes=(f"https://{hosts.exchange}/.default",),
            # Device code and the native code flow are public client flows: a
            # secret there gets AADSTS700025. Only client credentials (always)
            # and a code grant declared "confidential" (a web app) send it.
            client_type="public" if options.client_type == "auto" else options.client_type,
            # Microsoft has no revocation endpoint for refresh tokens.
            revocation_url=None,
            loopback_host="localhost",
        ),
        # Microsoft documents XOAUTH2 only, for POP, IMAP and SMTP.
        sasl="xoauth2",
        default_grant="device_code",
        tenant=tenant,
        cloud=cloud,
        graph_url=f"https://{hosts.graph}/v1.0",
        refused=refused,
    )


def microsoft365(options: PresetOptions) -> Preset:
    """Microsoft identity platform v2.0 for one tenant (name or GUID), any cloud."""
    if not options.tenant:
        raise ValueError("the microsoft365 preset needs a tenant")
    return _microsoft(options, options.tenant, options.cloud or "global")


def outlook(options: PresetOptions) -> Preset:
    """Outlook.com, Hotmail and Live mailboxes (Microsoft accounts): the
    `consumers` tenant; mail sent through smtp-mail.outlook.com."""
    preset = _microsoft(options, "consumers", "global", smtp_host="smtp-mail.outlook.com")
    refused = dict(preset.refused)
    refused["client_credentials"] = (
        "Outlook.com mailboxes have no app-only access (client credentials need a "
        'Microsoft 365 tenant); use grant = "device_code" or "authorization_code"'
    )
    return Preset(
        pop3=preset.pop3,
        imap=preset.imap,
        smtp=preset.smtp,
        oauth=preset.oauth,
        sasl=preset.sasl,
        default_grant=preset.default_grant,
        tenant=preset.tenant,
        cloud=preset.cloud,
        graph_url=preset.graph_url,
        refused=refused,
    )


def gmail(options: PresetOptions) -> Preset:
    """Google: one scope covers POP3, IMAP and SMTP."""
    return Preset(
        pop3=Endpoint("pop.gmail.com", 995, "implicit"),
        imap=Endpoint("imap.gmail.com", 993, "implicit"),
        smtp=Endpoint("smtp.gmail.com", 587, "starttls"),
        oauth=OAuthClient(
            token_url=GOOGLE_TOKEN_URL,
            # Google's device flow refuses the mail scope: no device URL.
            device_authorization_url=None,
            authorization_url="https://accounts.google.com/o/oauth2/v2/auth",
            client_id=options.client_id,
            client_secret=options.client_secret,
            scopes=(GOOGLE_MAIL_SCOPE,),
            app_scopes=(GOOGLE_MAIL_SCOPE,),
            # A "Desktop app" client's secret is not secret, but Google wants
            # it with the code exchange and every refresh.
            client_type="confidential" if options.client_type == "auto" else options.client_type,
            revocation_url=GOOGLE_REVOKE_URL,
            loopback_host="127.0.0.1",
            service_account=options.service_account,
        ),
        sasl="xoauth2",
        default_grant="authorization_code",
        refused={
            "device_code": (
                "Google's device flow does not allow the Gmail scope "
                f"({GOOGLE_MAIL_SCOPE}; Google answers invalid_scope): use "
                'grant = "authorization_code" with a Desktop app client'
            ),
            "client_credentials": (
                "Google has no client credentials grant: for app-only access to "
                'Workspace mailboxes use grant = "service_account" with the '
                "provider's service_account_file (domain-wide delegation)"
            ),
        },
    )


PresetFactory = Callable[[PresetOptions], Preset]
PRESETS: Final[dict[str, PresetFactory]] = {
    "microsoft365": microsoft365,
    "outlook": outlook,
    "gmail": gmail,
}
# Presets that cannot work without a tenant in their URLs.
NEEDS_TENANT = frozenset({"microsoft365"})
# Presets whose URLs depend on Microsoft's cloud instance.
MICROSOFT = frozenset({"microsoft365", "outlook"})


def grant_problem(account: Account, provider: Provider) -> str | None:
    """What `check-config` says about an OAuth2 account's grant at its provider,
    or None when the provider can serve it."""
    oauth = provider.oauth
    grant = account.grant or provider.default_grant
    name = provider.name
    if oauth is None:
        return f"provider {name!r} has no OAuth2 client: add a preset or an oauth table"
    if provider.preset is not None and provider.preset in PRESETS:
        refused = _refused(provider)
        if grant in refused:
            return f"provider {name!r} ({provider.preset}): {refused[grant]}"
    if grant == "device_code" and not oauth.device_authorization_url:
        return f"provider {name!r} has no device_authorization_url"
    if grant == "authorization_code" and not oauth.authorization_url:
        return f"provider {name!r} has no authorization_url"
    if grant == "client_credentials" and oauth.client_secret is None:
        return f"provider {name!r} has no client secret, which the client_credentials grant needs"
    if grant == "service_account" and oauth.service_account is None:
        return (
            f"provider {name!r} has no service_account_file, which the service_account "
            "grant needs (the service account's JSON key)"
        )
    if (
        grant == "device_code"
        and provider.preset in MICROSOFT
        and oauth.client_type == "confidential"
    ):
        return (
            f'provider {name!r}: client_type = "confidential" sends the secret, but the '
            "device code flow is a public client flow (Microsoft answers AADSTS700025); "
            'use grant = "authorization_code" or a separate provider without client_type'
        )
    return None


def _refused(provider: Provider) -> dict[Grant, str]:
    """The refusals of the provider's preset, rebuilt from what it was built with."""
    assert provider.oauth is not None and provider.preset is not None
    options = PresetOptions(
        client_id=provider.oauth.client_id,
        tenant=provider.tenant,
        cloud=provider.cloud,
    )
    if provider.preset in NEEDS_TENANT and not provider.tenant:
        return {}
    return PRESETS[provider.preset](options).refused
