"""A renewed certificate is picked up on SIGHUP without a restart."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL

from gateway.model import Listener, TLSFiles
from gateway.tls import ReloadableServerTLS, ServerIdentity, load_server_identity
from tests.harness.certs import TLSMaterial, make_tls_material
from tests.harness.gateway_process import GatewayProcess, free_port


def served_certificate(tls: ReloadableServerTLS) -> bytes:
    connection = SSL.Connection(tls.getContext(), None)
    return connection.get_certificate().to_cryptography().fingerprint(hashes.SHA256())


def identity(material: TLSMaterial) -> ServerIdentity:
    return load_server_identity(TLSFiles(material.certificate, material.private_key))


def test_reload_swaps_the_certificate_for_new_connections(tmp_path: Path) -> None:
    old, new = make_tls_material(tmp_path / "old"), make_tls_material(tmp_path / "new")
    tls = ReloadableServerTLS(identity(old), Listener("pop3", 995, "implicit"))
    before = served_certificate(tls)
    tls.reload(identity(new))
    after = served_certificate(tls)
    assert before != after
    assert after == served_certificate(ReloadableServerTLS(identity(new), tls.listener))


def test_reload_with_a_key_of_another_certificate_keeps_the_old_one(tmp_path: Path) -> None:
    old, new = make_tls_material(tmp_path / "old"), make_tls_material(tmp_path / "new")
    tls = ReloadableServerTLS(identity(old), Listener("pop3", 995, "implicit"))
    before = served_certificate(tls)
    mismatched = load_server_identity(TLSFiles(new.certificate, old.private_key))
    with pytest.raises(SSL.Error):
        tls.reload(mismatched)
    assert served_certificate(tls) == before


def handshake_ok(port: int, ca: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                return tls.recv(100).startswith(b"+OK")
    except ssl.SSLError:
        return False


@pytest.mark.integration
def test_sighup_reloads_the_certificate_of_a_running_gateway(tmp_path: Path) -> None:
    old, new = make_tls_material(tmp_path / "old"), make_tls_material(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(old.certificate, live / "cert.pem")
    shutil.copy(old.private_key, live / "key.pem")
    port = free_port()
    config = f"""
state_dir = "{tmp_path / "state"}"
[tls]
certificate = "{live / "cert.pem"}"
private_key = "{live / "key.pem"}"
[[pop3.listen]]
address = "127.0.0.1"
port = {port}
tls = "implicit"
"""
    with GatewayProcess(tmp_path / "gw", config, [port]) as gateway:
        assert handshake_ok(port, old.ca_file) and not handshake_ok(port, new.ca_file)
        assert gateway.process is not None

        # A half-written renewal (key of another certificate) changes nothing.
        shutil.copy(new.certificate, live / "cert.pem")
        gateway.process.send_signal(signal.SIGHUP)
        gateway.wait_for_log("tls certificate reload failed")
        assert handshake_ok(port, old.ca_file)

        shutil.copy(new.private_key, live / "key.pem")
        gateway.process.send_signal(signal.SIGHUP)
        gateway.wait_for_log("tls certificate reloaded")
        assert handshake_ok(port, new.ca_file) and not handshake_ok(port, old.ca_file)
        assert gateway.process.poll() is None
