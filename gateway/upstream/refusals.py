"""What a mail server's "no" at login means, and what the admin does about it.

One pure function per question, shared by the POP3, IMAP and SMTP login
paths, the relay and `gateway check`: `classify_login` turns the server's
answer (and, for bearer logins, the JSON error challenge it sent before it)
into a `Refusal` of the vocabulary in `gateway.oauth.refusal`. Only a
TOKEN_REFUSED earns the one forced token refresh; MISCONFIGURED and
REAUTHORIZE are the admin's (the device gets SYS/PERM), TEMPORARY is retried
(SYS/TEMP).

The order of the rules matters: a provider's own text says more than a
generic response code (Microsoft answers a disabled SMTP AUTH with a 535 that
would otherwise read as a wrong password); then what says "not now" (RFC
3206 SYS/TEMP, RFC 5530 UNAVAILABLE, SMTP 4yz); then the bearer challenge's
status; then the generic codes; last, the kind of login decides (a bare
refusal of a bearer login is the token's, of a password login the
password's).

Texts and where they were seen ("third-party" means no primary source was
found: a client's or proxy's published logs, or a vendor's help page):

- Microsoft (Exchange Online): ``535 5.7.139 Authentication unsuccessful,
  SmtpClientAuthentication is disabled for the Tenant. Visit
  https://aka.ms/smtp_auth_disabled`` and other 5.7.139 policy refusals
  (security defaults) (third-party troubleshooting pages); ``535 5.7.3
  Authentication unsuccessful`` (Microsoft's MS-SMTPNTLM 2.2.1.4 gives the
  code, the OAuth case is third-party); ``432 4.3.2 Concurrent connections
  limit exceeded.`` (learn.microsoft.com, exchange/troubleshoot/send-emails/
  smtp-submission-improvements; the 2018 announcement also names ``4.3.2
  STOREDRV.ClientSubmit; sender thread limit exceeded``, temporary by its
  4.x.x code); ``550 5.7.30 Basic
  authentication is not supported for Client Submission`` (third-party, quoting
  Microsoft's 2026 announcement); IMAP ``NO AUTHENTICATE failed.``
  (third-party logs) and ``BAD User is authenticated but not connected.``,
  which answers the SELECT/EXAMINE after a successful AUTHENTICATE
  (third-party); POP ``-ERR Authentication failure: unknown user name or bad
  password.`` (third-party logs, also for app-only tokens without mailbox
  rights).
- Google: the XOAUTH2 error challenge ``{"status":"401","schemes":...,
  "scope":...}`` (developers.google.com/gmail/imap/xoauth2-protocol); status
  400 for a wrong user name or a token without the mail scope (third-party
  logs); SMTP ``534-5.7.9 Application-specific password required``,
  ``535-5.7.8 Username and Password not accepted`` and IMAP ``NO
  [AUTHENTICATIONFAILED] Invalid credentials (Failure)`` (third-party logs);
  POP ``-ERR [SYS/PERM] Your account is not enabled for POP access``
  (unverified: the providers notes only).
- Standards: RFC 3206 (POP3 SYS/TEMP, SYS/PERM, AUTH, IN-USE, LOGIN-DELAY),
  RFC 5530 (IMAP response codes), RFC 3463 (SMTP enhanced status codes),
  RFC 4954 (SMTP AUTH replies), RFC 7628 (OAUTHBEARER's JSON status).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from gateway.oauth.refusal import Refusal, RefusalKind

MailProtocol = Literal["pop3", "imap", "smtp"]

M = RefusalKind.MISCONFIGURED
T = RefusalKind.TEMPORARY
K = RefusalKind.TOKEN_REFUSED

SMTP_AUTH_DISABLED_URL = "https://aka.ms/smtp_auth_disabled"

WRONG_PASSWORD = (
    "the server refused the account's user name or password: check username and "
    "password_file (an account with 2-step verification needs an app password, or OAuth2)"
)
TOKEN_ADVICE = (
    "the server refused the access token; the gateway refreshed it once and retries "
    "at the next login; if this persists, check that the token's scopes cover this "
    "protocol, that username is the mailbox the token was issued for and, for "
    "app-only access, the service principal's permission on the mailbox"
)
RETRY_LATER = "the server is busy or limiting connections; the gateway tries again later"


@dataclass(frozen=True)
class Answer:
    """A server's answer to a login (or to the first command after it), parsed enough to classify.

    `text` is the whole line as the log shows it (``535 5.7.139 ...``,
    ``-ERR [SYS/PERM] ...``, ``BAD ...``); `reply_code` the SMTP reply code;
    `response_code` the RFC 2449 / RFC 5530 code in brackets (upper case).
    """

    protocol: MailProtocol
    text: str
    reply_code: int | None = None
    response_code: str | None = None

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 status code in an SMTP reply (``5.7.139``), if any."""
        if self.reply_code is None:
            return None
        match = _ENHANCED.match(self.text[3:].lstrip(" -"))
        return match.group(1) if match else None

    @property
    def smtp_code(self) -> str:
        """``535 5.7.139``: what an admin searches for."""
        enhanced = self.enhanced
        return f"{self.reply_code}" + (f" {enhanced}" if enhanced else "")

    @property
    def status_code(self) -> str:
        """The POP3/IMAP status word with its bracketed code, e.g. ``-ERR [SYS/PERM]``."""
        word = self.text.split(" ", 1)[0] if self.text else ""
        return f"{word} [{self.response_code}]" if self.response_code else word


