"""What the device-facing servers (POP3 and SMTP) share about a device session.

Both servers write one log line per session from a record they fill in as
the session goes, describe the device's transport the same way (peer
address, TLS version and cipher once TLS is up), and refuse a login the same
way: one log line fail2ban can match, a pause before the answer, and a limit
of failures per connection. The protocol-specific counters and reply texts
stay in each server.

The pause is one second, or the login penalty's pause (gateway.penalties)
when that is longer: 1, 2, 4, 8, 15 s for failures in a row from one
address. A penalty a failure starts (an address locked out, a device name
slowed) gets its own line in the `gateway.penalties` namespace; the
lockout's reads `login lockout for ADDRESS: ...`, which the shipped fail2ban
filter matches too.

Every value in a log line goes through `log_value`: a user name a device
sent is as untrusted as any other input, and a line must not be forgeable
(a LF starts a new one) nor readable two ways (`ghost from 10.77.77.77:
wrong password` as a user name reads as a refusal for that address).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from gateway.devices import AuthFailed
from gateway.penalties import Penalized
from gateway.tls import describe

# Refuse further logins on a connection after this many failures.
MAX_AUTH_FAILURES = 3

penalty_log = Logger(namespace="gateway.penalties")

# Written as they are: names, addresses, numbers. Nothing here can end a
# field or a line, or open a quoted value.
_BARE = re.compile(r"[A-Za-z0-9._@+:/,-]+")


def log_value(value: str) -> str:
    """`value` as one unambiguous field of a log line.

    Names and addresses stay as they are; anything else (spaces, quotes,
    control characters, non-ASCII, the empty string) becomes a JSON string
    in double quotes, so it cannot end the field or the line, and reads back
    exactly with `json.loads`.
    """
    if _BARE.fullmatch(value):
        return value
    return json.dumps(value, ensure_ascii=True)


@dataclass
class BaseSessionRecord:
    """The fields of the one session log line that every device protocol has.

    `started` is the injected clock's time at connect, so a test's memory
    clock decides the logged duration, as the reactor does in production.
    """

    peer: str
    started: float
    device: str = "-"
    account: str = "-"
    tls_version: str = "none"
    tls_cipher: str = "none"
    outcome: str = "dropped"
    auth_failures: list[str] = field(default_factory=list)

    def log_fields(self, now: float) -> dict[str, Any]:
        """The fields every protocol's session line has, named alike in all of them."""
        return {
            "device": log_value(self.device),
            "peer": log_value(self.peer),
            "account": log_value(self.account),
            "tls_version": log_value(self.tls_version),
            "tls_cipher": log_value(self.tls_cipher),
            "duration": now - self.started,
            "outcome": log_value(self.outcome),
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


class Refused(Enum):
    """What the server does after `LoginRefusals.refuse`."""

    ANSWER = "answer"  # send the protocol's refusal; the device may try again
    CLOSE = "close"  # send the refusal, then close: too many failures
    GONE = "gone"  # the device left during the pause: nothing to send


class LoginRefusals:
    """A refused device login, the same for POP3 and SMTP.

    The pause before each refusal makes guessing slow without holding a
    worker: it is a timer on the injected clock, not a sleeping thread.
    """

    def __init__(
        self,
        protocol: str,
        log: Logger,
        record: BaseSessionRecord,
        clock: IReactorTime,
        delay: float,
        limit: int = MAX_AUTH_FAILURES,
    ) -> None:
        self._protocol = protocol
        self._log = log
        self._record = record
        self._clock = clock
        self._delay = delay
        self._limit = limit

    async def refuse(
        self, user: str, refusal: AuthFailed, connected: Callable[[], bool]
    ) -> Refused:
        """Log the refusal, pause, and say what to answer. `connected()` tells
        whether the device is still there after the pause.

        The line is what etc/fail2ban/filter.d/gateway.conf matches: only the
        gateway's own text comes before the peer address, and the one value a
        device chose (the user name) is a single `log_value` field.
        """
        self._record.auth_failures.append(refusal.reason)
        self._log.warn(
            "{protocol} login refused for device {device} from {peer}: {reason}",
            protocol=self._protocol,
            device=log_value(refusal.device or user),
            peer=log_value(self._record.peer),
            reason=refusal.reason,
        )
        for penalty in refusal.penalized:
            log_penalty(penalty, self._record.peer)
        await deferLater(self._clock, max(self._delay, refusal.delay), lambda: None)
        if not connected():
            return Refused.GONE
        if len(self._record.auth_failures) >= self._limit:
            self._record.outcome = "too many login failures"
            return Refused.CLOSE
        return Refused.ANSWER


def log_penalty(penalty: Penalized, peer: str) -> None:
    """The line for a penalty that starts. A lockout's names the address the
    gateway saw before anything else that varies, so the fail2ban filter's
    <HOST> is never a client's text; a slowdown names no address (it is
    about a device name, from everywhere) and no filter matches it."""
    if penalty.kind == "lockout":
        penalty_log.warn(
            "login lockout for {peer}: {failures} failed logins within {window} s from "
            "{network}, refused for {seconds} s",
            penalty="lockout",
            peer=log_value(peer),
            network=log_value(penalty.network),
            device=log_value(penalty.device),
            failures=penalty.failures,
            window=round(penalty.window),
            seconds=round(penalty.seconds),
        )
    else:
        penalty_log.warn(
            "login slowdown for device {device}: {failures} failed logins within {window} s "
            "from all addresses; addresses it has not logged in from wait up to {seconds} s",
            penalty="device_slowdown",
            device=log_value(penalty.device),
            failures=penalty.failures,
            window=round(penalty.window),
            seconds=round(penalty.seconds),
        )
