"""The upstream POP3 client against a real Dovecot on loopback.

The in-memory tests prove the client against our reading of the RFCs; these
prove it against a server providers actually run: real TLS on both modes,
CRLF sizes of LF-stored files, Dovecot's response codes.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.testing import StringTransport

from gateway.maildrop import UpstreamRejected, UpstreamUnavailable
from gateway.maildrop.pop3 import open_pop3_maildrop
from gateway.model import Account, Endpoint, Provider, Secret
from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot

pytestmark = pytest.mark.integration


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _provider(dovecot: Dovecot, ca: TLSMaterial, tls: str, **kw: Any) -> Provider:
    port = dovecot.pop3s_port if tls == "implicit" else dovecot.pop3_port
    assert port is not None
    return Provider("dovecot", pop3=Endpoint("localhost", port, tls), ca_file=ca.ca_file, **kw)  # type: ignore[arg-type]


def _message(n: int) -> bytes:
    body = b"".join(b"line %d of message %d\r\n" % (i, n) for i in range(50))
    return (
        b"From: someone@example.test\r\nSubject: message %d\r\n\r\n" % n
        + b".starts with a dot\r\n"
        + body
        + b".\r\n"
        + b"x" * 100000
        + b"\r\n"
    )


def _stuffed(message: bytes) -> bytes:
    lines = message.split(b"\r\n")[:-1]
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


@pytest.mark.parametrize(
    ("tls", "auth"), [("implicit", "auto"), ("starttls", "auto"), ("implicit", "user")]
)
@pytest_twisted.ensureDeferred
async def test_session_against_dovecot(
    tls: str, auth: str, clean_mailboxes: Dovecot, tls_upstream: TLSMaterial
) -> None:
    dovecot = clean_mailboxes
    messages = [_message(1), _message(2)]
    for m in messages:
        dovecot.deliver("alice", m)
    account = Account("alice", "dovecot", "alice", password=Secret("alice-pw"))
    maildrop = await open_pop3_maildrop(
        account, _provider(dovecot, tls_upstream, tls, pop3_auth=auth), reactor=_reactor()
    )
    try:
        assert list(maildrop.sizes) == [len(m) for m in messages]
        uids = await maildrop.unique_ids()
        assert len(uids) == 2 and uids[0] != uids[1]
        for n, m in enumerate(messages, 1):
            sink = StringTransport()
            await maildrop.retrieve(n, sink)
            assert sink.value() == _stuffed(m)
            assert sink.producer is None
        sink = StringTransport()
        await maildrop.retrieve(1, sink, lines=1)
        assert (
            sink.value()
            == b"From: someone@example.test\r\nSubject: message 1\r\n\r\n..starts with a dot\r\n"
        )
        await maildrop.commit([1])
    finally:
        maildrop.abort()
    assert dovecot.messages("alice") == [messages[1].replace(b"\r\n", b"\n")]


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_rejected(dovecot: Dovecot, tls_upstream: TLSMaterial) -> None:
    account = Account("alice", "dovecot", "alice", password=Secret("not-alices-password"))
    with pytest.raises(UpstreamRejected) as caught:
        await open_pop3_maildrop(
            account, _provider(dovecot, tls_upstream, "implicit"), reactor=_reactor()
        )
    assert "[AUTH]" in caught.value.detail
    assert "not-alices-password" not in caught.value.detail


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
@pytest_twisted.ensureDeferred
async def test_certificate_from_another_ca_is_unavailable(
    tls: str, dovecot: Dovecot, tls_upstream: TLSMaterial, tls_gateway: TLSMaterial
) -> None:
    account = Account("alice", "dovecot", "alice", password=Secret("alice-pw"))
    with pytest.raises(UpstreamUnavailable) as caught:
        await open_pop3_maildrop(account, _provider(dovecot, tls_gateway, tls), reactor=_reactor())
    assert "certificate verify failed" in caught.value.detail


@pytest_twisted.ensureDeferred
async def test_abort_deletes_nothing(clean_mailboxes: Dovecot, tls_upstream: TLSMaterial) -> None:
    dovecot = clean_mailboxes
    dovecot.deliver("bob", _message(1))
    account = Account("bob", "dovecot", "bob", password=Secret("bob-pw"))
    maildrop = await open_pop3_maildrop(
        account, _provider(dovecot, tls_upstream, "starttls"), reactor=_reactor()
    )
    await maildrop.client.command(b"DELE 1")  # marked upstream, never committed
    maildrop.abort()
    maildrop.abort()
    await maildrop.client.when_closed()
    # A fresh session still sees the message.
    again = await open_pop3_maildrop(
        account, _provider(dovecot, tls_upstream, "implicit"), reactor=_reactor()
    )
    assert len(again.sizes) == 1
    await again.commit([])
