"""TLS session resumption to upstreams, on real OpenSSL handshakes in memory.

The server is a plain pyOpenSSL server context with a certificate for
"localhost" only; the client side is the gateway's `ResumingTLS` around
Twisted's verified options, with an injected clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from OpenSSL import SSL
from service_identity import VerificationError

from gateway.tls import client_options
from gateway.upstream.tls_sessions import MAX_AGE, ResumingTLS, resuming_options, session_reused
from tests.harness.certs import TLSMaterial, make_tls_material


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    return make_tls_material(tmp_path_factory.mktemp("tls"), names=("localhost",))


class _Factory:
    wrappedFactory = object()


class TLSProtocol:
    """What Twisted's client options use of the TLS protocol."""

    factory = _Factory()

    def __init__(self) -> None:
        self.failed: list[Any] = []

    def failVerification(self, reason: Any) -> None:
        self.failed.append(reason)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def server_context(material: TLSMaterial) -> SSL.Context:
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.use_certificate_chain_file(str(material.certificate))
    context.use_privatekey_file(str(material.private_key))
    return context


def handshake(tls: ResumingTLS, server: SSL.Context, *, clean: bool = True) -> SSL.Connection:
    """One connection: handshake, a line from the server (which carries the
    TLS 1.3 tickets), then a clean or an abrupt end; returns the client side."""
    protocol = TLSProtocol()
    client = tls.clientConnectionForTLS(protocol)
    client.set_connect_state()
    peer = SSL.Connection(server, None)
    peer.set_accept_state()
    for _ in range(4):
        for a, b in ((client, peer), (peer, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
    assert not protocol.failed
    peer.send(b"+OK ready\r\n")
    client.bio_write(peer.bio_read(65536))
    assert client.recv(100) == b"+OK ready\r\n"
    if clean:
        client.shutdown()
    tls.keep(client)
    return client


def test_a_cleanly_closed_connections_session_is_resumed(material: TLSMaterial) -> None:
    server = server_context(material)
    tls = ResumingTLS(client_options("localhost", material.ca_file), "localhost")
    first = handshake(tls, server)
    assert not session_reused(first)
    assert tls.session is not None
    second = handshake(tls, server)
    assert session_reused(second)
    tls.check_resumed(second)  # the host name still matches
    tls.check_resumed(handshake(tls, server))  # the same certificate: remembered


def test_a_connection_without_a_tls_goodbye_leaves_nothing_to_resume(material: TLSMaterial) -> None:
    server = server_context(material)
    tls = ResumingTLS(client_options("localhost", material.ca_file), "localhost")
    handshake(tls, server, clean=False)
    assert tls.session is None
    assert not session_reused(handshake(tls, server))


def test_the_chain_is_verified_afresh_after_max_age(material: TLSMaterial) -> None:
    server = server_context(material)
    clock = Clock()
    tls = ResumingTLS(client_options("localhost", material.ca_file), "localhost", clock=clock)
    handshake(tls, server)
    # Resumed connections keep handing in new tickets, but they inherit the
    # age of the full handshake they descend from.
    clock.now += MAX_AGE / 2
    assert session_reused(handshake(tls, server))
    clock.now += MAX_AGE / 2 - 1
    assert session_reused(handshake(tls, server))
    clock.now += 1
    assert tls.session is None
    assert not session_reused(handshake(tls, server))
    assert session_reused(handshake(tls, server))


def test_a_resumed_session_is_checked_against_the_host_name(material: TLSMaterial) -> None:
    """Twisted checks the name in its verify callback, which OpenSSL skips on
    resumption: `check_resumed` does it on the session's certificate."""
    server = server_context(material)
    # Options verifying "localhost" behind an endpoint named otherwise: only
    # the recheck on resumption can notice.
    tls = ResumingTLS(client_options("localhost", material.ca_file), "elsewhere.test")
    first = handshake(tls, server)
    tls.check_resumed(first)  # a full handshake: Twisted checked (for "localhost")
    for _ in range(2):  # a failed check is never remembered as passed
        resumed = handshake(tls, server)
        assert session_reused(resumed)
        with pytest.raises(VerificationError):
            tls.check_resumed(resumed)


def test_sessions_are_kept_per_host_port_and_trust_root(
    material: TLSMaterial, tmp_path: Path
) -> None:
    server = server_context(material)
    by_name = resuming_options("localhost", 995, material.ca_file)
    assert resuming_options("localhost", 995, material.ca_file) is by_name
    other_ca = make_tls_material(tmp_path / "other").ca_file
    others = [
        resuming_options("127.0.0.1", 995, material.ca_file),
        resuming_options("localhost", 110, material.ca_file),
        resuming_options("localhost", 995, other_ca),
    ]
    handshake(by_name, server)
    assert by_name.session is not None
    assert all(o is not by_name and o.session is None for o in others)


def test_a_session_from_another_context_is_refused_not_offered(material: TLSMaterial) -> None:
    server = server_context(material)
    tls = ResumingTLS(client_options("localhost", material.ca_file), "localhost")
    handshake(tls, server)
    # The same session handed to options with another OpenSSL context
    # (pyOpenSSL refuses it): a full handshake, nothing offered.
    elsewhere = ResumingTLS(client_options("127.0.0.1", material.ca_file), "127.0.0.1")
    elsewhere._session, elsewhere._verified_at = tls.session, elsewhere._clock()
    connection = elsewhere.clientConnectionForTLS(TLSProtocol())
    assert elsewhere.session is None
    assert connection not in elsewhere._offered
