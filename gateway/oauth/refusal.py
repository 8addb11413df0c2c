"""One vocabulary for "the provider said no", and what an admin does about it.

A refusal from a token endpoint (Microsoft's AADSTS numbers, Google's
`error` strings) and a refusal from a mail server (SMTP 535 5.7.139, IMAP
``BAD User is authenticated but not connected``...) both end in one of four
kinds, because the gateway does one of four things with them:

- REAUTHORIZE: the user's grant is gone (expired, revoked, consent or MFA
  now required): only a new `gateway oauth authorize` (or an admin's
  consent) helps; retrying burns nothing but log lines.
- MISCONFIGURED: the gateway or the app registration is wrong (bad or
  expired secret, app not in the tenant, public/confidential mismatch, SMTP
  AUTH disabled, no mailbox rights): an admin must change something; a new
  authorization will not help.
- TEMPORARY: throttling, 5xx, the network, concurrent connection limits:
  back off and try again.
- TOKEN_REFUSED: a mail server refused an access token it should have
  accepted: the one case that earns the single forced refresh.

This module is pure (no Twisted, no I/O) so the token manager, the upstream
login paths and `gateway check` all classify the same way and tests can feed
it the bodies quoted in the providers' documentation.

Sources for the codes: Microsoft Entra "Authentication and authorization
error codes" (learn.microsoft.com/entra/identity-platform/reference-error-codes)
and the token endpoint's error shape (v2-oauth2-auth-code-flow, "Error
response"); Google "Using OAuth 2.0 to Access Google APIs" and its
limited-input-device, service-account and native-app pages
(developers.google.com/identity/protocols/oauth2).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass


class RefusalKind(enum.Enum):
    """What the gateway (and the admin) does about a refusal."""

    REAUTHORIZE = "reauthorize"
    MISCONFIGURED = "misconfigured"
    TEMPORARY = "temporary"
    TOKEN_REFUSED = "token_refused"

    @property
    def label(self) -> str:
        """The few words a status line shows."""
        return _LABELS[self]


_LABELS = {
    RefusalKind.REAUTHORIZE: "needs a new authorization",
    RefusalKind.MISCONFIGURED: "gateway or app misconfigured",
    RefusalKind.TEMPORARY: "temporary",
    RefusalKind.TOKEN_REFUSED: "token refused",
}

# The kinds by their value, for readers of the store and of --json output.
KINDS_BY_NAME: dict[str, RefusalKind] = {kind.value: kind for kind in RefusalKind}


@dataclass(frozen=True)
class Refusal:
    """One classified refusal.

    `code` is the provider's own word for it, as an admin would search for
    it: ``AADSTS700082``, ``invalid_grant``, ``535 5.7.139``, ``http_503``.
    `advice` is one sentence saying what to do.
    """

    kind: RefusalKind
    code: str
    advice: str

    def __str__(self) -> str:
        return f"{self.code} ({self.kind.label}): {self.advice}"

    def for_account(self, name: str) -> Refusal:
        """The advice with the account's name where it says ACCOUNT."""
        return Refusal(self.kind, self.code, self.advice.replace("ACCOUNT", name))

    def as_dict(self) -> dict[str, str]:
        return {"kind": self.kind.value, "code": self.code, "advice": self.advice}


R, M, T = RefusalKind.REAUTHORIZE, RefusalKind.MISCONFIGURED, RefusalKind.TEMPORARY

_REAUTHORIZE_ADVICE = "run `gateway oauth authorize {account}` again to sign the mailbox in"

