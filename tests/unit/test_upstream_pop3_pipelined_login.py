"""The login and the LIST snapshot in one write when the upstream announced PIPELINING.

RFC 2449 lets a client send commands without waiting for each answer when
the server says PIPELINING. A one-line AUTH PLAIN and the LIST that takes the
snapshot then travel together; a refused login must be classified exactly as
without pipelining, the answer to the LIST behind it ignored.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import LogEvent

from gateway.maildrop import (
    MailboxInUse,
    MaildropError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.maildrop.pop3 import POP3Maildrop, open_pop3_maildrop
from gateway.model import Account, Endpoint, Provider, Secret
from gateway.upstream.pop3 import POP3Client
from tests.helpers.upstream import ScriptedUpstream, failed, succeeded, unhandled_errors

PASSWORD = "s3cret-Pa55"
ACCOUNT = Account(
    "shop", provider="example", username="shop@example.test", password=Secret(PASSWORD)
)
AUTH = b"AUTH PLAIN " + base64.b64encode(f"\0shop@example.test\0{PASSWORD}".encode()) + b"\r\n"
PIPELINING = b"SASL PLAIN\r\nPIPELINING\r\n"


@pytest.fixture(autouse=True)
def _no_unhandled_errors() -> Iterator[list[LogEvent]]:
    yield from unhandled_errors()


class Upstream(ScriptedUpstream):
    client = POP3Client
    port = 995

    def open(self, method: Any = "auto", account: Account = ACCOUNT) -> Deferred[Any]:
        provider = Provider(
            "example", pop3=Endpoint("pop.example.test", 995, "starttls"), pop3_auth=method
        )
        return Deferred.fromCoroutine(
            open_pop3_maildrop(
                account, provider, reactor=self.clock, endpoint_factory=self.endpoint_factory
            )
        )

    def reach_login(self, capa: bytes, method: str = "auto", account: Account = ACCOUNT) -> Any:
        d = self.open(method, account)
        self.say(b"+OK ready\r\n")
        self.expect(b"CAPA\r\n", b"+OK\r\nSTLS\r\n.\r\n")
        self.expect(b"STLS\r\n", b"+OK\r\n")
        self.expect(b"CAPA\r\n", b"+OK\r\n" + capa + b".\r\n")
        return d


def test_auth_and_list_go_out_in_one_write() -> None:
    up = Upstream()
    d = up.reach_login(PIPELINING)
    assert up.sent() == AUTH + b"LIST\r\n"
    up.say(b"+OK Logged in.\r\n+OK 2 messages\r\n1 10\r\n2 20\r\n.\r\n")
    maildrop = succeeded(d)
    assert isinstance(maildrop, POP3Maildrop)
    assert maildrop.sizes == (10, 20)
    assert maildrop.client.logged_in


def test_without_pipelining_list_waits_for_the_login() -> None:
    up = Upstream()
    d = up.reach_login(b"SASL PLAIN\r\n")
    up.expect(AUTH, b"+OK Logged in.\r\n")
    up.expect(b"LIST\r\n", b"+OK\r\n1 10\r\n.\r\n")
    assert succeeded(d).sizes == (10,)


def test_user_pass_is_not_pipelined() -> None:
    up = Upstream()
    d = up.reach_login(PIPELINING, method="user")
    up.expect(b"USER shop@example.test\r\n", b"+OK\r\n")
    up.expect(f"PASS {PASSWORD}\r\n".encode(), b"+OK Logged in.\r\n")
    up.expect(b"LIST\r\n", b"+OK\r\n.\r\n")
    assert succeeded(d).sizes == ()


def test_an_initial_response_too_long_for_the_line_is_not_pipelined() -> None:
    account = Account("a", "example", "u" * 200, password=Secret("p" * 40))
    up = Upstream()
    d = up.reach_login(PIPELINING, method="plain", account=account)
    up.expect(b"AUTH PLAIN\r\n", b"+ \r\n")
    ir = base64.b64encode(b"\0" + b"u" * 200 + b"\0" + b"p" * 40)
    up.expect(ir + b"\r\n", b"+OK\r\n")
    up.expect(b"LIST\r\n", b"+OK\r\n1 5\r\n.\r\n")
    assert succeeded(d).sizes == (5,)


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (b"-ERR [AUTH] Authentication failed.\r\n", UpstreamRejected),
        (b"-ERR [SYS/PERM] account disabled\r\n", UpstreamRejected),
        (b"-ERR [IN-USE] Mailbox is locked by another POP3 session\r\n", MailboxInUse),
        (b"-ERR [SYS/TEMP] Temporary authentication failure\r\n", UpstreamUnavailable),
    ],
)
@pytest.mark.parametrize(
    "after", [b"-ERR Unknown command.\r\n", b"+OK 1 messages:\r\n1 5\r\n.\r\n", b""]
)
def test_a_refused_pipelined_login_is_classified_as_before(
    answer: bytes, kind: type[MaildropError], after: bytes
) -> None:
    up = Upstream()
    d = up.reach_login(PIPELINING)
    assert up.sent() == AUTH + b"LIST\r\n"
    up.say(answer + after)
    error = failed(d, kind)
    # Exactly what the same refusal gives without pipelining.
    plain = Upstream()
    d = plain.reach_login(b"SASL PLAIN\r\n")
    plain.expect(AUTH, answer)
    unpipelined = failed(d, kind)
    assert str(error) == str(unpipelined) == kind.device_text
    assert error.detail == unpipelined.detail
    assert "refused the login (AUTH)" in error.detail
    assert up.aborted
    assert up.clock.getDelayedCalls() == []


def test_a_challenge_to_a_pipelined_auth_ends_the_session() -> None:
    """The server would have read the LIST line as the answer to its challenge."""
    up = Upstream()
    d = up.reach_login(PIPELINING)
    assert up.sent() == AUTH + b"LIST\r\n"
    up.say(b"+ \r\n")
    error = failed(d, UpstreamUnavailable)
    assert "challenge to a pipelined AUTH" in error.detail
    assert up.sent() == b""
    assert up.aborted


def test_a_connection_lost_after_the_pipelined_login_is_unavailable() -> None:
    up = Upstream()
    d = up.reach_login(PIPELINING)
    up.sent()
    up.say(b"+OK Logged in.\r\n")
    up.drop()
    failed(d, UpstreamUnavailable)
