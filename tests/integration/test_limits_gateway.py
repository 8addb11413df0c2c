"""Connection limits in the real twistd gateway, driven by poplib and smtplib:
the connection over the per-address limit is refused with the protocol's
temporary error (POP3 and SMTP counted together), a device's second session
is refused at login, a session over its lifetime is closed without deleting
anything upstream, and each refusal shows in the log and the metrics."""

from __future__ import annotations

import poplib
import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_config import config_head, listen, provider
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.helpers.pop3 import HASHER
from tests.integration.test_admin_metrics import eventually, scrape, total

pytestmark = pytest.mark.integration

PER_ADDRESS = 2
LIFETIME = 4  # seconds: long enough for a login, short enough to wait for


class Ports:
    def __init__(self) -> None:
        self.pop3 = free_port()
        self.smtp = free_port()
        self.admin = free_port()
        self.closed = free_port()


def config_text(
    state: Path, ports: Ports, dovecot: Dovecot, upstream: TLSMaterial, own: TLSMaterial
) -> str:
    return "\n".join(
        [
            *config_head(state, own),
            "[admin]",
            f'address = "127.0.0.1"\nport = {ports.admin}',
            "[limits]",
            f"max_connections_per_address = {PER_ADDRESS}",
            "max_sessions_per_device = 1",
            f"max_session_lifetime = {LIFETIME}",
            *listen("pop3", ports.pop3, "implicit"),
            *listen("smtp", ports.smtp, "implicit"),
            *provider(
                "dovecot", "pop3", dovecot.pop3s_port, "implicit", upstream.ca_file, timeout=5
            ),
            *provider(
                "nowhere", "smtp", ports.closed, "implicit", upstream.ca_file, host="127.0.0.1"
            ),
            "[accounts.alice]",
            'provider = "dovecot"\nusername = "alice"\npassword = "alice-pw"',
            "[accounts.relay]",
            'provider = "nowhere"\nusername = "relay"\npassword = "relay-pw"',
            "[devices.printer]",
            f'password_hash = "{HASHER.hash("printer-pw")}"',
            'account = "alice"\nprotocols = ["pop3"]\nallow_from = ["127.0.0.0/8"]',
            "[devices.mailer]",
            f'password_hash = "{HASHER.hash("mailer-pw")}"',
            'account = "relay"\nprotocols = ["smtp"]\nallow_from = ["127.0.0.0/8"]',
        ]
    )


@pytest.fixture(scope="module")
def limit_ports() -> Ports:
    return Ports()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    dovecot: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    limit_ports: Ports,
) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("limits-gateway")
    text = config_text(base / "state", limit_ports, dovecot, tls_upstream, tls_gateway)
    with GatewayProcess(base, text, [limit_ports.pop3, limit_ports.smtp, limit_ports.admin]) as gw:
        yield gw


def no_open_connections(port: int) -> bool:
    _, samples = scrape(port)
    return total(samples, "gateway_sessions_active") == 0


def test_limits_in_the_running_gateway(
    gateway: GatewayProcess, limit_ports: Ports, clean_mailboxes: Dovecot, ctx: ssl.SSLContext
) -> None:
    ports = limit_ports
    # The start-up probes of the harness are connections too: let them go.
    eventually(lambda: no_open_connections(ports.admin))

    def pop() -> poplib.POP3_SSL:
        return poplib.POP3_SSL("localhost", ports.pop3, context=ctx, timeout=20)

    # Per address, both protocols together: two POP3 sessions fill it.
    first, second = pop(), pop()
    with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\] too many connections from"):
        pop()
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP_SSL("localhost", ports.smtp, context=ctx, timeout=20)
    assert refused.value.smtp_code == 421
    assert refused.value.smtp_error.startswith(b"4.7.0 too many connections from")
    second.quit()
    eventually(lambda: total(scrape(ports.admin)[1], "gateway_sessions_active") == 1)

    # Per device, at login: the printer has one session at most.
    assert first.user("printer").startswith(b"+OK")
    assert first.pass_("printer-pw").startswith(b"+OK maildrop")
    other = pop()
    other.user("printer")
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\] too many sessions of this device"):
        other.pass_("printer-pw")
    assert other.file.readline() == b""  # closed by the gateway
    other.close()
    first.quit()
    eventually(lambda: no_open_connections(ports.admin))

    # Lifetime: a session that marked a message deleted is dropped, not quit.
    clean_mailboxes.deliver("alice", b"Subject: keep me\n\nstill here\n")
    client = pop()
    client.user("printer")
    client.pass_("printer-pw")
    assert client.dele(1).startswith(b"+OK")
    line = client.file.readline()  # nothing sent: the gateway speaks when time is up
    assert line == b"-ERR [SYS/TEMP] session lifetime exceeded, closing connection\r\n"
    assert client.file.readline() == b""  # closed
    client.close()
    gateway.wait_for_log('outcome="session lifetime exceeded"')
    assert len(clean_mailboxes.messages("alice")) == 1

    log = gateway.log_text()
    assert "pop3 connection from 127.0.0.1 refused: address limit of 2 reached" in log
    assert "smtp connection from 127.0.0.1 refused: address limit of 2 reached" in log
    assert "pop3 login of device printer from 127.0.0.1 refused: device limit of 1 reached" in log
    _, samples = scrape(ports.admin)
    refused_total = "gateway_connections_refused_total"
    assert total(samples, refused_total, protocol="pop3", limit="address") == 1
    assert total(samples, refused_total, protocol="smtp", limit="address") == 1
    assert total(samples, refused_total, protocol="pop3", limit="device") == 1
    assert total(samples, "gateway_sessions_total", outcome="session lifetime exceeded") == 1
