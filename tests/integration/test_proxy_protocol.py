"""A real HAProxy (send-proxy and send-proxy-v2) in front of the real twistd
gateway: POP3 implicit TLS, POP3 STLS and SMTP STARTTLS on listeners with
`proxy_protocol = true`, the session Dovecot behind.

HAProxy connects to the gateway from 127.0.0.1 whoever its client is, and the
clients here connect to HAProxy from other loopback addresses (127.0.0.5,
127.0.0.6): a device allowed only from 127.0.0.5 logging in, and the log
saying peer=127.0.0.5, can only come from the header. A header written by
hand from the trusted address carries a foreign address (192.0.2.7) to
`allow_from`, `relay_without_auth` and the log the same way.
"""

from __future__ import annotations

import poplib
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_config import config_head, listen, provider
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.harness.haproxy import HAProxy, ProxyVersion, Route
from tests.helpers.pop3 import HASHER
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.integration

ALLOWED = "127.0.0.5"  # the device's own address, as HAProxy sees it
OTHER = "127.0.0.6"  # another client of HAProxy, not in the device's allow_from
STRANGER = "127.0.0.9"  # a direct, untrusted peer of the gateway
FOREIGN = "192.0.2.7"  # an address only a hand-written header can carry here
VERSIONS: list[ProxyVersion] = ["v1", "v2"]


class Ports:
    def __init__(self) -> None:
        self.pop3s = free_port()
        self.pop3 = free_port()
        self.submission = free_port()
        self.closed = free_port()


def device(name: str, account: str, protocol: str, allow_from: str, extra: str = "") -> str:
    return (
        f'[devices.{name}]\npassword_hash = "{HASHER.hash(name + "-pw")}"\n'
        f'account = "{account}"\nprotocols = ["{protocol}"]\nallow_from = ["{allow_from}"]\n'
        + extra
    )


def config(
    state: Path, ports: Ports, dovecot: Dovecot, upstream: TLSMaterial, own: TLSMaterial
) -> str:
    return "\n".join(
        [
            *config_head(state, own),
            "[proxy]",
            'trusted = ["127.0.0.1"]',
            "header_timeout = 5",
            *listen("pop3", ports.pop3s, "implicit"),
            "proxy_protocol = true",
            *listen("pop3", ports.pop3, "starttls"),
            "proxy_protocol = true",
            *listen("smtp", ports.submission, "starttls"),
            "proxy_protocol = true",
            *provider(
                "dovecot", "pop3", dovecot.pop3s_port, "implicit", upstream.ca_file, timeout=5
            ),
            # Nothing is ever delivered: the tests stop before DATA.
            *provider(
                "nowhere",
                "smtp",
                ports.closed,
                "implicit",
                upstream.ca_file,
                timeout=2,
                host="127.0.0.1",
            ),
            "[accounts.alice]",
            'provider = "dovecot"\nusername = "alice"\npassword = "alice-pw"',
            "[accounts.relay]",
            'provider = "nowhere"\nusername = "relay@example.com"\npassword = "relay-pw"',
            device("printer", "alice", "pop3", f"{ALLOWED}/32"),
            device("faraway", "alice", "pop3", "192.0.2.0/24"),
            device("sender", "relay", "smtp", f"{ALLOWED}/32"),
            device("lan-printer", "relay", "smtp", f"{FOREIGN}/32", "relay_without_auth = true\n"),
        ]
    )


@pytest.fixture(scope="module")
def proxy_ports() -> Ports:
    return Ports()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    dovecot: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    proxy_ports: Ports,
) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("gateway-proxy")
    text = config(base / "state", proxy_ports, dovecot, tls_upstream, tls_gateway)
    ports = [proxy_ports.pop3s, proxy_ports.pop3, proxy_ports.submission]
    with GatewayProcess(base, text, ports) as gw:
        yield gw


@pytest.fixture(scope="module")
def haproxy(
    tmp_path_factory: pytest.TempPathFactory, gateway: GatewayProcess, proxy_ports: Ports
) -> Iterator[HAProxy]:
    routes = [
        Route(f"{name}_{version}", port, version)
        for version in VERSIONS
        for name, port in (
            ("pop3s", proxy_ports.pop3s),
            ("pop3", proxy_ports.pop3),
            ("submission", proxy_ports.submission),
        )
    ]
    with HAProxy(tmp_path_factory.mktemp("haproxy"), routes) as server:
        yield server


