"""Liveness and readiness: what `/healthz` and `/readyz` answer.

`/healthz` says only that the process runs and its reactor answers: a load
balancer or systemd restarts what fails it. `/readyz` says whether the
gateway can do its work now: every listener bound, the state directory
writable, the spool held by this process, the token store usable, the
state database reached (PostgreSQL backend). A
proxy (HAProxy's `option httpchk GET /readyz`) sends devices elsewhere
while it fails; each check says what is wrong, in words for the admin.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.admin.listeners import ListenerWatch
from gateway.oauth.manager import TokenManager
from gateway.smtp.spool import SpoolDir
from gateway.state.backend import StateBackend

# What a check returns: None when all is well, else what is wrong.
Check = Callable[[], str | None]


@dataclass(frozen=True)
class Readiness:
    checks: dict[str, Check]

    def report(self) -> tuple[bool, dict[str, Any]]:
        """(ready, the JSON body): every check's result, the failed ones named."""
        results: dict[str, Any] = {}
        failed: list[str] = []
        for name, check in self.checks.items():
            try:
                problem = check()
            except Exception as e:  # a check that breaks is a failed check
                problem = f"check raised {type(e).__name__}: {e}"
            if problem is None:
                results[name] = {"ok": True}
            else:
                results[name] = {"ok": False, "error": problem}
                failed.append(name)
        body: dict[str, Any] = {
            "status": "ready" if not failed else "not ready",
            "failed": failed,
            "checks": results,
        }
        return not failed, body


def listeners_bound(watches: Callable[[], Iterable[ListenerWatch]]) -> Check:
    def check() -> str | None:
        problems = [f"{w.name}: {w.error or 'not listening yet'}" for w in watches() if not w.bound]
        return "; ".join(problems) or None

    return check


def directory_writable(path: Path) -> Check:
    """Create (and drop) an unnamed file there: permissions, a read-only or
    full file system, and a directory gone all show, even for root."""

    def check() -> str | None:
        try:
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as e:
            return f"{path}: {e.strerror or e}"
        return None

    return check


def spool_open(spool: SpoolDir) -> Check:
    def check() -> str | None:
        if not spool.locked:
            return f"spool {spool.root} is not open (not locked by this process)"
        if not spool.queue.is_dir():
            return f"spool queue {spool.queue} is missing"
        return None

    return check


def token_store_usable(manager: TokenManager) -> Check:
    def check() -> str | None:
        problem = manager.store_problem
        if problem is not None:
            return problem
        store = manager.store
        if store is None:
            return "token store not opened yet"
        directory = getattr(store, "directory", None)
        if directory is None:
            return store.problem()
        try:
            with os.scandir(directory):
                pass
        except OSError as e:
            return f"token store {directory}: {e.strerror or e}"
        return None

    return check


def state_database_reachable(backend: StateBackend) -> Check:
    """PostgreSQL backend: this process holds its lease, so the schema was
    checked and the database answered within the last lease time. A node
    that cannot reach it refuses devices with "try again later": the load
    balancer should send them to one that can."""

    def check() -> str | None:
        lease = backend.lease
        if lease is None or lease.alive:
            return None
        return "state database not reached within the lease time (see the log)"

    return check
