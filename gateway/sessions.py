"""What the device-facing servers (POP3 and SMTP) share about a device session.

Both servers write one log line per session from a record they fill in as
the session goes, describe the device's transport the same way (peer
address, TLS version and cipher once TLS is up), and refuse a login the same
way: one log line fail2ban can match, a pause before the answer, and a limit
of failures per connection. The protocol-specific counters and reply texts
stay in each server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from gateway.devices import AuthFailed
from gateway.tls import describe

# Refuse further logins on a connection after this many failures.
MAX_AUTH_FAILURES = 3


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
            "device": self.device,
            "peer": self.peer,
            "account": self.account,
            "tls_version": self.tls_version,
            "tls_cipher": self.tls_cipher,
            "duration": now - self.started,
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
        whether the device is still there after the pause."""
        self._record.auth_failures.append(refusal.reason)
        self._log.warn(
            "{protocol} login refused for device {device} from {peer}: {reason}",
            protocol=self._protocol,
            device=refusal.device or user,
            peer=self._record.peer,
            reason=refusal.reason,
        )
        await deferLater(self._clock, self._delay, lambda: None)
        if not connected():
            return Refused.GONE
        if len(self._record.auth_failures) >= self._limit:
            self._record.outcome = "too many login failures"
            return Refused.CLOSE
        return Refused.ANSWER
