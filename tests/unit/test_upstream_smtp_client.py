"""The upstream SMTP client on in-memory transports: replies, pipelining, exact
dot-stuffing at every chunk boundary, STARTTLS injection, timeouts, AUTH."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport

from gateway.model import Account, Provider, Secret
from gateway.upstream import smtp
from gateway.upstream.smtp import (
    Reply,
    ReplyParser,
    SMTPClient,
    SMTPProtocolError,
    SMTPUpstreamError,
    send_message,
)
from gateway.upstream.smtp import client as smtp_client
from tests.helpers.smtp import Upstream

ACCOUNT = Account("scanner", "corp", "scanner@example.com", password=Secret("account-pw"))
PROVIDER = Provider("corp")


def replies(data: bytes) -> list[Reply]:
    parser = ReplyParser()
    parser.feed(data)
    out = []
    while (reply := parser.next_reply()) is not None:
        out.append(reply)
    return out


def test_reply_parser_multi_line_and_split() -> None:
    parser = ReplyParser()
    parser.feed(b"250-smtp.example\r\n250-PIPELINING\r\n25")
    assert parser.next_reply() is None
    parser.feed(b"0 SIZE 1000\r\n550 5.1.1 <x@y> no such user\r\n")
    ehlo = parser.next_reply()
    assert ehlo is not None and ehlo.code == 250
    assert ehlo.keywords() == {"PIPELINING": "", "SIZE": "1000"}
    bad = parser.next_reply()
    assert bad is not None and bad.permanent and bad.enhanced == "5.1.1"
    assert bad.describe() == "550 5.1.1 <x@y> no such user"


def test_reply_parser_rejects_garbage() -> None:
    with pytest.raises(SMTPProtocolError):
        replies(b"hello\r\n")
    with pytest.raises(SMTPProtocolError):
        replies(b"250-a\r\n251 b\r\n")
    assert replies(b"220\r\n")[0].code == 220
    assert Reply(451, (b"try later",)).enhanced is None


def stuffed(message: bytes) -> bytes:
    """An independent oracle for RFC 5321 4.5.2 as the relay applies it."""
    wire = re.sub(rb"(?m)^\.", b"..", message)
    if message and not message.endswith(b"\r\n"):
        wire += b"\n" if message.endswith(b"\r") else b"\r\n"
    return wire + b".\r\n"


def deliver(upstream: Upstream, message: bytes, **kwargs: Any) -> smtp.Transmission:
    client = connect(upstream)
    d = Deferred.fromCoroutine(
        send_message(
            client,
            sender="dev@scan.example.com",
            recipients=kwargs.get("recipients", ["a@example.org"]),
            source=io.BytesIO(message + b"TRAILER-NOT-SENT"),
            size=len(message),
            eight_bit=False,
        )
    )
    upstream.settle()
    assert d.called
    return d.result  # type: ignore[no-any-return]


def connect(upstream: Upstream) -> SMTPClient:
    d = Deferred.fromCoroutine(upstream.open_session(ACCOUNT, PROVIDER))
    upstream.settle()
    return d.result  # type: ignore[no-any-return]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.sampled_from([b".", b"..", b".x", b"\r\n", b"\n", b"\r", b"a", b"bc", b"\r\n."]),
        max_size=40,
    ),
    st.integers(min_value=1, max_value=9),
)
def test_dot_stuffing_at_every_chunk_boundary(parts: list[bytes], chunk: int) -> None:
    message = b"".join(parts)
    clock = MemoryReactorClock()
    upstream = Upstream(clock)
    original = smtp_client.CHUNK_SIZE
    smtp_client.CHUNK_SIZE = chunk
    try:
        result = deliver(upstream, message)
    finally:
        smtp_client.CHUNK_SIZE = original
    assert result.delivered() == ["a@example.org"]
    wire = b"".join(upstream.log).split(b"DATA\r\n", 1)[1]
    assert wire == stuffed(message)
    # The trailer after `size` bytes (the spool's envelope) never goes out.
    assert b"TRAILER" not in wire


def test_pipelined_transaction_is_one_round_trip(tmp_path: Any) -> None:
    upstream = Upstream(MemoryReactorClock())
    upstream.script.rcpt_replies[b"b@example.org"] = b"550 5.1.1 unknown"
    upstream.script.rcpt_replies[b"c@example.org"] = b"451 4.3.0 later"
    result = deliver(
        upstream, b"x\r\n", recipients=["a@example.org", "b@example.org", "c@example.org"]
    )
    assert result.delivered() == ["a@example.org"]
    assert list(result.failed()) == ["b@example.org"]
    assert list(result.deferred()) == ["c@example.org"]
    batch = next(chunk for chunk in upstream.log if chunk.startswith(b"MAIL"))
    assert batch.count(b"\r\n") == 5 and batch.endswith(b"DATA\r\n")


def test_without_pipelining_commands_wait_for_replies() -> None:
    upstream = Upstream(MemoryReactorClock())
    upstream.script.extensions = ("AUTH PLAIN",)
    upstream.script.mail_reply = b"553 5.7.1 sender refused"
    result = deliver(upstream, b"x\r\n", recipients=["a@example.org", "b@example.org"])
    assert {r.code for r in result.replies.values()} == {553}
    assert not any(chunk.startswith(b"RCPT") for chunk in upstream.log)
    assert upstream.log[-1] == b"RSET\r\n"


def test_login_falls_back_to_login_mechanism() -> None:
    upstream = Upstream(MemoryReactorClock())
    upstream.script.extensions = ("PIPELINING", "AUTH LOGIN")
    client = connect(upstream)
    assert not client.ended
    assert any(chunk == b"AUTH LOGIN\r\n" for chunk in upstream.log)


def test_refused_login_is_an_admin_error_without_the_password() -> None:
    upstream = Upstream(MemoryReactorClock())
    upstream.script.password = b"other"
    d = Deferred.fromCoroutine(upstream.open_session(ACCOUNT, PROVIDER))
    upstream.settle()
    failure = d.result
    d.addErrback(lambda _: None)
    assert isinstance(failure.value, SMTPUpstreamError) and failure.value.admin
    assert "535 5.7.8" in failure.value.detail and "account-pw" not in failure.value.detail


def test_data_after_the_starttls_answer_ends_the_session() -> None:
    clock = MemoryReactorClock()
    client = SMTPClient(clock, 30, peer="mitm")
    transport = StringTransport()
    client.makeConnection(transport)
    client.dataReceived(b"220 hi\r\n")
    d = client.starttls(object())  # type: ignore[arg-type]
    client.dataReceived(b"220 go ahead\r\n250 injected\r\n")
    assert client.ended
    # Dropped at once: nothing more is sent, in clear or as a TLS handshake.
    assert transport.disconnecting
    assert transport.value() == b"STARTTLS\r\n"
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and "after its STARTTLS answer" in str(failures[0].value)


def test_silent_upstream_times_out() -> None:
    clock = MemoryReactorClock()
    client = SMTPClient(clock, 30, peer="slow")
    client.makeConnection(StringTransport())
    client.dataReceived(b"220 hi\r\n")
    d = client.command(b"NOOP")
    clock.advance(20)
    assert not d.called
    clock.advance(10.5)
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and "sent nothing for 30 s" in str(failures[0].value)
    assert clock.getDelayedCalls() == []


def test_connection_lost_fails_everything_pending() -> None:
    clock = MemoryReactorClock()
    client = SMTPClient(clock, 30, peer="flaky")
    client.makeConnection(StringTransport())
    client.dataReceived(b"220 hi\r\n")
    d1, d2 = client.command(b"NOOP"), client.command(b"NOOP")
    client.connectionLost()
    for d in (d1, d2):
        failures: list[Any] = []
        d.addErrback(failures.append)
        assert isinstance(failures[0].value, SMTPUpstreamError)
    later: list[Any] = []
    client.command(b"NOOP").addErrback(later.append)
    assert later


class Tokens:
    """A token source whose current token goes stale until force-refreshed."""

    def __init__(self) -> None:
        self.calls: list[bool] = []

    async def access_token(self, account: Account, *, force_refresh: bool = False) -> str:
        self.calls.append(force_refresh)
        return "fresh-token" if force_refresh else "stale-token"


def test_xoauth2_refreshes_once_after_a_refused_token() -> None:
    upstream = Upstream(MemoryReactorClock())
    upstream.script.extensions = ("PIPELINING", "AUTH PLAIN XOAUTH2")
    upstream.script.tokens = ("fresh-token",)
    oauth = Account("m365", "corp", "scanner@example.com", auth="oauth2")
    tokens = Tokens()
    d = Deferred.fromCoroutine(upstream.open_session(oauth, PROVIDER, tokens))
    upstream.settle()
    assert isinstance(d.result, SMTPClient)
    assert tokens.calls == [False, True]
    assert upstream.tokens_seen == ["stale-token", "fresh-token"]
    # The error challenge was answered (an empty line), not taken as the end.
    assert upstream.log.count(b"\r\n") == 1


def test_xoauth2_refused_twice_is_an_admin_error() -> None:
    upstream = Upstream(MemoryReactorClock())
    upstream.script.extensions = ("AUTH XOAUTH2",)
    oauth = Account("m365", "corp", "scanner@example.com", auth="oauth2")
    tokens = Tokens()
    d = Deferred.fromCoroutine(upstream.open_session(oauth, PROVIDER, tokens))
    upstream.settle()
    failure = d.result
    d.addErrback(lambda _: None)
    assert isinstance(failure.value, SMTPUpstreamError) and failure.value.admin
    assert tokens.calls == [False, True]
    assert "fresh-token" not in failure.value.detail and "stale-token" not in failure.value.detail
