"""IMAP-backed OAuth2 accounts against a real Dovecot whose oauth2 passdb
introspects bearer tokens at the test authorization server.

Both run in this process: the authorization server answers Dovecot's
introspection on the same reactor that runs the IMAP login. The token source
is a stand-in that takes tokens straight from that server, so these tests are
about the IMAP side (XOAUTH2/OAUTHBEARER with real-sized tokens, the error
challenge, one forced refresh); the token manager has its own tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.web.server import Site

from gateway.maildrop import UpstreamRejected
from gateway.maildrop.imap import open_imap_maildrop
from gateway.model import Account
from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.oauth_server import AuthServer
from tests.helpers.imap import imap_provider, reactor, retrieve

pytestmark = pytest.mark.integration

ACCOUNT = Account("scanner", "dovecot", "alice", auth="oauth2", grant="device_code", mailbox="imap")


@pytest.fixture(scope="module")
def idp() -> Iterator[AuthServer]:
    server = AuthServer(token_length=1500)  # real tokens are 1-2 KB
    # Dovecot's HTTP client keeps connections open; no idle timer on our side,
    # so nothing is left on the reactor between tests.
    site = Site(server.resource(), timeout=None)
    site.noisy = False
    port = reactor().listenTCP(0, site, interface="127.0.0.1")
    server.base_url = f"http://127.0.0.1:{port.getHost().port}"
    yield server
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture(scope="module")
def oauth_dovecot(
    tmp_path_factory: pytest.TempPathFactory, tls_upstream: TLSMaterial, idp: AuthServer
) -> Iterator[Dovecot]:
    with Dovecot(
        tmp_path_factory.mktemp("dovecot-imap-oauth"),
        {"alice": "alice-pw"},
        tls=tls_upstream,
        oauth2_introspection_url=f"{idp.base_url}/introspect",
    ) as server:
        yield server


class Tokens:
    """A TokenSource handing out what the authorization server issues.

    `bad` tokens come first (revoked at once), as if the cached token had been
    revoked at the provider; a forced refresh gets a fresh one unless
    `refresh_fails`.
    """

    def __init__(self, server: AuthServer, bad: int = 0, refresh_fails: bool = False) -> None:
        self.server = server
        self.bad = bad
        self.refresh_fails = refresh_fails
        self.calls: list[bool] = []
        self.issued: list[str] = []

    async def access_token(self, account: Account, *, force_refresh: bool = False) -> str:
        self.calls.append(force_refresh)
        token: str = self.server._issue("alice", "gateway", "mail", refresh=False)["access_token"]
        self.issued.append(token)
        if (self.bad and not force_refresh) or (force_refresh and self.refresh_fails):
            self.bad -= 1
            self.server.access[token].active = False
        return token


async def open_drop(dovecot: Dovecot, ca: TLSMaterial, tokens: Tokens, **provider: Any):
    return await open_imap_maildrop(
        ACCOUNT,
        imap_provider(dovecot, ca, **provider),
        reactor=reactor(),
        uid_store=None,
        tokens=tokens,
    )


@pytest.mark.parametrize(("sasl", "method"), [("xoauth2", "XOAUTH2"), ("auto", "OAUTHBEARER")])
@pytest_twisted.ensureDeferred
async def test_bearer_login_with_a_real_sized_token(
    sasl: str, method: str, oauth_dovecot: Dovecot, tls_upstream: TLSMaterial, idp: AuthServer
) -> None:
    oauth_dovecot.clear("alice")
    oauth_dovecot.deliver("alice", b"Message-ID: <1@x>\n\n.dotted\n")
    tokens = Tokens(idp)
    drop = await open_drop(oauth_dovecot, tls_upstream, tokens, sasl=sasl)
    try:
        assert await retrieve(drop, 1) == b"Message-ID: <1@x>\r\n\r\n..dotted\r\n"
        await drop.commit([1])
    finally:
        drop.abort()
    assert tokens.calls == [False]
    assert oauth_dovecot.messages("alice") == []
    logins = [x for x in oauth_dovecot.log_text().splitlines() if "imap-login: Info: Login:" in x]
    assert f"method={method}" in logins[-1]


@pytest.mark.parametrize("sasl", ["xoauth2", "oauthbearer"])
@pytest_twisted.ensureDeferred
async def test_a_refused_token_is_refreshed_once(
    sasl: str, oauth_dovecot: Dovecot, tls_upstream: TLSMaterial, idp: AuthServer
) -> None:
    tokens = Tokens(idp, bad=1)
    drop = await open_drop(oauth_dovecot, tls_upstream, tokens, sasl=sasl)
    drop.abort()
    assert tokens.calls == [False, True]


@pytest_twisted.ensureDeferred
async def test_a_second_refusal_is_final_and_no_token_is_logged(
    oauth_dovecot: Dovecot, tls_upstream: TLSMaterial, idp: AuthServer
) -> None:
    tokens = Tokens(idp, bad=1, refresh_fails=True)
    with pytest.raises(UpstreamRejected) as caught:
        await open_drop(oauth_dovecot, tls_upstream, tokens, sasl="xoauth2")
    assert tokens.calls == [False, True]
    detail = caught.value.detail
    assert "after one forced token refresh" in detail and "status=401" in detail
    assert not any(token in detail for token in tokens.issued)
