"""Mail servers' refusals at login, classified (`gateway.upstream.refusals`), and what
each leads to: the device's answer, the log detail (provider's code and advice), the
record for `gateway oauth status`, and a forced token refresh only for a refused token.

The providers' texts come from scripted upstreams on in-memory connections: Dovecot
cannot produce them (the Dovecot paths are in the integration tests)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher

from gateway.maildrop import MailboxInUse, UpstreamRejected, UpstreamUnavailable
from gateway.maildrop.imap import open_imap_maildrop
from gateway.maildrop.pop3 import open_pop3_maildrop
from gateway.model import Account, Endpoint, Provider, Secret
from gateway.oauth.refusal import Refusal, RefusalKind
from gateway.upstream.credentials import LoginOutcomes
from gateway.upstream.imap import IMAPClient
from gateway.upstream.pop3 import POP3Client
from gateway.upstream.refusals import Answer, classify_folder_open, classify_login
from gateway.upstream.smtp import SMTPUpstreamError
from tests.helpers.smtp import Upstream as SMTPUpstream
from tests.helpers.upstream import ScriptedUpstream, failed, succeeded, unhandled_errors

M = RefusalKind.MISCONFIGURED
T = RefusalKind.TEMPORARY
K = RefusalKind.TOKEN_REFUSED

no_unhandled_errors = pytest.fixture(autouse=True)(unhandled_errors)

MS_SMTP_DISABLED = (
    b"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for "
    b"the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."
)
GOOGLE_APP_PASSWORD = (
    b"534-5.7.9 Application-specific password required. Learn more at\r\n"
    b"534 5.7.9  https://support.google.com/mail/?p=InvalidSecondFactor x1-20 - gsmtp"
)
GOOGLE_BAD_CREDENTIALS = (
    b"535-5.7.8 Username and Password not accepted. Learn more at\r\n"
    b"535 5.7.8  https://support.google.com/mail/?p=BadCredentials x1-20 - gsmtp"
)


# -- the pure classification ---------------------------------------------------------


def smtp(text: str) -> Answer:
    return Answer("smtp", text, reply_code=int(text[:3]))


def pop3(text: str, code: str | None = None) -> Answer:
    return Answer("pop3", text, response_code=code)


def imap(text: str, code: str | None = None) -> Answer:
    return Answer("imap", text, response_code=code)


@pytest.mark.parametrize(
    ("answer", "bearer", "challenge", "kind", "code", "advice"),
    [
        (
            smtp(MS_SMTP_DISABLED.decode()),
            True,
            None,
            M,
            "535 5.7.139",
            "aka.ms/smtp_auth_disabled",
        ),
        (smtp(MS_SMTP_DISABLED.decode()), False, None, M, "535 5.7.139", "Set-CASMailbox"),
        (
            smtp(
                "535 5.7.139 Authentication unsuccessful, user is locked by your "
                "organization's security defaults policy."
            ),
            False,
            None,
            M,
            "535 5.7.139",
            "security defaults",
        ),
        (smtp("535 5.7.3 Authentication unsuccessful"), True, None, K, "535 5.7.3", "token"),
        (smtp("535 5.7.3 Authentication unsuccessful"), False, None, M, "535 5.7.3", "password"),
        (smtp("432 4.3.2 Concurrent connections limit exceeded"), True, None, T, "432 4.3.2", "3"),
        (smtp("432 4.3.2 concurrent connection limit exceeded"), True, None, T, "432 4.3.2", "3"),
        (
            smtp("432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"),
            True,
            None,
            T,
            "432 4.3.2",
            "later",
        ),
        (
            smtp("550 5.7.30 Basic authentication is not supported for Client Submission."),
            False,
            None,
            M,
            "550 5.7.30",
            'auth = "oauth2"',
        ),
        (
            smtp("534 5.7.9 Application-specific password required."),
            False,
            None,
            M,
            "534 5.7.9",
            "app password",
        ),
        (
            smtp("535 5.7.8 Username and Password not accepted."),
            True,
            None,
            K,
            "535 5.7.8",
            "token",
        ),
        (
            smtp("535 5.7.8 Username and Password not accepted."),
            False,
            None,
            M,
            "535 5.7.8",
            "password",
        ),
        (smtp("454 4.7.0 Temporary authentication failure"), True, "401", T, "454 4.7.0", "later"),
        (
            smtp("535 5.7.8 Authentication credentials invalid"),
            True,
            "401",
            K,
            "SASL status 401",
            "token",
        ),
        (
            smtp("535 5.7.8 Authentication credentials invalid"),
            True,
            "403",
            M,
            "SASL status 403",
            "scopes",
        ),
        (
            smtp("535 5.7.8 Authentication credentials invalid"),
            True,
            "400",
            M,
            "SASL status 400",
            "username",
        ),
        (smtp("504 5.5.4 Unrecognized authentication type"), True, None, M, "504 5.5.4", "sasl"),
        (imap("NO AUTHENTICATE failed."), True, None, K, "NO AUTHENTICATE failed", "token"),
        (imap("NO AUTHENTICATE failed."), False, None, M, "NO AUTHENTICATE failed", "password"),
        (
            imap("BAD User is authenticated but not connected."),
            True,
            None,
            M,
            "BAD User is authenticated but not connected",
            "Add-MailboxPermission",
        ),
        (
            imap("NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)", "AUTHENTICATIONFAILED"),
            True,
            "401",
            K,
            "SASL status 401",
            "token",
        ),
        (
            imap("NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)", "AUTHENTICATIONFAILED"),
            False,
            None,
            M,
            "NO [AUTHENTICATIONFAILED]",
            "password",
        ),
        (
            imap("NO [UNAVAILABLE] try later", "UNAVAILABLE"),
            True,
            "401",
            T,
            "NO [UNAVAILABLE]",
            "later",
        ),
        (
            imap("NO [AUTHORIZATIONFAILED] no such authorization-ID", "AUTHORIZATIONFAILED"),
            True,
            None,
            M,
            "NO [AUTHORIZATIONFAILED]",
            "permissions",
        ),
        (imap("NO [EXPIRED] token expired", "EXPIRED"), True, None, K, "NO [EXPIRED]", "token"),
        (
            pop3("-ERR Authentication failure: unknown user name or bad password."),
            True,
            None,
            K,
            "-ERR Authentication failure",
            "token",
        ),
        (
            pop3("-ERR Authentication failure: unknown user name or bad password."),
            False,
            None,
            M,
            "-ERR Authentication failure",
            "password",
        ),
        (
            pop3("-ERR [SYS/PERM] Your account is not enabled for POP access.", "SYS/PERM"),
            True,
            None,
            M,
            "-ERR [SYS/PERM] not enabled for POP access",
            "Forwarding and POP/IMAP",
        ),
        (pop3("-ERR [SYS/TEMP] busy", "SYS/TEMP"), True, "403", T, "-ERR [SYS/TEMP]", "later"),
        (pop3("-ERR [IN-USE] locked", "IN-USE"), False, None, T, "-ERR [IN-USE]", "later"),
        (
            pop3("-ERR [AUTH] Authentication failed.", "AUTH"),
            True,
            "401",
            K,
            "SASL status 401",
            "token",
        ),
        (
            pop3("-ERR [AUTH] Authentication failed.", "AUTH"),
            True,
            "403",
            M,
            "SASL status 403",
            "scopes",
        ),
        (pop3("-ERR [AUTH] Authentication failed.", "AUTH"), True, None, K, "-ERR [AUTH]", "token"),
        (
            pop3("-ERR [AUTH] Authentication failed.", "AUTH"),
            False,
            None,
            M,
            "-ERR [AUTH]",
            "password",
        ),
        (
            pop3("-ERR [SYS/PERM] disabled", "SYS/PERM"),
            True,
            None,
            M,
            "-ERR [SYS/PERM]",
            "for good",
        ),
    ],
)
def test_classification(
    answer: Answer, bearer: bool, challenge: str | None, kind: RefusalKind, code: str, advice: str
) -> None:
    refusal = classify_login(answer, bearer=bearer, challenge_status=challenge)
    assert (refusal.kind, refusal.code) == (kind, code)
    assert advice in refusal.advice


def test_folder_open_refusals() -> None:
    rights = classify_folder_open(imap("BAD User is authenticated but not connected."))
    assert rights.kind is M and "Add-MailboxPermission" in rights.advice
    missing = classify_folder_open(imap("NO [NONEXISTENT] Mailbox doesn't exist", "NONEXISTENT"))
    assert (missing.kind, missing.code) == (M, "NO [NONEXISTENT]")
    assert "folder" in missing.advice
    assert classify_folder_open(imap("NO [LIMIT] too many", "LIMIT")).kind is T


def test_every_advice_is_one_sentence_without_a_newline() -> None:
    from gateway.upstream.refusals import PROVIDER_TEXTS

    for *_rest, advice in PROVIDER_TEXTS:
        assert "\n" not in advice and advice.strip() == advice and len(advice) < 400


# -- the login paths -----------------------------------------------------------------


class Tokens:
    """A TokenSource that also records login outcomes (`LoginOutcomes`)."""

    def __init__(self) -> None:
        self.calls: list[bool] = []
        self.refused: list[Refusal] = []
        self.succeeded = 0

    async def access_token(self, account: Account, *, force_refresh: bool = False) -> str:
        self.calls.append(force_refresh)
        return "fresh-token" if force_refresh else "stale-token"

    def login_refused(self, account: Account, refusal: Refusal) -> None:
        self.refused.append(refusal)

    def login_succeeded(self, account: Account) -> None:
        self.succeeded += 1


def test_the_fake_is_a_login_outcomes_recorder() -> None:
    assert isinstance(Tokens(), LoginOutcomes)


OAUTH = Account("scanner", "m365", "scanner@contoso.test", auth="oauth2", grant="device_code")
PASSWORD = Account("shop", "m365", "shop@contoso.test", password=Secret("pw"))
OAUTH_IMAP = Account(
    "scanner", "m365", "scanner@contoso.test", auth="oauth2", grant="device_code", mailbox="imap"
)


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(f"{event['log_level'].name} {formatEvent(event)}")

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def xoauth2(token: str) -> bytes:
    return b64(f"user=scanner@contoso.test\x01auth=Bearer {token}\x01\x01".encode())


class POP3Upstream(ScriptedUpstream):
    client = POP3Client
    port = 110

    def open(self, account: Account, tokens: Tokens, capa: bytes) -> Deferred[Any]:
        provider = Provider(name="m365", pop3=Endpoint("pop.example.test", 110, "starttls"))
        d = Deferred.fromCoroutine(
            open_pop3_maildrop(
                account,
                provider,
                reactor=self.clock,
                endpoint_factory=self.endpoint_factory,
                tokens=tokens,
            )
        )
        self.say(b"+OK ready\r\n")
        self.expect(b"CAPA\r\n", b"+OK\r\nSTLS\r\n.\r\n")
        self.expect(b"STLS\r\n", b"+OK Begin TLS\r\n")
        self.expect(b"CAPA\r\n", b"+OK\r\n" + capa + b".\r\n")
        return d


def test_pop3_refused_token_is_refreshed_once(log_lines: list[str]) -> None:
    tokens = Tokens()
    up = POP3Upstream()
    d = up.open(OAUTH, tokens, b"SASL XOAUTH2\r\n")
    refusal = b"-ERR Authentication failure: unknown user name or bad password.\r\n"
    up.expect(b"AUTH XOAUTH2 " + xoauth2("stale-token") + b"\r\n", refusal)
    up.expect(b"AUTH XOAUTH2 " + xoauth2("fresh-token") + b"\r\n", refusal)
    error = failed(d, UpstreamRejected)
    assert tokens.calls == [False, True]
    assert error.code == "SYS/PERM"
    assert "[-ERR Authentication failure] token refused" in error.detail
    assert "after one forced token refresh" in error.detail
    assert [r.kind for r in tokens.refused] == [K] and tokens.succeeded == 0
    assert any("[-ERR Authentication failure]; refreshing it once" in line for line in log_lines)


def test_pop3_not_enabled_is_misconfigured_and_not_retried() -> None:
    tokens = Tokens()
    up = POP3Upstream()
    d = up.open(OAUTH, tokens, b"SASL XOAUTH2\r\n")
    up.expect(
        b"AUTH XOAUTH2 " + xoauth2("stale-token") + b"\r\n",
        b"-ERR [SYS/PERM] Your account is not enabled for POP access.\r\n",
    )
    error = failed(d, UpstreamRejected)
    assert up.sent() == b""
    assert tokens.calls == [False]
    assert error.code == "SYS/PERM"
    assert str(error) == UpstreamRejected.device_text
    assert "Forwarding and POP/IMAP" in error.detail
    assert error.refusal is not None and error.refusal.kind is M
    assert tokens.refused == [error.refusal]


@pytest.mark.parametrize(
    ("line", "kind", "code"),
    [
        (b"-ERR [SYS/TEMP] Try again later\r\n", UpstreamUnavailable, "SYS/TEMP"),
        (b"-ERR [LOGIN-DELAY] wait\r\n", UpstreamUnavailable, "SYS/TEMP"),
        (b"-ERR [IN-USE] Mailbox locked\r\n", MailboxInUse, "IN-USE"),
    ],
)
def test_pop3_temporary_refusals(line: bytes, kind: type[Exception], code: str) -> None:
    tokens = Tokens()
    up = POP3Upstream()
    d = up.open(OAUTH, tokens, b"SASL XOAUTH2\r\n")
    up.expect(b"AUTH XOAUTH2 " + xoauth2("stale-token") + b"\r\n", line)
    error = failed(d, kind)
    assert error.code == code
    assert tokens.calls == [False]
    assert "temporary" in error.detail


def test_pop3_password_refusal_names_the_password() -> None:
    tokens = Tokens()
    up = POP3Upstream()
    d = up.open(PASSWORD, tokens, b"USER\r\n")
    up.expect(b"USER shop@contoso.test\r\n", b"+OK\r\n")
    up.expect(b"PASS pw\r\n", b"-ERR [AUTH] Invalid login\r\n")
    error = failed(d, UpstreamRejected)
    assert "check username and password_file" in error.detail
    assert tokens.calls == [] and tokens.refused == []  # password accounts: the log only


def test_pop3_success_is_recorded() -> None:
    tokens = Tokens()
    up = POP3Upstream()
    d = up.open(OAUTH, tokens, b"SASL XOAUTH2\r\n")
    up.expect(b"AUTH XOAUTH2 " + xoauth2("stale-token") + b"\r\n", b"+OK Logged in.\r\n")
    up.expect(b"LIST\r\n", b"+OK\r\n.\r\n")
    succeeded(d)
    assert tokens.succeeded == 1 and tokens.refused == []


class IMAPUpstream(ScriptedUpstream):
    client = IMAPClient
    port = 143

    def open(self, tokens: Tokens) -> Deferred[Any]:
        provider = Provider(name="m365", imap=Endpoint("imap.example.test", 143, "starttls"))
        d = Deferred.fromCoroutine(
            open_imap_maildrop(
                OAUTH_IMAP,
                provider,
                reactor=self.clock,
                uid_store=None,
                tokens=tokens,
                endpoint_factory=self.endpoint_factory,
            )
        )
        self.say(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] ready\r\n")
        self.expect(b"g1 STARTTLS\r\n", b"g1 OK go\r\n")
        self.expect(
            b"g2 CAPABILITY\r\n", b"* CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2\r\ng2 OK\r\n"
        )
        return d


def test_imap_no_mailbox_rights_is_misconfigured_and_not_retried() -> None:
    tokens = Tokens()
    up = IMAPUpstream()
    d = up.open(tokens)
    up.expect(
        b"g3 AUTHENTICATE XOAUTH2 " + xoauth2("stale-token") + b"\r\n",
        b"g3 OK AUTHENTICATE completed.\r\n",
    )
    up.expect(
        b'g4 EXAMINE "INBOX"\r\ng5 UID FETCH 1:* (UID RFC822.SIZE FLAGS)\r\n',
        b"g4 BAD User is authenticated but not connected.\r\n"
        b"g5 BAD User is authenticated but not connected.\r\n",
    )
    error = failed(d, UpstreamRejected)
    assert error.code == "SYS/PERM"
    assert "Add-MailboxPermission" in error.detail
    assert tokens.calls == [False]
    assert [r.code for r in tokens.refused] == ["BAD User is authenticated but not connected"]
    assert tokens.succeeded == 0
    assert up.aborted


def test_imap_authenticate_failed_is_refreshed_once() -> None:
    tokens = Tokens()
    up = IMAPUpstream()
    d = up.open(tokens)
    up.expect(
        b"g3 AUTHENTICATE XOAUTH2 " + xoauth2("stale-token") + b"\r\n",
        b"g3 NO AUTHENTICATE failed.\r\n",
    )
    up.expect(
        b"g4 AUTHENTICATE XOAUTH2 " + xoauth2("fresh-token") + b"\r\n",
        b"g4 NO AUTHENTICATE failed.\r\n",
    )
    error = failed(d, UpstreamRejected)
    assert tokens.calls == [False, True]
    assert "[NO AUTHENTICATE failed] token refused" in error.detail


def test_imap_google_challenge_then_authenticationfailed() -> None:
    tokens = Tokens()
    up = IMAPUpstream()
    d = up.open(tokens)
    challenge = b'{"status":"401","schemes":"Bearer","scope":"https://mail.google.com/"}'
    up.expect(
        b"g3 AUTHENTICATE XOAUTH2 " + xoauth2("stale-token") + b"\r\n",
        b"+ " + b64(challenge) + b"\r\n",
    )
    up.expect(b"\r\n", b"g3 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n")
    up.expect(
        b"g4 AUTHENTICATE XOAUTH2 " + xoauth2("fresh-token") + b"\r\n",
        b"g4 OK [CAPABILITY IMAP4rev1 UIDPLUS] Authenticated\r\n",
    )
    up.expect(
        b'g5 EXAMINE "INBOX"\r\ng6 UID FETCH 1:* (UID RFC822.SIZE FLAGS)\r\n',
        b"* 0 EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\ng5 OK [READ-ONLY] done\r\ng6 OK done\r\n",
    )
    succeeded(d)
    assert tokens.calls == [False, True]
    assert tokens.succeeded == 1


def test_imap_forbidden_challenge_is_not_retried() -> None:
    tokens = Tokens()
    up = IMAPUpstream()
    d = up.open(tokens)
    up.expect(
        b"g3 AUTHENTICATE XOAUTH2 " + xoauth2("stale-token") + b"\r\n",
        b"+ " + b64(b'{"status":"403"}') + b"\r\n",
    )
    up.expect(b"\r\n", b"g3 NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)\r\n")
    error = failed(d, UpstreamRejected)
    assert tokens.calls == [False]
    assert "[SASL status 403]" in error.detail


# -- SMTP ---------------------------------------------------------------------------

SMTP_PROVIDER = Provider("m365", smtp=Endpoint("smtp.example.test", 587))


def smtp_login(account: Account, *replies: bytes) -> tuple[SMTPUpstream, Tokens, Any]:
    from twisted.internet.testing import MemoryReactorClock

    upstream = SMTPUpstream(MemoryReactorClock())
    upstream.script.extensions = ("AUTH PLAIN LOGIN XOAUTH2",)
    upstream.script.auth_replies = list(replies)
    tokens = Tokens()
    d = Deferred.fromCoroutine(upstream.open_session(account, SMTP_PROVIDER, tokens))
    upstream.settle()
    results: list[Any] = []
    d.addBoth(results.append)
    assert results
    return upstream, tokens, results[0]


def smtp_failure(result: Any) -> SMTPUpstreamError:
    from twisted.python.failure import Failure

    assert isinstance(result, Failure), result
    assert isinstance(result.value, SMTPUpstreamError)
    return result.value


def test_smtp_auth_disabled_is_misconfigured_and_not_retried() -> None:
    upstream, tokens, result = smtp_login(OAUTH, MS_SMTP_DISABLED)
    error = smtp_failure(result)
    assert tokens.calls == [False] and upstream.tokens_seen == ["stale-token"]
    assert error.admin and error.refusal is not None and error.refusal.kind is M
    assert "[535 5.7.139]" in error.detail and "https://aka.ms/smtp_auth_disabled" in error.detail
    assert tokens.refused == [error.refusal]


@pytest.mark.parametrize(
    "reply", [b"535 5.7.3 Authentication unsuccessful [SN4PR0401CA0001]", GOOGLE_BAD_CREDENTIALS]
)
def test_smtp_refused_token_is_refreshed_once(reply: bytes) -> None:
    upstream, tokens, result = smtp_login(OAUTH, reply, reply)
    error = smtp_failure(result)
    assert tokens.calls == [False, True]
    assert upstream.tokens_seen == ["stale-token", "fresh-token"]
    assert error.refusal is not None and error.refusal.kind is K
    assert "after one forced token refresh" in error.detail
    assert "fresh-token" not in error.detail and "stale-token" not in error.detail


def test_smtp_refused_token_then_accepted() -> None:
    _upstream, tokens, result = smtp_login(
        OAUTH, b"535 5.7.3 Authentication unsuccessful", b"235 2.7.0 Authentication successful"
    )
    assert not isinstance(result, Exception) and tokens.calls == [False, True]
    assert tokens.succeeded == 1


def test_smtp_concurrent_connection_limit_is_temporary() -> None:
    _upstream, tokens, result = smtp_login(
        OAUTH, b"432 4.3.2 Concurrent connections limit exceeded"
    )
    error = smtp_failure(result)
    assert tokens.calls == [False]
    assert not error.admin and error.refusal is not None and error.refusal.kind is T


@pytest.mark.parametrize(
    ("reply", "code", "advice"),
    [
        (
            b"550 5.7.30 Basic authentication is not supported for Client Submission.",
            "550 5.7.30",
            'auth = "oauth2"',
        ),
        (GOOGLE_APP_PASSWORD, "534 5.7.9", "app password"),
        (GOOGLE_BAD_CREDENTIALS, "535 5.7.8", "password_file"),
    ],
)
def test_smtp_password_refusals(reply: bytes, code: str, advice: str) -> None:
    upstream, tokens, result = smtp_login(PASSWORD, reply)
    error = smtp_failure(result)
    assert upstream.auth_attempts == [b"PLAIN"]
    assert error.admin and error.refusal is not None
    assert (error.refusal.kind, error.refusal.code) == (M, code)
    assert advice in error.detail
    assert tokens.refused == []  # password accounts: the log only


# -- what the device hears and the admin reads -------------------------------------------


class FrontEnd:
    """The POP3 front end (`tests.unit.test_pop3_server.Gateway`) opening its maildrop
    through the real POP3 upstream session against a scripted upstream."""

    def __init__(self) -> None:
        from tests.unit.test_pop3_server import Gateway

        self.upstream = POP3Upstream()
        self.tokens = Tokens()
        upstream, tokens = self.upstream, self.tokens

        class Wired(Gateway):
            async def _open(self, account: Account) -> Any:
                provider = Provider(name="m365", pop3=Endpoint("pop.example.test", 110, "starttls"))
                return await open_pop3_maildrop(
                    OAUTH,
                    provider,
                    reactor=upstream.clock,
                    endpoint_factory=upstream.endpoint_factory,
                    tokens=tokens,
                )

        self.gateway = Wired()

    def device_login(self, *answers: bytes) -> bytes:
        """A device logs in; the upstream answers each AUTH with the next of `answers`."""
        device = self.gateway.connect()
        device.send(b"USER printer")
        device.proto.dataReceived(b"PASS printer-pw\r\n")
        up = self.upstream
        up.say(b"+OK ready\r\n")
        up.expect(b"CAPA\r\n", b"+OK\r\nSTLS\r\n.\r\n")
        up.expect(b"STLS\r\n", b"+OK Begin TLS\r\n")
        up.expect(b"CAPA\r\n", b"+OK\r\nSASL XOAUTH2\r\n.\r\n")
        for answer, token in zip(answers, ("stale-token", "fresh-token"), strict=False):
            up.expect(b"AUTH XOAUTH2 " + xoauth2(token) + b"\r\n", answer)
        assert up.sent() == b""
        return device.read()


@pytest.mark.parametrize(
    ("answers", "reply", "level", "logged", "calls"),
    [
        (
            [b"-ERR [SYS/PERM] Your account is not enabled for POP access.\r\n"],
            b"-ERR [SYS/PERM] the gateway cannot log in to the mailbox, ask the administrator",
            "error",
            "[-ERR [SYS/PERM] not enabled for POP access] gateway or app misconfigured: "
            "POP is off for this Gmail mailbox",
            [False],
        ),
        (
            [b"-ERR [SYS/TEMP] Server busy\r\n"],
            b"-ERR [SYS/TEMP] mailbox temporarily unavailable, try again later",
            "warn",
            "[-ERR [SYS/TEMP]] temporary: the server is busy",
            [False],
        ),
        (
            [b"-ERR Authentication failure: unknown user name or bad password.\r\n"] * 2,
            b"-ERR [SYS/PERM] the gateway cannot log in to the mailbox, ask the administrator",
            "error",
            "after one forced token refresh; [-ERR Authentication failure] token refused",
            [False, True],
        ),
    ],
)
def test_device_answer_and_log_line(
    answers: list[bytes],
    reply: bytes,
    level: str,
    logged: str,
    calls: list[bool],
    log_lines: list[str],
) -> None:
    front = FrontEnd()
    assert front.device_login(*answers) == reply + b"\r\n"
    assert front.tokens.calls == calls
    lines = [line for line in log_lines if "pop3 upstream login failed" in line]
    assert len(lines) == 1 and lines[0].startswith(level), lines
    assert logged in lines[0]
    assert "stale-token" not in lines[0] and "fresh-token" not in lines[0]
