"""Memory of idle TLS connections in OpenSSL, with the contexts Twisted builds.

    python bench/tls_memory.py

Why: an idle authenticated device session holds two TLS connections in the
gateway (the device's, where the gateway is the server, and the upstream's,
where it is the client). This measures what OpenSSL alone keeps for each,
without sockets, Twisted protocols or gateway objects: N connection pairs over
memory BIOs, handshaken and idle after one short exchange, RSS growth divided
by N. The contexts are Twisted's (`CertificateOptions`: session cache off,
no tickets, `MODE_RELEASE_BUFFERS`), as in the gateway. It is the floor under
the POP3 benchmark's "RSS per idle session".

These figures are reported, not asserted: benchmarks are not tests.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import trustme  # noqa: E402
from OpenSSL import SSL  # noqa: E402
from twisted.internet import ssl  # noqa: E402

from tests.harness.certs import make_tls_material  # noqa: E402

PAIRS = 2000
KIB = 1024


def contexts(key_type: trustme.KeyType, tls12: bool) -> tuple[SSL.Context, SSL.Context]:
    tls = make_tls_material(Path(tempfile.mkdtemp(prefix="tlsmem-")), key_type=key_type)
    server = ssl.PrivateCertificate.loadPEM(
        tls.private_key.read_text() + tls.certificate.read_text()
    ).options()
    root = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(tls.ca_file.read_bytes())])
    client = ssl.CertificateOptions(trustRoot=root).getContext()
    if tls12:
        client.set_max_proto_version(SSL.TLS1_2_VERSION)
    return server.getContext(), client


def pump(a: SSL.Connection, b: SSL.Connection) -> None:
    moved = True
    while moved:
        moved = False
        for src, dst in ((a, b), (b, a)):
            try:
                data = src.bio_read(65536)
            except SSL.WantReadError:
                continue
            dst.bio_write(data)
            moved = True


def pair(server: SSL.Context, client: SSL.Context) -> tuple[SSL.Connection, SSL.Connection]:
    s = SSL.Connection(server, None)
    s.set_accept_state()
    c = SSL.Connection(client, None)
    c.set_connect_state()
    c.set_tlsext_host_name(b"localhost")
    for _ in range(10):
        for end in (c, s):
            try:
                end.do_handshake()
            except SSL.WantReadError:
                pass
        pump(c, s)
    s.send(b"+OK ready\r\n")
    pump(s, c)
    c.recv(100)
    c.send(b"STAT\r\n")
    pump(c, s)
    s.recv(100)
    return s, c


def per_connection(server: SSL.Context, client: SSL.Context, side: int) -> float:
    """KiB of RSS per idle connection of one side (0 server, 1 client)."""
    warm = [pair(server, client) for _ in range(50)]
    gc.collect()
    before = _rss()
    kept = [pair(server, client)[side] for _ in range(PAIRS)]
    gc.collect()
    grown = _rss() - before
    del kept, warm
    return grown / PAIRS / KIB


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--one"]:
        # One figure per fresh process: no memory freed by an earlier figure
        # is there to be reused.
        key_type, protocol, side = argv[1:4]
        server, client = contexts(trustme.KeyType[key_type], protocol == "TLS1.2")
        print(f"{per_connection(server, client, 0 if side == 'server' else 1):.1f}")
        return 0
    print(f"{SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}; {PAIRS} connections each")
    print(f"{'certificate':<12} {'protocol':<8} {'server side KiB':>16} {'client side KiB':>16}")
    for key_type in ("RSA", "ECDSA"):
        for protocol in ("TLS1.3", "TLS1.2"):
            figures = [
                subprocess.run(
                    [sys.executable, __file__, "--one", key_type, protocol, side],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.strip()
                for side in ("server", "client")
            ]
            print(f"{key_type:<12} {protocol:<8} {figures[0]:>16} {figures[1]:>16}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