class Log:
    """The gateway log from the moment a test starts, so that lines of earlier
    tests (the same device, the other header version) do not count."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.mark = len(gateway.log_text())

    def text(self) -> str:
        return self.gateway.log_text()[self.mark :]

    def wait_for(self, needle: str, timeout: float = 10.0, count: int = 1) -> str:
        return wait_until(
            self.text,
            timeout,
            lambda text: (
                f"{needle!r} not {count} times in the gateway log since the test began:\n{text}"
            ),
            done=lambda text: text.count(needle) >= count,
        )


@pytest.fixture
def log(gateway: GatewayProcess) -> Log:
    return Log(gateway)


def connect(port: int, source: str, header: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))
    if header:
        sock.sendall(header)
    return sock


def pop3s(ctx: ssl.SSLContext, port: int, source: str, header: bytes = b"") -> poplib.POP3_SSL:
    """poplib over implicit TLS from `source`, the header (if any) before the handshake."""

    class Client(poplib.POP3_SSL):
        def _create_socket(self, timeout: Any) -> socket.socket:
            return ctx.wrap_socket(connect(port, source, header), server_hostname="localhost")

    return Client("localhost", port, context=ctx, timeout=20)


def pop3(port: int, source: str) -> poplib.POP3:
    class Client(poplib.POP3):
        def _create_socket(self, timeout: Any) -> socket.socket:
            return connect(port, source)

    return Client("localhost", port, timeout=20)


def smtp(port: int, source: str, header: bytes = b"") -> smtplib.SMTP:
    class Client(smtplib.SMTP):
        def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
            return connect(port, source, header)

    return Client("localhost", port, timeout=20)


def closed_by_gateway(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the gateway closed the connection (EOF or reset) without a byte."""
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def closed_at_once(port: int, source: str, data: bytes = b"") -> bool:
    """Whether the gateway closed a connection from `source` before sending a
    byte. It resets the connection as soon as it accepts it, so the reset may
    already meet connect() or the first send."""
    try:
        with connect(port, source) as sock:
            if data:
                sock.sendall(data)
            return closed_by_gateway(sock)
    except (ConnectionResetError, BrokenPipeError):
        return True


def pop3_login_refused(client: poplib.POP3, name: str) -> bytes:
    client.user(name)
    with pytest.raises(poplib.error_proto) as failure:
        client.pass_(f"{name}-pw")
    reply: bytes = failure.value.args[0]
    return reply


def refused(protocol: str, name: str, peer: str) -> str:
    """The log line of a login refused for the device's network."""
    return f"{protocol} login refused for device {name} from {peer}: address {peer} not in allow"


# -- through HAProxy ---------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_pop3_implicit_tls_sees_the_client_address(
    haproxy: HAProxy, ctx: ssl.SSLContext, log: Log, version: ProxyVersion
) -> None:
    port = haproxy.port(f"pop3s_{version}")
    client = pop3s(ctx, port, ALLOWED)
    assert client.getwelcome().startswith(b"+OK")
    client.user("printer")
    assert client.pass_("printer-pw").startswith(b"+OK maildrop has")
    client.stat()
    client.quit()
    text = log.wait_for(f"pop3 session device=printer peer={ALLOWED} ")
    assert "tls=TLSv1." in text.split(f"pop3 session device=printer peer={ALLOWED} ")[1]

    # Another client of the same proxy is not the device's address.
    client = pop3s(ctx, port, OTHER)
    assert pop3_login_refused(client, "printer") == b"-ERR [AUTH] invalid user name or password"
    client.quit()
    log.wait_for(refused("pop3", "printer", OTHER))
    assert "device printer from 127.0.0.1" not in log.text()
    assert "device=printer peer=127.0.0.1" not in log.text()


@pytest.mark.parametrize("version", VERSIONS)
def test_pop3_stls_greets_after_the_header_and_sees_the_client_address(
    haproxy: HAProxy, ctx: ssl.SSLContext, log: Log, version: ProxyVersion
) -> None:
    port = haproxy.port(f"pop3_{version}")
    client = pop3(port, ALLOWED)
    assert client.getwelcome() == b"+OK POP3 gateway ready"
    assert "STLS" in client.capa()
    client.stls(ctx)
    client.user("printer")
    assert client.pass_("printer-pw").startswith(b"+OK maildrop has")
    client.quit()
    text = log.wait_for(f"pop3 session device=printer peer={ALLOWED} ")
    assert "tls=none" not in text.split(f"pop3 session device=printer peer={ALLOWED} ")[1]

    client = pop3(port, OTHER)
    client.stls(ctx)
    assert pop3_login_refused(client, "printer") == b"-ERR [AUTH] invalid user name or password"
    client.quit()
    log.wait_for(refused("pop3", "printer", OTHER))


@pytest.mark.parametrize("version", VERSIONS)
def test_smtp_starttls_sees_the_client_address(
    haproxy: HAProxy, ctx: ssl.SSLContext, log: Log, version: ProxyVersion
) -> None:
    port = haproxy.port(f"submission_{version}")
    with smtp(port, ALLOWED) as client:
        client.starttls(context=ctx)
        assert client.login("sender", "sender-pw")[0] == 235
    log.wait_for(f"smtp session device=sender peer={ALLOWED} ")

    with smtp(port, OTHER) as client:
        client.starttls(context=ctx)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("sender", "sender-pw")
    log.wait_for(refused("smtp", "sender", OTHER))


def test_health_checks_with_a_v2_local_header_are_accepted(
    tmp_path: Path, gateway: GatewayProcess, proxy_ports: Ports, log: Log
) -> None:
    """HAProxy's health checks send a v2 header with the LOCAL command and no
    addresses: the gateway takes it, and the real peer (the balancer) stands."""
    route = Route("checked", proxy_ports.pop3, "v2", health_check=True)
    with HAProxy(tmp_path / "haproxy", [route]):
        # One of these may be the harness's probe of the frontend; the rest
        # are checks, every 500 ms.
        text = log.wait_for("pop3 session device=- peer=127.0.0.1 ", count=3)
    assert "proxy protocol: connection from 127.0.0.1" not in text


