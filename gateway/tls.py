"""TLS policy: contexts for device listeners and verified options for upstreams.

A listener offers only forward-secret AEAD suites (ECDHE with AES-GCM or
ChaCha20-Poly1305 for TLS 1.2, OpenSSL's TLS 1.3 suites). Devices are often
old: a listener may lower its minimum TLS version, and only that listener
then gets the relaxed, legacy cipher list. Upstreams are always verified
(service_identity host name checks against the provider's CA file or the
system trust store).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from zope.interface import implementer

from gateway.model import Listener, TLSFiles

if TYPE_CHECKING:
    # What platformTrust() and trustRootFromCertificates() return; Twisted
    # defines the interface in a private module and does not re-export it.
    from twisted.internet._sslverify import IOpenSSLTrustRoot

_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1_0,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}

# TLS 1.2 suites a listener offers: ECDHE key exchange (forward secrecy) with
# an AEAD cipher, Mozilla's "intermediate" list without finite-field DHE. No
# static RSA key exchange, no CBC; TLS 1.3 suites are OpenSSL's own (all AEAD).
MODERN_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

# Only for a listener whose min_tls is "1.0" or "1.1": devices that old often
# know nothing but static RSA and CBC-SHA1 suites. OpenSSL 3 refuses TLS
# 1.0/1.1 at its default security level (SHA-1 in the handshake), so such a
# listener also needs level 0.
LEGACY_CIPHERS = b"DEFAULT:@SECLEVEL=0"

_PrivateKey = (
    dsa.DSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | rsa.RSAPrivateKey
)


class TLSSetupError(Exception):
    """A certificate, key or CA file that cannot be used; the text says which."""


@dataclass(frozen=True)
class ServerIdentity:
    certificate: crypto.X509
    chain: tuple[crypto.X509, ...]
    key: crypto.PKey


def load_server_identity(files: TLSFiles) -> ServerIdentity:
    try:
        certs = x509.load_pem_x509_certificates(Path(files.certificate).read_bytes())
    except (OSError, ValueError) as e:
        raise TLSSetupError(f"tls.certificate: cannot load {files.certificate}: {e}") from None
    try:
        key = serialization.load_pem_private_key(
            Path(files.private_key).read_bytes(), password=None
        )
    except (OSError, ValueError, TypeError) as e:
        raise TLSSetupError(
            f"tls.private_key: cannot load {files.private_key}: {type(e).__name__}"
        ) from None
    if not isinstance(key, _PrivateKey):
        raise TLSSetupError(
            f"tls.private_key: {files.private_key} holds a {type(key).__name__}, "
            "not an RSA, EC, Ed25519, Ed448 or DSA key"
        )
    leaf, *rest = (crypto.X509.from_cryptography(c) for c in certs)
    return ServerIdentity(leaf, tuple(rest), crypto.PKey.from_cryptography_key(key))


def server_context_factory(identity: ServerIdentity, listener: Listener) -> ssl.CertificateOptions:
    """Options for one device listener, with that listener's version floor and ciphers."""
    floor = _VERSIONS[listener.min_tls]
    legacy = floor < ssl.TLSVersion.TLSv1_2
    make = functools.partial(
        ssl.CertificateOptions,
        privateKey=identity.key,
        certificate=identity.certificate,
        extraCertChain=list(identity.chain),
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(MODERN_CIPHERS),
    )
    # Twisted refuses both keywords at once, even with one of them None.
    options = make(insecurelyLowerMinimumTo=floor) if legacy else make(raiseMinimumTo=floor)
    # CertificateOptions builds its context once and caches it; adjust it in place.
    context = options.getContext()
    # A device that closes its socket without close_notify (Python's ssl,
    # many embedded stacks) is an ordinary end of session: POP3 and SMTP
    # frame their own data, so a cut cannot pass for a complete command or
    # message. As an error, Twisted's TLS layer would build a Failure for it
    # whose traceback holds the frame that holds it: a reference cycle that
    # keeps the connection's TLS objects alive until a full collection.
    context.set_options(SSL.OP_IGNORE_UNEXPECTED_EOF)
    if legacy:
        # Only this listener offers the legacy list.
        context.set_cipher_list(LEGACY_CIPHERS)
    return options


@implementer(IOpenSSLContextFactory, IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """One listener's TLS settings, whose certificate can be replaced while running.

    Twisted asks for a context for every new connection; this hands out the
    current one, so after `reload()` new sessions get the new certificate
    while sessions already open keep theirs. A renewed certificate then needs
    no restart, which would drop every device's session.
    """

    def __init__(self, identity: ServerIdentity, listener: Listener) -> None:
        self._listener = listener
        self._options = server_context_factory(identity, listener)

    @property
    def listener(self) -> Listener:
        return self._listener

    def getContext(self) -> SSL.Context:
        return self._options.getContext()

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """What Twisted does with a plain context factory, typed for the
        listeners' factories (which take a connection creator)."""
        return SSL.Connection(self.getContext(), None)

    def reload(self, identity: ServerIdentity) -> None:
        options = server_context_factory(identity, self._listener)
        # Build the context now: a key that does not match the certificate
        # fails here, before anything is swapped.
        options.getContext()
        self._options = options


def load_trust_root(ca_file: Path | None) -> IOpenSSLTrustRoot:
    root: IOpenSSLTrustRoot
    if ca_file is None:
        root = ssl.platformTrust()
        return root
    try:
        certs = x509.load_pem_x509_certificates(Path(ca_file).read_bytes())
    except (OSError, ValueError) as e:
        raise TLSSetupError(f"ca_file: cannot load {ca_file}: {e}") from None
    root = ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in certs]
    )
    return root


@functools.lru_cache(maxsize=256)
def client_options(host: str, ca_file: Path | None) -> IOpenSSLClientConnectionCreator:
    """Verified TLS to an upstream: chain to the trust root and host name match.

    Cached per (host, CA file): the options hold one OpenSSL context, and
    building it (parsing the trust store, setting ciphers) costs more than the
    rest of an upstream login. A changed CA file needs a restart.
    """
    return ssl.optionsForClientTLS(host, trustRoot=load_trust_root(ca_file))


# What Twisted's STARTTLS (twisted.internet._newtls.startTLS) sets on the TCP
# transport itself: bound methods of the TLS protocol, whose own transport
# (`_BypassTLS`) points back at the TCP transport. Twisted never takes them off.
_STARTTLS_LINKS = ("getHandle", "getPeerCertificate")


def forget_tls_layer(transport: object) -> None:
    """Take the TLS layer's methods off a TCP transport whose connection is lost.

    Left there, each connection that started TLS in the middle (STLS,
    STARTTLS, on either side) would stay behind in a reference cycle with its
    TLS protocol until a full garbage collection. Call it from the protocol's
    `connectionLost`, when Twisted no longer uses them; anything that is not
    such a transport is left alone.
    """
    attributes = getattr(transport, "__dict__", {})
    for name in _STARTTLS_LINKS:
        attributes.pop(name, None)


def describe(connection: SSL.Connection | None) -> tuple[str, str]:
    """(version, cipher) of a finished handshake, for the session log line."""
    if connection is None:
        return ("none", "none")
    try:
        return (
            connection.get_protocol_version_name() or "unknown",
            connection.get_cipher_name() or "unknown",
        )
    except SSL.Error:
        return ("unknown", "unknown")