_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})\b")

# A provider's own words: (protocols, pattern, code, kind for a password
# login, kind for a bearer login, advice). Matched case-insensitively. The
# advice is for the password login when the bearer kind is TOKEN_REFUSED.
_Rule = tuple[frozenset[str], re.Pattern[str], str, RefusalKind, RefusalKind, str]
_SMTP, _IMAP, _POP3 = frozenset({"smtp"}), frozenset({"imap"}), frozenset({"pop3"})


def _rule(
    protocols: frozenset[str],
    pattern: str,
    code: str,
    password: RefusalKind,
    bearer: RefusalKind,
    advice: str,
) -> _Rule:
    return (protocols, re.compile(pattern, re.IGNORECASE), code, password, bearer, advice)


PROVIDER_TEXTS: tuple[_Rule, ...] = (
    _rule(
        _SMTP,
        r"SmtpClientAuthentication is disabled",
        "535 5.7.139",
        M,
        M,
        "SMTP AUTH is disabled for the tenant or the mailbox: enable Authenticated SMTP "
        "for the mailbox (Set-CASMailbox -SmtpClientAuthenticationDisabled $false) "
        f"and, if needed, for the organisation; see {SMTP_AUTH_DISABLED_URL}",
    ),
    _rule(
        _SMTP,
        r"\b5\.7\.139\b",
        "535 5.7.139",
        M,
        M,
        "Microsoft refused SMTP AUTH by policy (security defaults, Conditional Access or "
        "SMTP AUTH disabled for the mailbox): allow SMTP AUTH for this mailbox; "
        f"see {SMTP_AUTH_DISABLED_URL}",
    ),
    _rule(
        _SMTP,
        r"\b5\.7\.30\b|Basic authentication is not supported",
        "550 5.7.30",
        M,
        M,
        'the provider no longer accepts passwords for SMTP: make the account auth = "oauth2"',
    ),
    _rule(
        _SMTP,
        r"\b4\.3\.2\b.*Concurrent connections? limit",
        "432 4.3.2",
        T,
        T,
        "too many connections to this mailbox at once (Microsoft 365 allows 3 for SMTP "
        "AUTH); the gateway tries again later",
    ),
    _rule(
        _SMTP,
        r"Application-specific password required",
        "534 5.7.9",
        M,
        M,
        'the Google account has 2-step verification: make the account auth = "oauth2" '
        "or configure an app password",
    ),
    _rule(
        _SMTP,
        r"Username and Password not accepted",
        "535 5.7.8",
        M,
        K,
        WRONG_PASSWORD,
    ),
    _rule(
        _SMTP,
        r"^535 5\.7\.3 Authentication unsuccessful",
        "535 5.7.3",
        M,
        K,
        WRONG_PASSWORD + "; at Microsoft 365 also check that SMTP AUTH is enabled for the mailbox",
    ),
    _rule(
        _IMAP,
        r"User is authenticated but not connected",
        "BAD User is authenticated but not connected",
        M,
        M,
        "the login was accepted but gives no access to this mailbox: for app-only access "
        "grant the app's service principal FullAccess to it (Add-MailboxPermission -User "
        "<the Enterprise application's object id> -AccessRights FullAccess); otherwise "
        "check that username is the mailbox the token belongs to and that IMAP is enabled "
        "for it",
    ),
    _rule(_IMAP, r"^NO AUTHENTICATE failed", "NO AUTHENTICATE failed", M, K, WRONG_PASSWORD),
    _rule(
        _POP3,
        r"not enabled for POP access",
        "-ERR [SYS/PERM] not enabled for POP access",
        M,
        M,
        "POP is off for this Gmail mailbox: enable it in Gmail's settings (Forwarding "
        'and POP/IMAP), or serve the device from IMAP (mailbox = "imap")',
    ),
    _rule(
        _POP3,
        r"Authentication failure: unknown user name or bad password",
        "-ERR Authentication failure",
        M,
        K,
        WRONG_PASSWORD,
    ),
)

