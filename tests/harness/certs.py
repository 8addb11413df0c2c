"""Throwaway TLS certificates for tests, benchmarks and the demo.

Each party of a test (the gateway's own listeners, the upstream Dovecot) gets
its own CA, so a test can prove that a certificate from the wrong CA is refused
rather than accidentally trusted because everything shared one root.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class TLSMaterial:
    """Paths to PEM files; paths rather than objects so that config files and
    external programs (Dovecot, curl, openssl) can use them directly."""

    ca_file: Path
    certificate: Path
    """The leaf certificate followed by its chain (servers must send both)."""
    private_key: Path


def make_tls_material(
    directory: Path,
    names: Sequence[str] = ("localhost", "127.0.0.1"),
    ca: trustme.CA | None = None,
    key_type: trustme.KeyType = trustme.KeyType.ECDSA,
) -> TLSMaterial:
    """Issue a leaf certificate for ``names`` and write it below ``directory``.

    Pass ``ca`` to issue several leaves from one root; by default every call
    makes a fresh CA, which is what a mismatch test wants. ``key_type`` RSA
    for a test of RSA cipher suites (an ECDSA key cannot negotiate them at all).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca = ca if ca is not None else trustme.CA(key_type=key_type)
    # A CN as well as the SANs: fetchmail refuses a certificate without one.
    leaf = ca.issue_cert(*names, common_name=names[0], key_type=key_type)
    material = TLSMaterial(
        ca_file=directory / "ca.pem",
        certificate=directory / "cert-chain.pem",
        private_key=directory / "key.pem",
    )
    ca.cert_pem.write_to_path(str(material.ca_file))
    leaf.private_key_pem.write_to_path(str(material.private_key))
    material.private_key.chmod(0o600)
    # trustme's chain is leaf first, then intermediates: the order TLS sends.
    with material.certificate.open("wb") as out:
        for blob in leaf.cert_chain_pems:
            out.write(blob.bytes())
    return material
