"""Socket and address helpers shared by the device-facing servers and the upstream clients."""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def parse_peer_address(address: str) -> IPAddress | None:
    """The peer's IP address, an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
    what a dual-stack listener reports for IPv4 clients) folded to IPv4 so
    IPv4 networks in the config match it; None when `address` is not an IP.

    Remembered for the last few thousand addresses: each login asks several
    times (limits, allow_from, penalties), devices come back from the same
    addresses, and `ipaddress` parsing costs more than what it is asked for."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def set_no_delay(transport: Any) -> None:
    """Nagle plus the peer's delayed ACK costs ~40 ms per short reply: turn it off.

    Under TLS the protocol's transport is the TLS wrapper: it forwards the call
    to the TCP transport underneath, or exposes that as its own `transport`. A
    transport without TCP (in-memory tests, UNIX sockets) has no such call.
    """
    for candidate in (transport, getattr(transport, "transport", None)):
        setter = getattr(candidate, "setTcpNoDelay", None)
        if setter is not None:
            try:
                setter(True)
            except OSError:
                pass
            return