# RFC 3206 (POP3) and RFC 5530 (IMAP) codes that say "not now".
TEMPORARY_CODES = frozenset(
    {"SYS/TEMP", "IN-USE", "LOGIN-DELAY", "UNAVAILABLE", "INUSE", "LIMIT", "SERVERBUG", "OVERQUOTA"}
)
# Codes that say the mailbox is held by another session: the device hears [IN-USE].
IN_USE_CODES = frozenset({"IN-USE", "INUSE"})

# RFC 5530 / 3206 codes that blame the credentials (the token, for a bearer login).
_CREDENTIAL_CODES = frozenset({"AUTH", "AUTHENTICATIONFAILED", "EXPIRED"})

_CODE_ADVICE: dict[str, str] = {
    "SYS/PERM": "the server refused the mailbox for good; see its text in the log",
    "AUTHORIZATIONFAILED": (
        "the credentials are right but do not give access to this mailbox: check "
        "username and the mailbox permissions"
    ),
    "PRIVACYREQUIRED": "the server wants TLS for this login: check the provider's tls mode",
    "CONTACTADMIN": "the provider asks its administrator to look at this account",
    "NOPERM": "the account has no right to this mailbox or folder",
    "NONEXISTENT": "the folder does not exist: check the account's folder",
    "CANNOT": "the server cannot do this for the account; see its text in the log",
}

_BAD_BEARER = (
    "the server could not use the bearer login: check that username is the mailbox the "
    "token was issued for, that the token has the mail scope (Gmail: "
    "https://mail.google.com/) and the provider's sasl mechanism"
)

_BEARER_STATUS: dict[str, tuple[RefusalKind, str]] = {
    "401": (K, TOKEN_ADVICE),
    "invalid_token": (K, TOKEN_ADVICE),
    # Seen from Gmail for a wrong user name or a token without the mail scope.
    "400": (M, _BAD_BEARER),
    "invalid_request": (M, _BAD_BEARER),
    "403": (
        M,
        "the token is valid but not for this: check the provider's scopes (the mail "
        "scope for this protocol) and the app's permissions on the mailbox",
    ),
    "insufficient_scope": (
        M,
        "the token lacks a scope this server needs: check the provider's scopes",
    ),
}