# -- straight to the gateway -------------------------------------------------------------


def test_an_untrusted_peer_is_closed_at_once(
    gateway: GatewayProcess, proxy_ports: Ports, log: Log
) -> None:
    for port in (proxy_ports.pop3s, proxy_ports.pop3, proxy_ports.submission):
        assert closed_at_once(port, STRANGER)
    text = log.wait_for(f"proxy protocol: connection from {STRANGER} refused on smtp ")
    for name, port in [("pop3", proxy_ports.pop3s), ("pop3", proxy_ports.pop3)]:
        assert (
            f"connection from {STRANGER} refused on {name} 127.0.0.1:{port}: not a trusted proxy"
            in text
        )


def test_a_header_from_an_untrusted_peer_is_refused(
    gateway: GatewayProcess, proxy_ports: Ports, log: Log
) -> None:
    header = f"PROXY TCP4 {FOREIGN} 127.0.0.1 5555 110\r\n".encode()
    assert closed_at_once(proxy_ports.pop3, STRANGER, header)
    log.wait_for(f"connection from {STRANGER} refused on pop3 127.0.0.1:{proxy_ports.pop3}")
    assert FOREIGN not in log.text()


def test_a_trusted_peer_without_a_header_is_closed(
    gateway: GatewayProcess, proxy_ports: Ports, log: Log
) -> None:
    # A POP3 client straight to the listener waits for a greeting that never comes.
    with connect(proxy_ports.pop3, "127.0.0.1", b"CAPA\r\n") as sock:
        assert closed_by_gateway(sock)
    # A TLS client starts with its ClientHello.
    with socket.create_connection(("127.0.0.1", proxy_ports.pop3s), timeout=10) as raw:
        context = ssl.create_default_context()
        with pytest.raises(OSError):  # ssl.SSLError or a reset
            context.wrap_socket(raw, server_hostname="localhost")
    text = log.wait_for(f"on pop3 127.0.0.1:{proxy_ports.pop3s}: no PROXY protocol header")
    assert f"on pop3 127.0.0.1:{proxy_ports.pop3}: no PROXY protocol header" in text
    assert "pop3 session" not in text


# -- a hand-written header from the trusted address -------------------------------------


def test_v1_header_carries_a_foreign_address_to_allow_from_and_the_log(
    gateway: GatewayProcess, proxy_ports: Ports, ctx: ssl.SSLContext, log: Log
) -> None:
    header = f"PROXY TCP4 {FOREIGN} 127.0.0.1 5555 995\r\n".encode()
    client = pop3s(ctx, proxy_ports.pop3s, "127.0.0.1", header)
    client.user("faraway")
    assert client.pass_("faraway-pw").startswith(b"+OK maildrop has")
    client.quit()
    log.wait_for(f"pop3 session device=faraway peer={FOREIGN} ")

    # The same device straight from loopback, also with a header: not its network.
    header = b"PROXY TCP4 127.0.0.1 127.0.0.1 5555 995\r\n"
    client = pop3s(ctx, proxy_ports.pop3s, "127.0.0.1", header)
    assert pop3_login_refused(client, "faraway") == b"-ERR [AUTH] invalid user name or password"
    client.quit()
    log.wait_for(refused("pop3", "faraway", "127.0.0.1"))


def test_v1_header_carries_a_foreign_address_to_relay_without_auth(
    gateway: GatewayProcess, proxy_ports: Ports, ctx: ssl.SSLContext, log: Log
) -> None:
    def mail_from(address: str) -> int:
        header = f"PROXY TCP4 {address} 127.0.0.1 5555 587\r\n".encode()
        with smtp(proxy_ports.submission, "127.0.0.1", header) as client:
            client.starttls(context=ctx)
            client.ehlo()
            code, _ = client.mail("relay@example.com")
            client.rset()
        return code

    assert mail_from(FOREIGN) == 250
    log.wait_for(f"smtp session device=lan-printer peer={FOREIGN} ")
    assert mail_from("198.51.100.1") == 550
    log.wait_for("smtp relay refused for 198.51.100.1: not authenticated")


def test_header_split_over_packets(
    gateway: GatewayProcess, proxy_ports: Ports, ctx: ssl.SSLContext, log: Log
) -> None:
    header = f"PROXY TCP4 {FOREIGN} 127.0.0.1 5555 110\r\n".encode()
    sock = connect(proxy_ports.pop3, "127.0.0.1")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(0, len(header), 7):
        sock.sendall(header[i : i + 7])
        time.sleep(0.01)  # spaced so that the gateway reads them one by one
    sock.settimeout(10)
    assert sock.recv(100) == b"+OK POP3 gateway ready\r\n"
    sock.sendall(b"QUIT\r\n")
    assert sock.recv(100).startswith(b"+OK")
    sock.close()
    log.wait_for(f"pop3 session device=- peer={FOREIGN} ")
