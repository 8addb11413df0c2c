"""The configuration model: providers, accounts, devices and listeners.

These frozen objects are what the rest of the gateway sees; `gateway.config`
builds them from the operator's TOML file and reports every problem it finds.
Keeping the model apart from the loader lets tests and the demo build a
configuration in code without writing a file.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

TLSMode = Literal["implicit", "starttls"]
TLSVersionName = Literal["1.0", "1.1", "1.2", "1.3"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ANY_ADDRESS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("0.0.0.0/0"),
    ipaddress.ip_network("::/0"),
)


class Secret:
    """A string that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Endpoint:
    """One upstream server: where it listens and how TLS starts there."""

    host: str
    port: int
    tls: TLSMode = "implicit"


@dataclass(frozen=True)
class Provider:
    """Where an upstream lives. `ca_file` None means the system trust store."""

    name: str
    pop3: Endpoint | None = None
    imap: Endpoint | None = None
    smtp: Endpoint | None = None
    ca_file: Path | None = None
    # Seconds for connecting and for each upstream command (login, LIST, ...).
    timeout: float = 30.0
    # How to log in to POP3 with a password: "user" (USER/PASS) or "plain"
    # (AUTH PLAIN). "auto" picks AUTH PLAIN when CAPA offers it.
    pop3_auth: Literal["auto", "user", "plain"] = "auto"


@dataclass(frozen=True)
class Account:
    """One upstream mailbox identity at a provider."""

    name: str
    provider: str
    username: str
    password: Secret | None = None
    auth: Literal["password"] = "password"


@dataclass(frozen=True)
class Device:
    """One local client identity; it logs in with its own password."""

    name: str
    password_hash: Secret
    account: str
    allow_from: tuple[IPNetwork, ...] = ANY_ADDRESS
    protocols: frozenset[str] = frozenset({"pop3", "smtp"})

    def allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.allow_from)


@dataclass(frozen=True)
class Listener:
    """One listening socket for devices."""

    protocol: Literal["pop3", "smtp"]
    port: int
    tls: TLSMode
    address: str = "0.0.0.0"
    min_tls: TLSVersionName = "1.2"
    # Accept USER/PASS/AUTH on a starttls listener before STLS. Off by default:
    # a device's password would cross the network in clear.
    allow_plaintext_auth: bool = False


@dataclass(frozen=True)
class TLSFiles:
    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class POP3Settings:
    listeners: tuple[Listener, ...] = ()
    # RFC 1939 asks for at least ten minutes before an idle session is closed.
    idle_timeout: float = 600.0


@dataclass(frozen=True)
class Config:
    state_dir: Path
    tls: TLSFiles | None
    pop3: POP3Settings = field(default_factory=POP3Settings)
    providers: dict[str, Provider] = field(default_factory=dict)
    accounts: dict[str, Account] = field(default_factory=dict)
    devices: dict[str, Device] = field(default_factory=dict)
    source: Path | None = None