def classify_login(answer: Answer, *, bearer: bool, challenge_status: str | None = None) -> Refusal:
    """The refusal `answer` stands for, for a password (`bearer=False`) or bearer login.

    `challenge_status` is the `status` of the JSON error challenge a server
    sent during a bearer login (XOAUTH2, OAUTHBEARER), if it sent one.
    """
    for protocols, pattern, code, password_kind, bearer_kind, advice in PROVIDER_TEXTS:
        if answer.protocol in protocols and pattern.search(answer.text):
            if bearer and bearer_kind is K:
                return Refusal(K, code, TOKEN_ADVICE)
            return Refusal(bearer_kind if bearer else password_kind, code, advice)
    temporary = _temporary(answer)
    if temporary is not None:
        return temporary
    if bearer and challenge_status in _BEARER_STATUS:
        kind, advice = _BEARER_STATUS[challenge_status]
        return Refusal(kind, f"SASL status {challenge_status}", advice)
    if answer.protocol == "smtp":
        return _smtp(answer, bearer)
    return _status(answer, bearer)


def classify_folder_open(answer: Answer) -> Refusal:
    """An IMAP SELECT/EXAMINE refused right after a successful login.

    Microsoft answers a token that is valid but has no rights on the
    mailbox here, not at AUTHENTICATE.
    """
    for protocols, pattern, code, kind, _bearer, advice in PROVIDER_TEXTS:
        if answer.protocol in protocols and pattern.search(answer.text):
            return Refusal(kind, code, advice)
    temporary = _temporary(answer)
    if temporary is not None:
        return temporary
    code = answer.response_code or ""
    advice = _CODE_ADVICE.get(
        code,
        "the server refused to open the folder: check the account's folder and the "
        "mailbox permissions",
    )
    return Refusal(M, answer.status_code, advice)


def _temporary(answer: Answer) -> Refusal | None:
    if answer.protocol == "smtp":
        enhanced = answer.enhanced or ""
        if (answer.reply_code or 0) // 100 == 4 or enhanced.startswith("4."):
            return Refusal(T, answer.smtp_code, RETRY_LATER)
        return None
    if (answer.response_code or "") in TEMPORARY_CODES:
        return Refusal(T, answer.status_code, RETRY_LATER)
    return None


def _smtp(answer: Answer, bearer: bool) -> Refusal:
    code = answer.smtp_code
    reply = answer.reply_code or 0
    enhanced = answer.enhanced or ""
    if reply in (500, 501, 502, 504) or enhanced == "5.5.4":
        return Refusal(
            M,
            code,
            "the server does not accept this login mechanism: check the provider's "
            "sasl (or pop3_auth) setting",
        )
    if reply == 538 or enhanced == "5.7.11":
        return Refusal(M, code, "the server wants TLS before AUTH: check the provider's tls mode")
    if reply == 534:
        return Refusal(
            M, code, "the server finds the login mechanism too weak: use OAuth2 or another one"
        )
    return Refusal(K if bearer else M, code, TOKEN_ADVICE if bearer else WRONG_PASSWORD)


def _status(answer: Answer, bearer: bool) -> Refusal:
    code = answer.response_code or ""
    if code in _CREDENTIAL_CODES or not code:
        if bearer:
            return Refusal(K, answer.status_code, TOKEN_ADVICE)
        if code == "EXPIRED":
            return Refusal(M, answer.status_code, "the account's password has expired: renew it")
        return Refusal(M, answer.status_code, WRONG_PASSWORD)
    advice = _CODE_ADVICE.get(code, "the server refused the login; see its text in the log")
    return Refusal(M, answer.status_code, advice)


def describe(refusal: Refusal) -> str:
    """The refusal for a log line: the provider's code, what it means, what to do."""
    return f"[{refusal.code}] {refusal.kind.label}: {refusal.advice}"
