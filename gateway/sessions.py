"""What the device-facing servers (POP3 and SMTP) share about a device connection.

Both servers write one log line per session from a record they fill in as
the session goes, and treat the device's transport the same way: its peer
address, Nagle off, and the TLS version and cipher once TLS is up. The
protocol-specific counters stay in each server's own record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gateway.tls import describe


@dataclass
class BaseSessionRecord:
    """The fields of the one session log line that every device protocol has."""

    peer: str
    started: float
    device: str = "-"
    account: str = "-"
    tls_version: str = "none"
    tls_cipher: str = "none"
    outcome: str = "dropped"
    auth_failures: list[str] = field(default_factory=list)

    def log_fields(self) -> dict[str, Any]:
        """The fields every protocol's session line has, named alike in all of them."""
        return {
            "device": self.device,
            "peer": self.peer,
            "account": self.account,
            "tls_version": self.tls_version,
            "tls_cipher": self.tls_cipher,
            "duration": time.monotonic() - self.started,
            "outcome": self.outcome,
        }

    def note_tls(self, transport: Any) -> None:
        """Record the TLS version and cipher of `transport` (once data came over it:
        before the handshake completes there is nothing to tell)."""
        self.tls_version, self.tls_cipher = tls_description(transport)


def tls_description(transport: Any) -> tuple[str, str]:
    """(version, cipher) of a TLS transport; ("none", "none") for anything else."""
    handle = getattr(transport, "getHandle", lambda: None)()
    return describe(handle if hasattr(handle, "get_cipher_name") else None)


def peer_host(transport: Any) -> str:
    """The device's address for logs and network policy, without the port."""
    peer = transport.getPeer()
    return getattr(peer, "host", str(peer))


def set_no_delay(transport: Any) -> None:
    """Nagle plus the peer's delayed ACK costs ~40 ms per reply: turn it off.

    Under TLS the protocol's transport is the TLS wrapper; the TCP transport
    is the wrapper's own `transport`.
    """
    tcp = getattr(transport, "transport", transport)
    setter = getattr(tcp, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:
            pass
