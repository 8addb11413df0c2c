"""TLS policy: contexts for device listeners and verified options for upstreams.

Devices are often old: a listener may lower its minimum TLS version, and only
that listener's. Upstreams are always verified (service_identity host name
checks against the provider's CA file or the system trust store).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLContextFactory
from zope.interface import implementer

from gateway.model import Listener, TLSFiles

_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1_0,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}

# OpenSSL 3 refuses TLS 1.0/1.1 at its default security level (SHA-1 in the
# handshake), so a listener that explicitly admits them also needs level 0.
_LEGACY_CIPHERS = b"DEFAULT:@SECLEVEL=0"


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
    leaf, *rest = (crypto.X509.from_cryptography(c) for c in certs)
    return ServerIdentity(leaf, tuple(rest), crypto.PKey.from_cryptography_key(key))


def server_context_factory(identity: ServerIdentity, listener: Listener) -> ssl.CertificateOptions:
    """Options for one device listener, with that listener's version floor."""
    floor = _VERSIONS[listener.min_tls]
    kwargs = {}
    if floor < ssl.TLSVersion.TLSv1_2:
        kwargs["insecurelyLowerMinimumTo"] = floor
    else:
        kwargs["raiseMinimumTo"] = floor
    options = ssl.CertificateOptions(
        privateKey=identity.key,
        certificate=identity.certificate,
        extraCertChain=list(identity.chain),
        **kwargs,
    )
    if floor < ssl.TLSVersion.TLSv1_2:
        # CertificateOptions builds its context once and caches it; adjust it
        # in place so only this listener accepts the legacy security level.
        options.getContext().set_cipher_list(_LEGACY_CIPHERS)
    return options


@implementer(IOpenSSLContextFactory)
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

    def getContext(self) -> SSL.Context:
        return self._options.getContext()

    def reload(self, identity: ServerIdentity) -> None:
        options = server_context_factory(identity, self._listener)
        # Build the context now: a key that does not match the certificate
        # fails here, before anything is swapped.
        options.getContext()
        self._options = options


def load_trust_root(ca_file: Path | None) -> ssl.IOpenSSLTrustRoot:
    if ca_file is None:
        return ssl.platformTrust()
    try:
        certs = x509.load_pem_x509_certificates(Path(ca_file).read_bytes())
    except (OSError, ValueError) as e:
        raise TLSSetupError(f"ca_file: cannot load {ca_file}: {e}") from None
    return ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in certs]
    )


@functools.lru_cache(maxsize=256)
def client_options(host: str, ca_file: Path | None) -> IOpenSSLClientConnectionCreator:
    """Verified TLS to an upstream: chain to the trust root and host name match.

    Cached per (host, CA file): the options hold one OpenSSL context, and
    building it (parsing the trust store, setting ciphers) costs more than the
    rest of an upstream login. A changed CA file needs a restart.
    """
    return ssl.optionsForClientTLS(host, trustRoot=load_trust_root(ca_file))


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
