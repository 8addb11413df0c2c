"""How long each upstream step takes, per provider: the one metric that needs a
call inside the upstream code, since no log event marks where a step ends.

It lives outside `gateway.admin` so that the upstream clients and maildrops,
which the admin listener's modules import, depend on nothing above them.

The upstream clients call `timed_step` around the step they await:

    client = await timed_step("pop3", provider.name, "connect", connect(...))

The histogram is process-wide (the upstream code has no runtime object to
reach a registry through); each gateway's registry registers it, so it shows
in the exposition like every other metric.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from prometheus_client import Histogram

from gateway.model import Endpoint, Provider

_T = TypeVar("_T")

# The steps of an upstream session, in order; anything else counts as "other".
STEPS: Final = frozenset({"connect", "tls", "login", "open", "retrieve", "send", "quit"})
PROTOCOLS: Final = frozenset({"pop3", "imap", "smtp", "graph"})

UPSTREAM_STEP_SECONDS: Final = Histogram(
    "gateway_upstream_step_seconds",
    "Time taken by each step of an upstream session (connect, tls, login, open, "
    "retrieve, ...), per protocol and provider, failed steps included.",
    ["protocol", "provider", "step", "result"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=None,
)

# Seconds on a monotonic clock; a test may replace it.
clock: Callable[[], float] = time.monotonic


def protocol_of(provider: Provider, server: Endpoint) -> str:
    """Which of the provider's endpoints `server` is: "pop3", "imap", "smtp"
    (for code that holds only the endpoint, like `open_connection`)."""
    for name in sorted(PROTOCOLS):
        if getattr(provider, name) is server:
            return name
    return "other"


def observe_step(protocol: str, provider: str, step: str, seconds: float, *, ok: bool) -> None:
    """Record one step's duration (for code that times a step itself)."""
    UPSTREAM_STEP_SECONDS.labels(
        protocol if protocol in PROTOCOLS else "other",
        provider,
        step if step in STEPS else "other",
        "ok" if ok else "error",
    ).observe(max(seconds, 0.0))


async def timed_step(protocol: str, provider: str, step: str, work: Awaitable[_T]) -> _T:
    """Await `work` and record how long it took, whether it succeeded or not.

    `provider` is the configured provider's name (a bounded set, never a host
    a peer chose).
    """
    started = clock()
    try:
        result = await work
    except BaseException:
        observe_step(protocol, provider, step, clock() - started, ok=False)
        raise
    observe_step(protocol, provider, step, clock() - started, ok=True)
    return result
