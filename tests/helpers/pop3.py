"""A gateway configuration in front of the session Dovecot, shared by the POP3
integration and interop tests: accounts for every upstream situation (good,
STLS, wrong password, wrong CA, down) and devices mapped to them."""

from __future__ import annotations

from pathlib import Path

from argon2 import PasswordHasher

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_config import config_head, listen, provider
from tests.harness.gateway_process import free_port

HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


class Ports:
    def __init__(self) -> None:
        self.implicit = free_port()
        self.starttls = free_port()
        self.legacy = free_port()
        self.closed = free_port()


def device(name: str, account: str, allow_from: str = "127.0.0.0/8") -> str:
    return (
        f'[devices.{name}]\npassword_hash = "{HASHER.hash(name + "-pw")}"\n'
        f'account = "{account}"\nallow_from = ["{allow_from}"]\n'
    )


def gateway_config(
    state: Path,
    ports: Ports,
    dovecot: Dovecot,
    upstream: TLSMaterial,
    own: TLSMaterial,
    stranger_ca: Path,
) -> str:
    return "\n".join(
        [
            *config_head(state, own),
            "[pop3]",
            "idle_timeout = 600",
            *listen("pop3", ports.implicit, "implicit"),
            *listen("pop3", ports.starttls, "starttls"),
            "[[pop3.listen]]",
            f'address = "127.0.0.1"\nport = {ports.legacy}\ntls = "implicit"\nmin_tls = "1.0"',
            *provider(
                "dovecot", "pop3", dovecot.pop3s_port, "implicit", upstream.ca_file, timeout=5
            ),
            *provider("dovecot-stls", "pop3", dovecot.pop3_port, "starttls", upstream.ca_file),
            'pop3_auth = "user"',
            *provider("wrong-ca", "pop3", dovecot.pop3s_port, "implicit", stranger_ca),
            *provider(
                "down",
                "pop3",
                ports.closed,
                "implicit",
                upstream.ca_file,
                timeout=2,
                host="127.0.0.1",
            ),
            "[accounts.alice]",
            'provider = "dovecot"\nusername = "alice"\npassword = "alice-pw"',
            "[accounts.bob]",
            'provider = "dovecot-stls"\nusername = "bob"\npassword = "bob-pw"',
            "[accounts.alice-badpw]",
            'provider = "dovecot"\nusername = "alice"\npassword = "not-alices-password"',
            "[accounts.alice-wrong-ca]",
            'provider = "wrong-ca"\nusername = "alice"\npassword = "alice-pw"',
            "[accounts.down]",
            'provider = "down"\nusername = "alice"\npassword = "alice-pw"',
            device("printer", "alice"),
            device("copier", "alice"),
            device("scanner", "bob"),
            device("misconfigured", "alice-badpw"),
            device("suspicious", "alice-wrong-ca"),
            device("orphan", "down"),
            device("faraway", "alice", allow_from="192.0.2.0/24"),
        ]
    )


def message(n: int, body_lines: int = 5) -> bytes:
    lines = [f"line {i} of message {n}" for i in range(body_lines)]
    lines[1] = "." + lines[1]  # a line that needs dot-stuffing
    return (
        f"From: sender@example.com\nTo: alice@example.com\nSubject: message {n}\n"
        f"Message-ID: <{n}@example.com>\n\n" + "\n".join(lines) + "\n"
    ).encode()


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
