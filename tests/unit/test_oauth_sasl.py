"""Bearer-token logins upstream: `mechanism_for`, and POP3 AUTH XOAUTH2/OAUTHBEARER
on an in-memory connection (one-step and two-step forms, the JSON error
challenge, one forced refresh and one retry after a 401, never a loop)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from gateway.maildrop import UpstreamRejected, UpstreamUnavailable
from gateway.maildrop.pop3 import open_pop3_maildrop
from gateway.model import Account, Endpoint, Provider, Secret
from gateway.upstream.credentials import (
    bearer_mechanism_name,
    mechanism_for,
    retry_with_fresh_token,
)
from gateway.upstream.pop3 import POP3Client
from gateway.upstream.sasl import BearerError, OAuthBearer, Plain, XOAuth2

ACCOUNT = Account("scanner", "m365", "scanner@contoso.test", auth="oauth2", grant="device_code")
PASSWORD_ACCOUNT = Account("shop", "m365", "shop@contoso.test", password=Secret("pw"))


def provider(sasl: Any = "auto") -> Provider:
    return Provider(name="m365", pop3=Endpoint("pop.example.test", 995, "starttls"), sasl=sasl)


class Tokens:
    """A TokenSource handing out tokens in order; records every call."""

    def __init__(self, *tokens: str, error: Exception | None = None) -> None:
        self.tokens = list(tokens)
        self.calls: list[bool] = []
        self.error = error

    async def access_token(self, account: Account, *, force_refresh: bool = False) -> str:
        self.calls.append(force_refresh)
        if self.error is not None:
            raise self.error
        return self.tokens.pop(0) if len(self.tokens) > 1 else self.tokens[0]


def run(coroutine: Any) -> Any:
    results: list[Any] = []
    ensureDeferred(coroutine).addBoth(results.append)
    assert results, "still waiting"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


# -- choosing the mechanism ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("sasl", "offered", "expected"),
    [
        ("auto", {"PLAIN", "XOAUTH2"}, "XOAUTH2"),
        ("auto", {"XOAUTH2", "OAUTHBEARER"}, "OAUTHBEARER"),
        ("auto", {"oauthbearer"}, "OAUTHBEARER"),
        ("auto", set(), "XOAUTH2"),
        ("xoauth2", {"OAUTHBEARER"}, "XOAUTH2"),
        ("oauthbearer", {"XOAUTH2"}, "OAUTHBEARER"),
    ],
)
def test_mechanism_choice(sasl: Any, offered: set[str], expected: str) -> None:
    assert bearer_mechanism_name(provider(sasl), offered) == expected


def test_no_bearer_mechanism_offered() -> None:
    with pytest.raises(UpstreamRejected) as info:
        bearer_mechanism_name(provider(), {"PLAIN", "LOGIN"})
    assert "offers neither XOAUTH2 nor OAUTHBEARER" in info.value.detail


def test_password_account_gets_plain() -> None:
    mechanism = run(mechanism_for(PASSWORD_ACCOUNT, provider(), {"XOAUTH2"}, None))
    assert isinstance(mechanism, Plain)


def test_oauth_account_gets_a_token_mechanism() -> None:
    tokens = Tokens("tok-1")
    mechanism = run(mechanism_for(ACCOUNT, provider(), {"XOAUTH2"}, tokens, force_refresh=True))
    assert isinstance(mechanism, XOAuth2)
    assert mechanism.initial_response() == b"user=scanner@contoso.test\x01auth=Bearer tok-1\x01\x01"
    assert tokens.calls == [True]
    assert "tok-1" not in repr(mechanism)


def test_oauthbearer_initial_response() -> None:
    mechanism = run(mechanism_for(ACCOUNT, provider(), {"OAUTHBEARER"}, Tokens("tok")))
    assert isinstance(mechanism, OAuthBearer)
    assert mechanism.initial_response() == b"n,a=scanner@contoso.test,\x01auth=Bearer tok\x01\x01"


def test_oauth_account_without_token_manager_is_temporary() -> None:
    with pytest.raises(UpstreamUnavailable):
        run(mechanism_for(ACCOUNT, provider(), {"XOAUTH2"}, None))


def test_token_source_errors_pass_through() -> None:
    tokens = Tokens(error=UpstreamRejected("needs re-authorisation", "expired"))
    with pytest.raises(UpstreamRejected, match="expired"):
        run(mechanism_for(ACCOUNT, provider(), {"XOAUTH2"}, tokens))


@pytest.mark.parametrize(
    ("challenge", "status", "retry"),
    [
        (b'{"status":"401","schemes":"bearer","scope":"mail"}', "401", True),
        (b'{"status":"invalid_token"}', "invalid_token", True),
        (b'{"status":"403"}', "403", False),
        (b'{"status":"insufficient_scope","scope":"mail"}', "insufficient_scope", False),
        (b"not json", "unreadable", False),
    ],
)
def test_error_challenge_decides_the_retry(challenge: bytes, status: str, retry: bool) -> None:
    mechanism = XOAuth2("u", Secret("t"))
    assert mechanism.respond(challenge) == b""
    assert mechanism.error is not None and mechanism.error.status == status
    assert retry_with_fresh_token(mechanism, already_forced=False) is retry
    assert retry_with_fresh_token(mechanism, already_forced=True) is False


def test_no_challenge_at_all_is_worth_one_retry() -> None:
    assert retry_with_fresh_token(XOAuth2("u", Secret("t")), already_forced=False)
    assert not retry_with_fresh_token(Plain("u", Secret("p")), already_forced=False)


def test_bearer_error_keeps_only_printable_words() -> None:
    error = BearerError.parse(json.dumps({"status": "401\r\nX", "scope": "a b"}).encode())
    assert error.describe() == "status=401??X scope=a?b"


# -- POP3 AUTH on an in-memory connection ---------------------------------------------


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


class TLSRecordingTransport(StringTransport):
    """STLS is recorded, not performed: TLS itself is tested elsewhere."""

    def startTLS(self, options: Any) -> None:
        self.tls = options


class Upstream:
    """The far end of one in-memory POP3 connection (after STLS), played by the test."""

    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.transport = TLSRecordingTransport()
        self.protocol: POP3Client | None = None

    def endpoint_factory(self, reactor: Any, host: str, port: int, timeout: float) -> Upstream:
        return self

    def connect(self, factory: Factory) -> Deferred[Any]:
        protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 995))
        assert isinstance(protocol, POP3Client)
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        return succeed(protocol)

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def say(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.dataReceived(data)

    def open(self, tokens: Tokens, capa: bytes, sasl: Any = "auto") -> Deferred[Any]:
        prov = Provider(name="m365", pop3=Endpoint("pop.example.test", 110, "starttls"), sasl=sasl)
        d = Deferred.fromCoroutine(
            open_pop3_maildrop(
                ACCOUNT,
                prov,
                reactor=self.clock,
                endpoint_factory=self.endpoint_factory,
                tokens=tokens,
            )
        )
        self.say(b"+OK ready\r\n")
        assert self.sent() == b"CAPA\r\n"
        self.say(b"+OK\r\nSTLS\r\n.\r\n")
        assert self.sent() == b"STLS\r\n"
        self.say(b"+OK Begin TLS\r\n")
        assert self.sent() == b"CAPA\r\n"
        self.say(b"+OK\r\n" + capa + b".\r\n")
        return d

    def finish_list(self, d: Deferred[Any]) -> Any:
        assert self.sent() == b"LIST\r\n"
        self.say(b"+OK\r\n1 10\r\n.\r\n")
        results: list[Any] = []
        d.addBoth(results.append)
        assert results and not isinstance(results[0], Failure), results
        return results[0]


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def xoauth2(token: str) -> bytes:
    return f"user=scanner@contoso.test\x01auth=Bearer {token}\x01\x01".encode()


CHALLENGE_401 = b"+ " + b64(b'{"status":"401","schemes":"bearer"}') + b"\r\n"


def test_one_step_auth_with_initial_response() -> None:
    up = Upstream()
    d = up.open(Tokens("short-token"), b"SASL PLAIN XOAUTH2\r\n")
    assert up.sent() == b"AUTH XOAUTH2 " + b64(xoauth2("short-token")) + b"\r\n"
    up.say(b"+OK Logged in.\r\n")
    assert up.finish_list(d).sizes == (10,)


def test_two_step_auth_for_a_real_sized_token() -> None:
    token = "eyJ0" + "x" * 1500
    up = Upstream()
    d = up.open(Tokens(token), b"SASL XOAUTH2 OAUTHBEARER\r\n")
    # OAUTHBEARER preferred; a 1.5 KB token does not fit in a 255-octet command.
    assert up.sent() == b"AUTH OAUTHBEARER\r\n"
    up.say(b"+ \r\n")
    expected = f"n,a=scanner@contoso.test,\x01auth=Bearer {token}\x01\x01".encode()
    assert up.sent() == b64(expected) + b"\r\n"
    up.say(b"+OK Logged in.\r\n")
    up.finish_list(d)


def test_a_refused_token_gets_one_forced_refresh_and_one_retry(log_lines: list[str]) -> None:
    tokens = Tokens("old-token", "new-token")
    up = Upstream()
    d = up.open(tokens, b"SASL XOAUTH2\r\n")
    assert up.sent() == b"AUTH XOAUTH2 " + b64(xoauth2("old-token")) + b"\r\n"
    up.say(CHALLENGE_401)
    assert up.sent() == b"\r\n"  # XOAUTH2 answers the error challenge with an empty line
    up.say(b"-ERR [AUTH] Authentication failed.\r\n")
    assert up.sent() == b"AUTH XOAUTH2 " + b64(xoauth2("new-token")) + b"\r\n"
    up.say(b"+OK Logged in.\r\n")
    up.finish_list(d)
    assert tokens.calls == [False, True]
    assert any("status=401" in line and "refreshing it once" in line for line in log_lines)
    assert not any("old-token" in line or "new-token" in line for line in log_lines)


def test_a_second_refusal_is_final(log_lines: list[str]) -> None:
    tokens = Tokens("old-token", "new-token")
    up = Upstream()
    d = up.open(tokens, b"SASL OAUTHBEARER\r\n")
    for _ in range(2):
        assert up.sent().startswith(b"AUTH OAUTHBEARER ")
        up.say(CHALLENGE_401)
        assert up.sent() == b"AQ==\r\n"  # OAUTHBEARER answers with %x01
        up.say(b"-ERR [AUTH] Authentication failed.\r\n")
    assert up.sent() == b""  # no third attempt
    failures: list[Failure] = []
    d.addErrback(failures.append)
    error = failures[0].value
    assert isinstance(error, UpstreamRejected)
    assert str(error) == UpstreamRejected.device_text
    assert "status=401" in error.detail and "after one forced token refresh" in error.detail
    assert "mechanism OAUTHBEARER" in error.detail
    for text in (error.detail, str(error), repr(error), *log_lines):
        assert "old-token" not in text and "new-token" not in text
    assert tokens.calls == [False, True]
    # The session is over and dropped from our side, without QUIT.
    assert up.protocol is not None and up.protocol.ended
    assert up.transport.disconnecting
    assert up.sent() == b""


def test_forbidden_is_not_retried() -> None:
    tokens = Tokens("token")
    up = Upstream()
    d = up.open(tokens, b"SASL XOAUTH2\r\n")
    up.sent()
    up.say(b"+ " + b64(b'{"status":"403"}') + b"\r\n")
    assert up.sent() == b"\r\n"
    up.say(b"-ERR [AUTH] Authentication failed.\r\n")
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(UpstreamRejected)
    assert "status=403" in failures[0].value.detail
    assert tokens.calls == [False]


def test_temporary_upstream_refusal_stays_temporary() -> None:
    tokens = Tokens("token")
    up = Upstream()
    d = up.open(tokens, b"SASL XOAUTH2\r\n")
    up.sent()
    up.say(b"+ " + b64(b'{"status":"403"}') + b"\r\n")
    up.sent()
    up.say(b"-ERR [SYS/TEMP] Temporary authentication failure\r\n")
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(UpstreamUnavailable)


def test_token_manager_refusal_sends_nothing_upstream() -> None:
    tokens = Tokens(error=UpstreamRejected("needs re-authorisation", "authorisation expired"))
    up = Upstream()
    d = up.open(tokens, b"SASL XOAUTH2\r\n")
    assert up.sent() == b""
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures and str(failures[0].value) == "authorisation expired"
    # The session is over and dropped from our side, without QUIT.
    assert up.protocol is not None and up.protocol.ended
    assert up.transport.disconnecting
    assert up.sent() == b""
