"""`workers = N` or `workers = "auto"`: how many reactor processes serve (gateway.workers)."""

from __future__ import annotations

import os

from gateway.config.reader import Table
from gateway.model import Config, field_default

# Far beyond any core count this runs on; a typo (1000) is caught instead.
MAX_WORKERS = 256


def cores() -> int:
    """The cores this process may run on (its CPU affinity, as `nproc` counts)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def workers_setting(root: Table) -> int:
    default: int = field_default(Config, "workers")
    if root.has("workers") and isinstance(root.data["workers"], str):
        if root.data["workers"] == "auto":
            return min(cores(), MAX_WORKERS)
        root.problem("workers", f'expected an integer or "auto", got {root.data["workers"]!r}')
        return default
    value = root.integer("workers", default, low=1, high=MAX_WORKERS)
    return default if value is None else value
