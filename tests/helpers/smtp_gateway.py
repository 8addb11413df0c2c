"""A gateway configuration for the SMTP integration tests: the real twistd gateway
relaying to Dovecot's submission service (587, STARTTLS), which relays to an
aiosmtpd sink, and to an aiosmtpd submission server on implicit TLS (465)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.certs import TLSMaterial
from tests.harness.gateway_config import config_head, listen
from tests.harness.gateway_process import free_port
from tests.harness.smtp_sink import Received, SMTPSink, read_messages
from tests.helpers.pop3 import HASHER
from tests.helpers.waiting import wait_until

SUBMISSION_USERS = {"scanner@example.com": "scanner-pw", "alarm@example.com": "alarm-pw"}
SMTPS_USERS = {"relay@example.com": "relay-pw"}


@dataclass
class SMTPPorts:
    submission: int = field(default_factory=free_port)  # starttls, like 587
    smtps: int = field(default_factory=free_port)  # implicit, like 465
    lan: int = field(default_factory=free_port)  # starttls, no plaintext AUTH, like 25
    flaky: int = field(default_factory=free_port)  # an upstream that is down at first

    def listening(self) -> list[int]:
        return [self.submission, self.smtps, self.lan]


def device(name: str, account: str, *, relay_without_auth: bool = False, net: str = "") -> str:
    lines = [
        f"[devices.{name}]",
        f'password_hash = "{HASHER.hash(name + "-pw")}"',
        f'account = "{account}"',
        'protocols = ["smtp"]',
        f'allow_from = ["{net or "127.0.0.0/8"}"]',
    ]
    if relay_without_auth:
        lines.append("relay_without_auth = true")
    return "\n".join(lines)


def smtp_gateway_config(
    state: Path,
    ports: SMTPPorts,
    *,
    submission_port: int,
    smtps_port: int,
    upstream: TLSMaterial,
    own: TLSMaterial,
) -> str:
    def provider(name: str, port: int, tls: str, timeout: int = 5) -> str:
        return (
            f"[providers.{name}]\n"
            f'smtp = {{ host = "localhost", port = {port}, tls = "{tls}" }}\n'
            f'ca_file = "{upstream.ca_file}"\n'
            f"timeout = {timeout}"
        )

    return "\n".join(
        [
            *config_head(state, own),
            "[smtp]",
            "idle_timeout = 60",
            "max_message_size = 5000000",
            "max_recipients = 5",
            "retry_first = 1",
            "retry_max_interval = 2",
            "message_lifetime = 3600",
            *listen("smtp", ports.submission, "starttls"),
            *listen("smtp", ports.smtps, "implicit"),
            *listen("smtp", ports.lan, "starttls"),
            provider("submission", submission_port, "starttls"),
            provider("smtps", smtps_port, "implicit"),
            provider("flaky", ports.flaky, "implicit", timeout=2),
            "[accounts.scanner]",
            'provider = "submission"\nusername = "scanner@example.com"\npassword = "scanner-pw"',
            'allowed_senders = ["*@scan.example.com"]',
            "rewrite_sender = true\nrewrite_from_header = true",
            "[accounts.alarm]",
            'provider = "submission"\nusername = "alarm@example.com"\npassword = "alarm-pw"',
            "[accounts.direct]",
            'provider = "smtps"\nusername = "relay@example.com"\npassword = "relay-pw"',
            "[accounts.flaky]",
            'provider = "flaky"\nusername = "relay@example.com"\npassword = "relay-pw"',
            device("printer", "scanner"),
            device("alarm-panel", "alarm"),
            device("lan-printer", "alarm", relay_without_auth=True, net="127.0.0.2/32"),
            device("direct-dev", "direct"),
            device("flaky-dev", "flaky"),
        ]
    )


def server_context(material: TLSMaterial) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(material.certificate), str(material.private_key))
    return context


def smtps_sink(directory: Path, material: TLSMaterial, port: int = 0) -> SMTPSink:
    """An aiosmtpd submission server on implicit TLS with AUTH: a 465 upstream."""
    return SMTPSink(
        directory, port=port, tls=server_context(material), implicit=True, users=SMTPS_USERS
    )


def without_trace(content: bytes) -> bytes:
    """The message as the gateway sent it: Dovecot prepends one Received: field."""
    if not content.startswith(b"Received: "):
        return content
    lines = content.split(b"\r\n")
    i = 1
    while i < len(lines) and lines[i][:1] in (b" ", b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])


def wait_for(directory: Path, marker: bytes, count: int = 1, timeout: float = 15) -> list[Received]:
    """Messages in a sink directory that contain `marker`, once `count` arrived."""
    return wait_until(
        lambda: [m for m in read_messages(directory) if marker in m.content],
        timeout,
        lambda found: f"{len(found)} of {count} messages with {marker!r} arrived",
        done=lambda found: len(found) >= count,
    )
