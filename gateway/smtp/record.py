"""What the one log line per SMTP session says, beyond what every device
protocol's line has (`gateway.sessions.BaseSessionRecord`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.sessions import BaseSessionRecord, log_value

LINE = (
    "smtp session device={device} peer={peer} account={account} by={identified_by} "
    "tls={tls_version} cipher={tls_cipher} queued={queued} rcpts={recipients} "
    "bytes={bytes_in} refused={refused} auth_failures={failures} "
    "duration={duration:.3f}s outcome={outcome}"
)


@dataclass
class SessionRecord(BaseSessionRecord):
    identified_by: str = "none"
    queued: list[str] = field(default_factory=list)
    recipients: int = 0
    bytes_in: int = 0
    refused: int = 0

    def log_fields(self, now: float) -> dict[str, Any]:
        """The fields of `LINE`."""
        return {
            **super().log_fields(now),
            "identified_by": log_value(self.identified_by),
            "queued": log_value(id_list(self.queued)),
            "recipients": self.recipients,
            "bytes_in": self.bytes_in,
            "refused": self.refused,
            "failures": len(self.auth_failures),
        }


def id_list(ids: list[str], shown: int = 20) -> str:
    """Queue ids for the session line: "-", "ID,ID" or the first 20 and "+N"."""
    if not ids:
        return "-"
    more = f",+{len(ids) - shown}" if len(ids) > shown else ""
    return ",".join(ids[:shown]) + more
