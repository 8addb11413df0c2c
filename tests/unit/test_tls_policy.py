"""Which TLS versions and cipher suites a device listener accepts.

Handshakes run in memory: a Python `ssl` client, restricted to what an old
or a modern device offers, against the listener's own context
(`ReloadableServerTLS`, as the running gateway uses it). The certificate is
RSA: with an ECDSA one, static-RSA suites could never be negotiated, and a
test that they are refused would pass whatever the policy.
"""

from __future__ import annotations

import ssl
import warnings
from pathlib import Path

import pytest
import trustme
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface.verify import verifyObject

from gateway.model import Listener, TLSFiles
from gateway.tls import ReloadableServerTLS, load_server_identity
from tests.harness.certs import TLSMaterial, make_tls_material

STATIC_RSA = "AES128-SHA:AES256-SHA:AES128-GCM-SHA256:AES256-GCM-SHA384"
ECDHE_CBC = "ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA:ECDHE-RSA-AES128-SHA256"


@pytest.fixture(scope="module")
def rsa_material(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    return make_tls_material(tmp_path_factory.mktemp("rsa"), key_type=trustme.KeyType.RSA)


def listener_tls(material: TLSMaterial, min_tls: str = "1.2") -> ReloadableServerTLS:
    identity = load_server_identity(TLSFiles(material.certificate, material.private_key))
    return ReloadableServerTLS(identity, Listener("pop3", 995, "implicit", min_tls=min_tls))


def client_context(
    ca_file: Path,
    ciphers: str,
    *,
    version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
) -> ssl.SSLContext:
    """A client that speaks exactly one TLS version and offers only `ciphers`."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1 is deprecated: we know
        context.minimum_version = context.maximum_version = version
    context.set_ciphers(ciphers)
    return context


def handshake(server_tls: ReloadableServerTLS, client: ssl.SSLContext) -> str:
    """Run a handshake in memory; the negotiated cipher, or raise ssl.SSLError."""
    server = SSL.Connection(server_tls.getContext(), None)
    server.set_accept_state()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client.wrap_bio(incoming, outgoing, server_hostname="localhost")
    for _ in range(20):
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        else:
            cipher = tls.cipher()
            assert cipher is not None
            return cipher[0]
        server.bio_write(outgoing.read())
        try:
            server.do_handshake()
        except SSL.WantReadError:
            pass
        except SSL.Error:
            pass  # its alert is in the BIO; the client raises with it
        try:
            incoming.write(server.bio_read(65536))
        except SSL.WantReadError:
            pass
    raise AssertionError("the handshake neither finished nor failed")


def test_default_listener_offers_only_forward_secret_aead_suites(
    rsa_material: TLSMaterial,
) -> None:
    connection = SSL.Connection(listener_tls(rsa_material).getContext(), None)
    offered = connection.get_cipher_list()
    assert offered
    tls12 = [name for name in offered if not name.startswith("TLS_")]
    assert tls12, offered
    for name in tls12:
        assert name.startswith("ECDHE-"), name
        assert "GCM" in name or "CHACHA20" in name, name


def test_default_listener_refuses_static_rsa_suites(rsa_material: TLSMaterial) -> None:
    with pytest.raises(ssl.SSLError):
        handshake(listener_tls(rsa_material), client_context(rsa_material.ca_file, STATIC_RSA))


def test_default_listener_refuses_cbc_suites(rsa_material: TLSMaterial) -> None:
    with pytest.raises(ssl.SSLError):
        handshake(listener_tls(rsa_material), client_context(rsa_material.ca_file, ECDHE_CBC))


def test_default_listener_accepts_a_modern_client(rsa_material: TLSMaterial) -> None:
    cipher = handshake(
        listener_tls(rsa_material),
        client_context(rsa_material.ca_file, "ECDHE-RSA-AES128-GCM-SHA256"),
    )
    assert cipher == "ECDHE-RSA-AES128-GCM-SHA256"
    modern = client_context(rsa_material.ca_file, "DEFAULT", version=ssl.TLSVersion.TLSv1_3)
    assert handshake(listener_tls(rsa_material), modern).startswith("TLS_")


def test_legacy_listener_accepts_an_old_client(rsa_material: TLSMaterial) -> None:
    """A device that knows only TLS 1.0 and static-RSA CBC suites still gets in
    on the listener whose floor was lowered for it."""
    old = client_context(
        rsa_material.ca_file, "AES128-SHA:@SECLEVEL=0", version=ssl.TLSVersion.TLSv1
    )
    assert handshake(listener_tls(rsa_material, min_tls="1.0"), old) == "AES128-SHA"


def test_legacy_listener_does_not_lower_the_default_one(rsa_material: TLSMaterial) -> None:
    listener_tls(rsa_material, min_tls="1.0")
    with pytest.raises(ssl.SSLError):
        handshake(listener_tls(rsa_material), client_context(rsa_material.ca_file, STATIC_RSA))


def test_listener_tls_creates_server_connections(rsa_material: TLSMaterial) -> None:
    """What TLSMemoryBIOFactory and startTLS use first, before a plain context factory."""
    tls = listener_tls(rsa_material)
    assert verifyObject(IOpenSSLServerConnectionCreator, tls)
    connection = tls.serverConnectionForTLS(None)
    assert connection.get_context() is tls.getContext()