# Microsoft Entra AADSTS numbers (the `error_codes` array of a token answer).
ENTRA_CODES: dict[int, tuple[RefusalKind, str]] = {
    700082: (R, "the refresh token expired after 90 days unused; " + _REAUTHORIZE_ADVICE),
    50173: (R, "the grant was revoked (password change or admin action); " + _REAUTHORIZE_ADVICE),
    70000: (R, "the grant is invalid or was revoked; " + _REAUTHORIZE_ADVICE),
    70008: (R, "the refresh token or code expired or was revoked; " + _REAUTHORIZE_ADVICE),
    70043: (
        R,
        "a Conditional Access sign-in frequency policy expired the session; " + _REAUTHORIZE_ADVICE,
    ),
    50076: (R, "multi-factor authentication is now required; " + _REAUTHORIZE_ADVICE),
    50079: (R, "the user must register for multi-factor authentication; " + _REAUTHORIZE_ADVICE),
    53003: (
        R,
        "a Conditional Access policy blocked the sign-in; the Entra admin must allow "
        "the gateway's sign-in (see the sign-in logs), then authorize again",
    ),
    65001: (
        R,
        "the user or admin has not consented to the app's permissions; grant consent "
        "(Entra admin center > App registrations > API permissions) and authorize again",
    ),
    7000215: (
        M,
        "the client secret is wrong; copy the secret's Value (not its ID) into the "
        "provider's client_secret_file",
    ),
    7000222: (
        M,
        "the client secret has expired; create a new one under Certificates & secrets "
        "and update client_secret_file",
    ),
    700016: (
        M,
        "the application was not found in the tenant; check client_id and tenant, "
        "and that an admin consented to the app in that tenant",
    ),
    700025: (
        M,
        "the app is a public client and must not send a secret; remove "
        'client_type = "confidential" or the secret for delegated accounts',
    ),
    7000218: (
        M,
        'the app is confidential but no secret was sent; enable "Allow public client '
        'flows" on the app registration (Authentication) for device-code and native '
        'sign-in, or configure client_type = "confidential" with a secret',
    ),
    9001023: (
        M,
        "client credentials need a tenant id or domain, not common/organizations/"
        "consumers; set the provider's tenant",
    ),
    700022: (
        M,
        "the scopes name more than one resource; ask for outlook.office.com and Graph "
        "scopes in separate providers",
    ),
    70011: (M, "the requested scope is invalid for this app; check the provider's scopes"),
    700024: (M, "the client assertion is not within its valid time range; check the clock"),
    50034: (M, "the user account does not exist in this tenant; check the account's username"),
    50126: (R, "the sign-in credentials were wrong; " + _REAUTHORIZE_ADVICE),
    50196: (T, "Entra detected a request loop; the gateway backs off and retries later"),
    90033: (
        M,
        "the app needs a service principal in this tenant; have an admin consent to it",
    ),
}

# Google's `error` strings at its token endpoint (and a few RFC 6749 ones
# every provider may send).
GOOGLE_CODES: dict[str, tuple[RefusalKind, str]] = {
    "invalid_grant": (
        R,
        "the refresh token expired or was revoked (unused for 6 months, a password "
        'change, a 7-day "Testing" app, or revoked by the user); ' + _REAUTHORIZE_ADVICE,
    ),
    "admin_policy_enforced": (
        R,
        "a Workspace admin policy blocks this app for the account; the Workspace admin "
        "must trust the app (Security > API controls), then authorize again",
    ),
    "interaction_required": (R, "the provider needs the user to sign in; " + _REAUTHORIZE_ADVICE),
    "consent_required": (R, "the user must consent again; " + _REAUTHORIZE_ADVICE),
    "login_required": (R, "the user must sign in again; " + _REAUTHORIZE_ADVICE),
    "org_internal": (
        M,
        'the OAuth client is an "Internal" app of another Google Workspace '
        "organization; use a mailbox of that organization or make the app External",
    ),
    "deleted_client": (
        M,
        "the OAuth client was deleted in the Google Cloud console; create a new client "
        "and update client_id / client_secret_file",
    ),
    "invalid_client": (
        M,
        "the client id or secret is wrong or of the wrong type; check the provider's "
        "OAuth2 client settings (client_id, client_secret_file) against its console",
    ),
    "unauthorized_client": (
        M,
        "the client may not use this grant (wrong client type, or domain-wide "
        "delegation not granted for this client id and scope)",
    ),
    "invalid_scope": (
        M,
        "the provider refused the scope for this grant or client; for Gmail use the "
        "authorization_code or service_account grant (the device flow cannot ask for mail)",
    ),
    "unsupported_grant_type": (
        M,
        "the provider does not support this grant; choose another grant for the account",
    ),
    "invalid_request": (
        M,
        "the provider refused the request as malformed; check the provider table",
    ),
    "access_denied": (R, "the user or an admin denied access; " + _REAUTHORIZE_ADVICE),
    "rate_limit_exceeded": (T, "the provider's quota is exhausted; the gateway retries later"),
    "temporarily_unavailable": (T, "the provider is busy; the gateway retries later"),
    "server_error": (T, "the provider had an internal error; the gateway retries later"),
}

