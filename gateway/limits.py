"""How many device connections the gateway holds, from whom, and for how long.

A scanner, a looping device or an attacker can open sockets faster than the
idle timeouts close them; every one costs memory, a file descriptor and, once
logged in, an upstream session. `ConnectionLimits` counts the open device
connections (POP3 and SMTP together) globally, per source address and per
logged-in device, and refuses one over a limit: the server then answers with
its protocol's temporary refusal (`-ERR [SYS/TEMP]`, `421 4.7.0`) and closes.

The counts live in this one object, held by the runtime and asked by both
servers at connect, at login and at close, so that shared state between
gateway processes can later replace it without touching the servers. The
address is the one `getPeer()` answers with: behind a load balancer, the
PROXY protocol's (`gateway.proxy_protocol`).

Each connection also gets a deadline for its whole life (`Slot.lifetime`): a
device trickling a byte now and then resets the idle timer for ever, but not
this one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Final, Literal

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from gateway.command_queue import CLOSE_GRACE, Deadline
from gateway.model import LimitSettings
from gateway.net import parse_peer_address
from gateway.sessions import log_value

log = Logger(namespace="gateway.limits")

LimitName = Literal["total", "address", "device"]
LIMIT_NAMES: Final[tuple[LimitName, ...]] = ("total", "address", "device")

# What the device is told, and what the session line's outcome says.
REFUSALS: Final[dict[LimitName, str]] = {
    "total": "too many connections to the gateway",
    "address": "too many connections from your address",
    "device": "too many sessions of this device",
}
LIFETIME_EXCEEDED: Final = "session lifetime exceeded"
# Seconds a peer has to read a refusal and close before it is cut off: over
# TLS a clean close waits for the peer's close_notify, which a client that
# keeps its socket open never sends.


def address_key(peer: str) -> str:
    """One address however it is spelled (an IPv4-mapped IPv6 address counts
    as its IPv4 address, as `allow_from` sees it)."""
    ip = parse_peer_address(peer)
    return peer if ip is None else str(ip)


class ConnectionLimits:
    """The open device connections, counted; `settings()` is read at every
    connect and login, so a reload applies to the next connection."""

    def __init__(self, settings: Callable[[], LimitSettings] = LimitSettings) -> None:
        self._settings = settings
        self.total = 0
        self.by_address: Counter[str] = Counter()
        self.by_device: Counter[str] = Counter()

    def admit(
        self, protocol: str, peer: str, clock: IReactorTime, expired: Callable[[], None]
    ) -> Slot:
        """A new connection from `peer`: its slot, refused (`Slot.refused`) if
        it is one too many. An admitted slot's lifetime deadline is running;
        it calls `expired` unless `Slot.close` comes first."""
        settings = self._settings()
        address = address_key(peer)
        slot = Slot(self, protocol, peer, address, clock)
        if self.total >= settings.max_connections:
            slot.refused = self._refuse(slot, "total", settings.max_connections)
        elif self.by_address[address] >= settings.max_connections_per_address:
            slot.refused = self._refuse(slot, "address", settings.max_connections_per_address)
        else:
            self.total += 1
            self.by_address[address] += 1
            slot.lifetime = Deadline(clock, settings.max_session_lifetime, expired)
            slot.lifetime.start()
        return slot

    def count_login(self, slot: Slot, device: str) -> str | None:
        settings = self._settings()
        if self.by_device[device] >= settings.max_sessions_per_device:
            return self._refuse(slot, "device", settings.max_sessions_per_device, device)
        self.by_device[device] += 1
        return None

    def release(self, slot: Slot) -> None:
        self.total -= 1
        _decrement(self.by_address, slot.address)
        if slot.device is not None:
            _decrement(self.by_device, slot.device)

    def _refuse(self, slot: Slot, limit: LimitName, maximum: int, device: str | None = None) -> str:
        """Log the refusal (no fail2ban match: a busy address or device is not
        a password guesser) and say what to tell the device."""
        fields = {
            "protocol": slot.protocol,
            "peer": log_value(slot.peer),
            "limit": limit,
            "maximum": maximum,
        }
        if device is None:
            log.warn(
                "{protocol} connection from {peer} refused: {limit} limit of {maximum} reached",
                **fields,
            )
        else:
            log.warn(
                "{protocol} login of device {device} from {peer} refused: "
                "{limit} limit of {maximum} reached",
                device=log_value(device),
                **fields,
            )
        return REFUSALS[limit]


def _decrement(counts: Counter[str], key: str) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        # An address seen once must not stay in memory for ever.
        del counts[key]


class Slot:
    """One connection's place in the counts, from connect to close."""

    def __init__(
        self,
        limits: ConnectionLimits,
        protocol: str,
        peer: str,
        address: str,
        clock: IReactorTime,
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._linger: Deadline | None = None
        self.protocol = protocol
        self.peer = peer
        self.address = address
        # Why the connection was refused (the reply text), None if admitted.
        self.refused: str | None = None
        self.device: str | None = None
        self.lifetime: Deadline | None = None
        self._open = True

    def login(self, device: str) -> str | None:
        """`device` logged in on this connection: None if it may, else why not
        (the connection is then to be closed; it still counts until `close`).
        A second login on one connection (SMTP after RSET) counts once."""
        if self.refused is not None or self.device == device:
            return self.refused
        refused = self._limits.count_login(self, device)
        if refused is None:
            if self.device is not None:
                _decrement(self._limits.by_device, self.device)
            self.device = device
        return refused

    def postpone(self, seconds: float) -> None:
        """Let the lifetime expire `seconds` from now instead (a command that
        must not be cut, such as a message being made safe, is finishing)."""
        if self.lifetime is not None:
            self.lifetime.seconds = seconds
            self.lifetime.start()

    def closing(self, abort: Callable[[], None]) -> None:
        """The server is closing the connection for a limit: the lifetime no
        longer matters, and `abort` cuts it off unless it is gone within
        `CLOSE_GRACE` seconds (a refused connection counts nowhere, so one
        left open would be a way round the limits)."""
        if self.lifetime is not None:
            self.lifetime.stop()
        if self._linger is None and self._open:
            self._linger = Deadline(self._clock, CLOSE_GRACE, abort)
            self._linger.start()

    def close(self) -> None:
        """The connection is gone: it counts no more and its deadlines stop.

        They are closed, not only stopped: their callbacks are the server's
        methods, and the server holds this slot (a cycle otherwise).
        """
        if self.lifetime is not None:
            self.lifetime.close()
        if self._linger is not None:
            self._linger.close()
        if self._open and self.refused is None:
            self._limits.release(self)
        self._open = False
