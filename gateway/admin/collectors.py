"""Metrics read from the gateway's state objects when Prometheus scrapes.

Gauges of what is there now (open sessions, the spool, the OAuth2 tokens)
are not counted from events but read at scrape time, in the reactor thread
(the admin site answers there), from the objects that own that state; so
they cannot drift from it, and cost nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway.admin.listeners import ListenerWatch
from gateway.oauth.status import TokenStatus
from gateway.smtp.spool_store import SpoolStore as Spool

TOKEN_STATES = ("ok", "needs_reauth", "failed", "revoked", "unauthorised", "unreadable", "unusable")


class TokenStatuses(Protocol):
    """What the token collector reads (`gateway.oauth.manager.TokenManager`)."""

    def statuses(self) -> list[TokenStatus]: ...


class ListenerCollector(Collector):
    """Open device connections and whether each listener is bound."""

    def __init__(self, watches: Callable[[], Iterable[ListenerWatch]]) -> None:
        self._watches = watches

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            "gateway_sessions_active",
            "Device connections open now, per listener.",
            labels=["protocol", "listener"],
        )
        up = GaugeMetricFamily(
            "gateway_listener_up",
            "1 if the listener's socket is bound, 0 if binding failed or is pending.",
            labels=["protocol", "listener"],
        )
        for watch in self._watches():
            active.add_metric([watch.protocol, watch.name], watch.active())
            up.add_metric([watch.protocol, watch.name], 1.0 if watch.bound else 0.0)
        yield active
        yield up


class SpoolCollector(Collector):
    """Depth of the SMTP spool and the age of its oldest queued message."""

    def __init__(self, spool: Spool, now: Callable[[], float]) -> None:
        self._spool = spool
        self._now = now

    def collect(self) -> Iterator[Metric]:
        queued = dead = 0
        oldest: float | None = None
        for entry in self._spool.entries.values():
            if entry.status == "queued":
                queued += 1
                received = entry.envelope.received
                oldest = received if oldest is None else min(oldest, received)
            else:
                dead += 1
        depth = GaugeMetricFamily(
            "gateway_spool_messages",
            "Messages in the SMTP spool: queued for the relay, or dead letters.",
            labels=["status"],
        )
        depth.add_metric(["queued"], queued)
        depth.add_metric(["dead"], dead)
        yield depth
        yield GaugeMetricFamily(
            "gateway_spool_oldest_queued_age_seconds",
            "Age of the oldest queued message (0 when none is queued).",
            value=max(self._now() - oldest, 0.0) if oldest is not None else 0.0,
        )


class TokenCollector(Collector):
    """Each OAuth2 account's token state, time to expiry and refreshes."""

    def __init__(self, manager: TokenStatuses, now: Callable[[], float]) -> None:
        self._manager = manager
        self._now = now

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "gateway_oauth_token_state",
            "1 for each OAuth2 account, labelled with its token state: "
            + ", ".join(TOKEN_STATES)
            + ".",
            labels=["account", "state"],
        )
        expiry = GaugeMetricFamily(
            "gateway_oauth_access_token_expiry_seconds",
            "Seconds until the account's access token expires (negative: expired).",
            labels=["account"],
        )
        refreshes = CounterMetricFamily(
            "gateway_oauth_refreshes",
            "Token refreshes by this process, by outcome: ok, failed (temporary, "
            "retried), refused (by the provider; needs the admin).",
            labels=["account", "outcome"],
        )
        now = self._now()
        for status in self._manager.statuses():
            state.add_metric([status.account, status.state], 1.0)
            if status.expires_at is not None:
                expiry.add_metric([status.account], status.expires_at - now)
            for outcome in ("ok", "failed", "refused"):
                refreshes.add_metric(
                    [status.account, outcome], status.refresh_outcomes.get(outcome, 0)
                )
        yield state
        yield expiry
        yield refreshes