_AADSTS = re.compile(r"AADSTS(\d{4,9})")
_TEMPORARY_STATUSES = frozenset({408, 425, 429})


def classify_token_answer(
    status: int, document: Mapping[str, object] | None, *, account: str = "ACCOUNT"
) -> Refusal:
    """Classify a token endpoint's non-2xx answer (status and JSON body, if any).

    Microsoft's `error_codes` (or the AADSTS number in `error_description`)
    decides before the generic `error`, because Entra answers `invalid_grant`
    for causes as different as an expired refresh token and a bad secret.
    """
    document = document or {}
    for number in entra_codes(document):
        known = ENTRA_CODES.get(number)
        if known is not None:
            return _refusal(known, f"AADSTS{number}", account)
    error = document.get("error")
    if not isinstance(error, str):
        # Google's device endpoint: {"error_code": "rate_limit_exceeded"}.
        error = document.get("error_code")
    if status >= 500 or status in _TEMPORARY_STATUSES:
        code = error if isinstance(error, str) and error else f"http_{status}"
        return Refusal(
            T,
            _bounded(code),
            "the provider is unavailable or throttling; the gateway retries later",
        )
    if isinstance(error, str) and error:
        known = GOOGLE_CODES.get(error)
        numbers = entra_codes(document)
        code = f"AADSTS{numbers[0]}" if numbers else _bounded(error)
        if known is not None:
            return _refusal(known, code, account)
        return Refusal(M, code, "the provider refused the request; see its description in the log")
    return Refusal(
        M, f"http_{status}", "the token endpoint answered without an OAuth error; check token_url"
    )


def network_refusal(reason: str = "network") -> Refusal:
    """The token endpoint could not be asked (DNS, TCP, TLS, timeout)."""
    return Refusal(
        T,
        _bounded(reason) or "network",
        "the provider could not be reached; the gateway retries later",
    )


def entra_codes(document: Mapping[str, object]) -> list[int]:
    """The AADSTS numbers of a Microsoft answer: `error_codes`, else the
    description's ``AADSTSnnnn:`` prefix."""
    codes = document.get("error_codes")
    found: list[int] = []
    if isinstance(codes, list):
        found = [c for c in codes if isinstance(c, int) and not isinstance(c, bool)]
    if not found:
        description = document.get("error_description")
        if isinstance(description, str):
            found = [int(n) for n in _AADSTS.findall(description[:400])]
    return found


def _refusal(known: tuple[RefusalKind, str], code: str, account: str) -> Refusal:
    kind, advice = known
    return Refusal(kind, code, advice.replace("{account}", account))


def _bounded(text: str, limit: int = 80) -> str:
    return "".join(c if c.isprintable() else " " for c in text[:limit])


__all__ = [
    "ENTRA_CODES",
    "GOOGLE_CODES",
    "KINDS_BY_NAME",
    "Refusal",
    "RefusalKind",
    "classify_token_answer",
    "entra_codes",
    "network_refusal",
]
