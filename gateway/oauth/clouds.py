"""Microsoft's cloud instances: where each one signs users in and keeps mail.

A tenant lives in exactly one cloud instance, and an app registered in one
cannot sign in users of another, so the login host, the mail hosts, the
resource in the scopes and Graph's service root all change together: one
`cloud = "usgov"` in the provider table instead of five URLs.

Sources:
- login hosts: "National clouds" (Microsoft identity platform),
  https://learn.microsoft.com/entra/identity-platform/authentication-national-cloud
  (Azure Government https://login.microsoftonline.us, 21Vianet
  https://login.partner.microsoftonline.cn);
- Graph service roots: "Microsoft Graph national cloud deployments",
  https://learn.microsoft.com/graph/deployments (graph.microsoft.us for
  GCC High, dod-graph.microsoft.us for DoD, microsoftgraph.chinacloudapi.cn);
- Exchange Online hosts: "Microsoft 365 U.S. Government GCC High endpoints"
  and "... DoD endpoints" (outlook.office365.us, outlook-dod.office365.us)
  and the Exchange Online PowerShell connection URIs (partner.outlook.cn for
  21Vianet); global: "POP, IMAP, and SMTP settings" (outlook.office365.com,
  smtp.office365.com).

Not verified against a Microsoft page (third-party configurations only): the
SMTP submission hosts of the national clouds (smtp.office365.us for GCC High,
the Exchange host itself for DoD, smtp.partner.outlook.cn for 21Vianet), and
that POP/IMAP/SMTP answer on the Exchange host of each national cloud. They
are the presets' defaults; any endpoint can be overridden in the provider
table (`smtp = { host = "..." }`), which docs/microsoft365.md says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from gateway.model import Cloud


@dataclass(frozen=True)
class CloudHosts:
    login: str
    # Host of POP3, IMAP and of the resource in the scopes.
    exchange: str
    smtp: str
    graph: str
    # The resource of delegated scopes (POP.AccessAsUser.All...).
    delegated_resource: str


CLOUDS: Final[dict[Cloud, CloudHosts]] = {
    "global": CloudHosts(
        login="login.microsoftonline.com",
        exchange="outlook.office365.com",
        smtp="smtp.office365.com",
        graph="graph.microsoft.com",
        # Microsoft's IMAP/POP/SMTP OAuth page names outlook.office.com for
        # delegated scopes and outlook.office365.com/.default for app-only.
        delegated_resource="outlook.office.com",
    ),
    "usgov": CloudHosts(
        login="login.microsoftonline.us",
        exchange="outlook.office365.us",
        smtp="smtp.office365.us",
        graph="graph.microsoft.us",
        delegated_resource="outlook.office365.us",
    ),
    "dod": CloudHosts(
        login="login.microsoftonline.us",
        exchange="outlook-dod.office365.us",
        smtp="outlook-dod.office365.us",
        graph="dod-graph.microsoft.us",
        delegated_resource="outlook-dod.office365.us",
    ),
    "china": CloudHosts(
        login="login.partner.microsoftonline.cn",
        exchange="partner.outlook.cn",
        smtp="smtp.partner.outlook.cn",
        graph="microsoftgraph.chinacloudapi.cn",
        delegated_resource="partner.outlook.cn",
    ),
}
