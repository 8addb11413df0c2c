"""TLS session resumption against the real Dovecot.

Dovecot's login processes each hold their own ticket key, so this Dovecot
runs one long-lived pop3-login process (as a provider's shared ticket keys
would allow): the second login resumes the first one's session. Its
certificate names "localhost" only, so a provider entry naming the same
server "127.0.0.1" must never be offered that session: it gets a full
handshake, whose host name check fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL

from gateway.maildrop import UpstreamUnavailable
from gateway.maildrop.pop3 import POP3Maildrop, open_pop3_maildrop
from gateway.model import Account, Endpoint, Provider, Secret
from gateway.upstream.tls_sessions import resuming_options, session_reused
from tests.harness.certs import TLSMaterial, make_tls_material
from tests.harness.dovecot import Dovecot

pytestmark = pytest.mark.integration

ONE_LOGIN_PROCESS = """
service pop3-login {
  service_count = 0
  process_min_avail = 1
  process_limit = 1
}
"""


class ResumingDovecot(Dovecot):
    def render_config(self) -> str:
        return super().render_config() + ONE_LOGIN_PROCESS


@pytest.fixture(scope="module")
def localhost_only(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    return make_tls_material(tmp_path_factory.mktemp("tls-localhost"), names=("localhost",))


@pytest.fixture(scope="module")
def dovecot(
    tmp_path_factory: pytest.TempPathFactory, localhost_only: TLSMaterial
) -> Iterator[Dovecot]:
    base: Path = tmp_path_factory.mktemp("dovecot-resuming")
    with ResumingDovecot(base, {"alice": "alice-pw"}, tls=localhost_only) as server:
        yield server


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _provider(dovecot: Dovecot, ca: TLSMaterial, host: str, tls: str) -> Provider:
    port = dovecot.pop3s_port if tls == "implicit" else dovecot.pop3_port
    assert port is not None
    return Provider("dovecot", pop3=Endpoint(host, port, tls), ca_file=ca.ca_file)  # type: ignore[arg-type]


ALICE = Account("alice", "dovecot", "alice", password=Secret("alice-pw"))


def _handle(maildrop: POP3Maildrop) -> SSL.Connection:
    handle = maildrop.client.transport.getHandle()  # type: ignore[union-attr]
    assert isinstance(handle, SSL.Connection)
    return handle


async def _session(provider: Provider) -> bool:
    """One whole session (login, LIST, QUIT); whether its TLS session was resumed."""
    maildrop = await open_pop3_maildrop(ALICE, provider, reactor=_reactor())
    reused = session_reused(_handle(maildrop))
    closed = maildrop.client.when_closed()
    await maildrop.commit([])
    await closed
    return reused


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
@pytest_twisted.ensureDeferred
async def test_the_second_login_resumes(
    tls: str, dovecot: Dovecot, localhost_only: TLSMaterial
) -> None:
    provider = _provider(dovecot, localhost_only, "localhost", tls)
    assert await _session(provider) is False
    assert provider.pop3 is not None
    assert resuming_options("localhost", provider.pop3.port, localhost_only.ca_file).session
    assert await _session(provider) is True
    assert await _session(provider) is True


@pytest_twisted.ensureDeferred
async def test_a_session_is_never_offered_to_another_host_name(
    dovecot: Dovecot, localhost_only: TLSMaterial
) -> None:
    by_name = _provider(dovecot, localhost_only, "localhost", "implicit")
    await _session(by_name)
    await _session(by_name)
    assert by_name.pop3 is not None
    port = by_name.pop3.port
    assert resuming_options("localhost", port, localhost_only.ca_file).session is not None
    # The same server by address: its certificate does not name 127.0.0.1, so
    # only a full handshake's verification can (and must) refuse it.
    for _ in range(2):
        with pytest.raises(UpstreamUnavailable) as caught:
            await open_pop3_maildrop(
                ALICE,
                _provider(dovecot, localhost_only, "127.0.0.1", "implicit"),
                reactor=_reactor(),
            )
        assert "IPAddressMismatch" in caught.value.detail
    assert resuming_options("127.0.0.1", port, localhost_only.ca_file).session is None
    # And the name's session still resumes.
    assert await _session(by_name) is True


@pytest_twisted.ensureDeferred
async def test_a_dropped_device_session_does_not_spoil_resumption(
    dovecot: Dovecot, localhost_only: TLSMaterial
) -> None:
    """The gateway aborts the upstream when a device drops: the TLS layer
    still says goodbye, and the next login resumes."""
    provider = _provider(dovecot, localhost_only, "localhost", "implicit")
    await _session(provider)
    maildrop = await open_pop3_maildrop(ALICE, provider, reactor=_reactor())
    closed = maildrop.client.when_closed()
    maildrop.abort()
    await closed
    assert await _session(provider) is True
