"""What each worker process serves, decided in one place for parent and worker."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.model import Config, Listener


@dataclass(frozen=True)
class WorkerRole:
    """Worker `index` of `count`: which parts of the gateway it runs.

    Every worker serves POP3 and SMTP and runs the spool's relay: the spool
    is shared by the workers (gateway.smtp.spool: its lock taken shared, a
    claim per message being delivered). The admin listener is worker 0's
    alone: its console and readiness read that worker's live spool, token
    manager and listeners, which the parent (a supervisor that only holds
    sockets) does not have; the other workers' events reach its metrics
    through the supervisor.
    """

    index: int
    count: int

    @property
    def smtp(self) -> bool:
        return True

    @property
    def admin(self) -> bool:
        return self.index == 0

    def listeners(self, config: Config) -> list[Listener]:
        return list(config.pop3.listeners) + (list(config.smtp.listeners) if self.smtp else [])

    def addresses(self, config: Config) -> list[tuple[str, int]]:
        """Every address:port this worker listens on (its inherited sockets)."""
        found = [(each.address, each.port) for each in self.listeners(config)]
        if self.admin and config.admin is not None:
            found.append((config.admin.address, config.admin.port))
        return found

    def describe(self) -> str:
        parts = (
            ["pop3"] + (["smtp", "spool"] if self.smtp else []) + (["admin"] if self.admin else [])
        )
        return "+".join(parts)


def every_address(config: Config) -> list[tuple[str, int]]:
    """Every address:port the gateway listens on, in the parent (bound once)."""
    found = [(each.address, each.port) for each in config.pop3.listeners + config.smtp.listeners]
    if config.admin is not None:
        found.append((config.admin.address, config.admin.port))
    return found
