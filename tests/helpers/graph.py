"""Graph-backed accounts in tests: messages that exercise the wire form, a
sink that collects what a maildrop writes, and gateway configs in front of
the Graph emulator (tests/harness/graph_emulator.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IConsumer
from zope.interface import implementer

from gateway.dotstuff import unstuff
from tests.harness.certs import TLSMaterial
from tests.harness.gateway_config import config_head, listen
from tests.helpers.pop3 import HASHER


def varied_mime() -> list[bytes]:
    """Messages whose wire form is easy to get wrong: dot lines (also where
    64 KiB chunks of the emulator's answer end), 8-bit text, long lines, a
    message with bare LF line ends and one without a final line end."""
    chunk = 64 * 1024
    dot_at_boundary = bytearray(b"Subject: dots at chunk ends\r\nMessage-ID: <dots@x>\r\n\r\n")
    while len(dot_at_boundary) < 3 * chunk:
        line = b"x" * 70 + b"\r\n"
        room = chunk - len(dot_at_boundary) % chunk
        if room <= len(line) + 4:
            dot_at_boundary += b"y" * (room - 2) + b"\r\n" + b".leading dot at a chunk start\r\n"
        else:
            dot_at_boundary += line
    dot_at_boundary += b".\r\n..\r\n.end\r\n"
    return [
        b"From: a@example.com\r\nSubject: plain\r\nMessage-ID: <1@x>\r\n\r\nhello\r\n.dot\r\n",
        "Subject: 8-bit\r\nMessage-ID: <2@x>\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße, ½ € ✓\r\n".encode(),
        b"Subject: long\r\nMessage-ID: <3@x>\r\n\r\n" + b"L" * 20000 + b"\r\n.x\r\n",
        bytes(dot_at_boundary),
        b"Subject: bare LF\nMessage-ID: <5@x>\n\nline one\n.two\nthree\n",
        b"Subject: no final line end\r\nMessage-ID: <6@x>\r\n\r\nlast line",
    ]


def wire(mime: bytes) -> bytes:
    """What RETR must send for `mime` before dot-stuffing: CRLF lines, ending in CRLF."""
    out = mime.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return out if out.endswith(b"\r\n") or not out else out + b"\r\n"


def top_of(mime: bytes, lines: int) -> bytes:
    message = wire(mime)
    head, sep, body = message.partition(b"\r\n\r\n")
    kept = body.split(b"\r\n")[:-1][:lines] if body else []
    return head + sep + b"".join(line + b"\r\n" for line in kept)


@implementer(IConsumer)
class Sink:
    """Collects what a maildrop writes; can pause its producer like a slow device."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.producer: Any = None
        self.registrations = 0

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert self.producer is None, "a producer is already registered"
        self.producer = producer
        self.registrations += 1

    def unregisterProducer(self) -> None:
        self.producer = None

    @property
    def data(self) -> bytes:
        return b"".join(self.parts)

    def message(self) -> bytes:
        return unstuff(self.data)


def graph_gateway_config(
    state: Path,
    ports: dict[str, int],
    graph_url: str,
    idp_url: str,
    client_secret_file: Path,
    own: TLSMaterial,
    accounts: dict[str, dict[str, Any]],
    devices: dict[str, str],
) -> str:
    """A gateway with POP3 listeners, provider "m365" at the emulator and the
    given Graph accounts (name -> extra keys) and devices (name -> account)."""
    lines = [
        *config_head(state, own),
        "[pop3]",
        "idle_timeout = 600",
        *listen("pop3", ports["implicit"], "implicit"),
        *listen("pop3", ports["starttls"], "starttls"),
        "[providers.m365]",
        f'graph_url = "{graph_url}"',
        "timeout = 5",
        f'oauth = {{ token_url = "{idp_url}/token", '
        f'device_authorization_url = "{idp_url}/device", client_id = "gateway", '
        f'client_secret_file = "{client_secret_file}", scopes = ["mail", "offline_access"] }}',
    ]
    for name, extra in accounts.items():
        lines += [
            f"[accounts.{name}]",
            'provider = "m365"\nusername = "alice"\nauth = "oauth2"',
            'grant = "device_code"\nmailbox = "graph"',
        ]
        for key, value in extra.items():
            text = f'"{value}"' if isinstance(value, str) else str(value).lower()
            lines.append(f"{key} = {text}")
    for device, account in devices.items():
        lines.append(
            f'[devices.{device}]\npassword_hash = "{HASHER.hash(device + "-pw")}"\n'
            f'account = "{account}"\nallow_from = ["127.0.0.0/8"]\nprotocols = ["pop3"]'
        )
    return "\n".join(lines) + "\n"
