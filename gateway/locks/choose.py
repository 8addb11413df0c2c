"""Which mailbox locks a process uses: the state backend decides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.locks.files import FileMailboxLocks
from gateway.locks.interface import MailboxLocks
from gateway.locks.postgres import PostgresMailboxLocks
from gateway.state.backend import StateBackend

# Under `state_dir`: one lock file per mailbox (embedded backend).
LOCK_DIR = "locks"


def mailbox_locks(state: StateBackend, state_dir: Path, clock: Any) -> MailboxLocks:
    if state.database is not None:
        return PostgresMailboxLocks(state.database, state.identity, state.lease, clock)
    return FileMailboxLocks(state_dir / LOCK_DIR)
