"""CPU of the gateway's RETR relay loop alone, in memory: no sockets, no other processes.

The upstream TLS stream of a RETR answer is encrypted once beforehand; the
timed part is what the gateway does with it: decrypt (the upstream TLS
layer), the POP3 client and parser, the message sink and the device's TLS
layer encrypting it again. The socket reads are simulated by feeding the
ciphertext in pieces of `--read` bytes, with a reactor turn after each (the
device TLS layer gathers writes until then). Kernel socket work is not
included, so the figure is below what `pop3_bench.py` reports, but it is
steady enough on a shared machine to compare two versions of the code:

    PYTHONPATH=. .venv/bin/python bench/retr_relay.py
    PYTHONPATH=/other/checkout .venv/bin/python bench/retr_relay.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.environ.get("PYTHONPATH", ".").split(":")[0])

import trustme
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient

from bench.common import make_message, wire_form
from gateway.command_queue import OutputFlow
from gateway.pop3.sink import MessageSink
from gateway.upstream.pop3 import POP3Client

ClientTLS: type[BufferingTLSTransport]
try:
    from gateway.upstream.tls_stream import GatheringTLSProtocol

    ClientTLS = GatheringTLSProtocol
except ImportError:  # the code before the gathering layer
    ClientTLS = BufferingTLSTransport
DeviceTLS: type[BufferingTLSTransport]
try:
    from gateway.tls_layer import LeanTLSTransport

    DeviceTLS = LeanTLSTransport
except ImportError:  # the code before the lean layer
    DeviceTLS = BufferingTLSTransport

MIB = 1024 * 1024
DEVICE_TLS = ["lean"]  # --device-tls


def _options() -> tuple[Any, Any]:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    server = PrivateCertificate.loadPEM(leaf.private_key_and_cert_chain_pem.bytes()).options()
    client = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(ca.cert_pem.bytes()))
    return server, client


def one_run(body: bytes, read: int, clock: Clock) -> tuple[float, int]:
    """(CPU seconds, octets relayed) of one RETR."""
    server_opts, client_opts = _options()
    # Upstream leg: a TLS server that answers what we make it write, and the client.
    client = POP3Client(clock, 60.0, peer="bench")
    up_server_f = TLSMemoryBIOFactory(
        server_opts, False, Factory.forProtocol(Protocol), clock=clock
    )
    up_client_f = TLSMemoryBIOFactory(
        client_opts, True, Factory.forProtocol(lambda: client), clock=clock
    )
    up_client_f.protocol = ClientTLS
    _, up_server, up_pump = connectedServerAndClient(
        lambda: up_server_f.buildProtocol(None),
        lambda: up_client_f.buildProtocol(None),
        clock=clock,
    )
    up_pump.flush()
    # Device leg: the gateway's TLS server and a device client (never read in the timing).
    dev_server_f = TLSMemoryBIOFactory(
        server_opts, False, Factory.forProtocol(Protocol), clock=clock
    )
    dev_server_f.protocol = DeviceTLS if DEVICE_TLS[0] == "lean" else BufferingTLSTransport
    dev_client_f = TLSMemoryBIOFactory(
        client_opts, True, Factory.forProtocol(Protocol), clock=clock
    )
    _, dev_server, dev_pump = connectedServerAndClient(
        lambda: dev_server_f.buildProtocol(None),
        lambda: dev_client_f.buildProtocol(None),
        clock=clock,
    )
    dev_pump.flush()

    up_server.write(b"+OK hello\r\n")
    clock.advance(0)
    up_pump.flush()
    flow = OutputFlow(lambda: None, lambda: None)
    device: Any = dev_server
    sink = MessageSink(device, flow)
    done = client.retrieve(b"RETR 1", sink)
    up_pump.flush()
    up_server.write(b"+OK\r\n" + body)
    clock.advance(0)
    up_out: Any = up_server.transport
    cipher = up_out.getOutBuffer()
    tls: Any = client.transport
    dev_out: Any = dev_server.transport
    relayed = 0
    start = time.process_time()
    for at in range(0, len(cipher), read):
        tls.dataReceived(cipher[at : at + read])
        clock.advance(0)
        relayed += len(dev_out.getOutBuffer() or b"")
    cpu = time.process_time() - start
    assert done.called, "the RETR did not end"
    return cpu, relayed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=20, help="message size, MiB")
    parser.add_argument("--read", type=int, default=2**16, help="octets per socket read")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--device-tls",
        choices=("lean", "twisted"),
        default="lean",
        help="the device side's TLS layer: the gateway's (gateway.tls_layer) or Twisted's own",
    )
    args = parser.parse_args()
    DEVICE_TLS[0] = args.device_tls
    body = wire_form(make_message(1, args.size * MIB))
    clock = Clock()
    runs = [one_run(body, args.read, clock) for _ in range(args.repeat)]
    best = min(cpu for cpu, _ in runs)
    print(
        f"{ClientTLS.__module__}.{ClientTLS.__name__} read={args.read}: "
        f"best {best / len(body) * 1e9:.2f} s/GB, median "
        f"{sorted(c for c, _ in runs)[len(runs) // 2] / len(body) * 1e9:.2f} s/GB "
        f"({args.repeat} x {len(body) / MIB:.1f} MiB, device got {runs[0][1] / MIB:.1f} MiB)"
    )


if __name__ == "__main__":
    main()
