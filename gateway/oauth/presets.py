"""Built-in providers: where Microsoft 365 and Gmail keep mail and tokens.

A preset saves the admin from copying endpoint names and scope strings out
of vendor documentation; any of its endpoints can still be overridden in the
provider's table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from gateway.model import Endpoint, OAuthClient, Secret


@dataclass(frozen=True)
class Preset:
    pop3: Endpoint
    imap: Endpoint
    smtp: Endpoint
    oauth: OAuthClient


def microsoft365(tenant: str | None, client_id: str, client_secret: Secret | None) -> Preset:
    """Microsoft identity platform v2.0 for one tenant (name or GUID)."""
    if not tenant:
        raise ValueError("the microsoft365 preset needs a tenant")
    base = f"https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
    resource = "https://outlook.office.com"
    return Preset(
        pop3=Endpoint("outlook.office365.com", 995, "implicit"),
        imap=Endpoint("outlook.office365.com", 993, "implicit"),
        smtp=Endpoint("smtp.office365.com", 587, "starttls"),
        oauth=OAuthClient(
            token_url=f"{base}/token",
            device_authorization_url=f"{base}/devicecode",
            authorization_url=f"{base}/authorize",
            client_id=client_id,
            client_secret=client_secret,
            # offline_access: without it there is no refresh token.
            scopes=(
                f"{resource}/POP.AccessAsUser.All",
                f"{resource}/IMAP.AccessAsUser.All",
                f"{resource}/SMTP.Send",
                "offline_access",
            ),
            # App-only (client credentials) takes the resource's .default scope;
            # the app needs POP.AccessAsApp / IMAP.AccessAsApp / SMTP.SendAsApp.
            app_scopes=("https://outlook.office365.com/.default",),
        ),
    )


def gmail(tenant: str | None, client_id: str, client_secret: Secret | None) -> Preset:
    """Google: one scope covers POP3, IMAP and SMTP."""
    return Preset(
        pop3=Endpoint("pop.gmail.com", 995, "implicit"),
        imap=Endpoint("imap.gmail.com", 993, "implicit"),
        smtp=Endpoint("smtp.gmail.com", 587, "starttls"),
        oauth=OAuthClient(
            token_url="https://oauth2.googleapis.com/token",
            device_authorization_url="https://oauth2.googleapis.com/device/code",
            authorization_url="https://accounts.google.com/o/oauth2/v2/auth",
            client_id=client_id,
            client_secret=client_secret,
            scopes=("https://mail.google.com/",),
        ),
    )


PresetFactory = Callable[[str | None, str, Secret | None], Preset]
PRESETS: Final[dict[str, PresetFactory]] = {"microsoft365": microsoft365, "gmail": gmail}
# Presets that cannot work without a tenant in their URLs.
NEEDS_TENANT = frozenset({"microsoft365"})
