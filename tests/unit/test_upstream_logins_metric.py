"""Upstream logins counted from their log line (`gateway_upstream_logins_total`)."""

from __future__ import annotations

from typing import Any

from twisted.logger import LogPublisher

from gateway.admin.events import MetricsObserver
from gateway.admin.metrics import GatewayMetrics
from gateway.upstream.imap import session


def test_each_upstream_login_line_counts_once_per_protocol_and_provider() -> None:
    metrics = GatewayMetrics(devices=lambda: [], listeners=lambda: [], process=False)
    publisher = LogPublisher(MetricsObserver(metrics))
    logger: Any = session.login_log
    original = logger.observer
    logger.observer = publisher
    try:
        for name in ("corp", "corp", "gmail"):
            logger.info(
                "upstream imap login for account {account} at {provider} ({why})",
                upstream_login="imap",
                account="scanner",
                provider=name,
                why="first session",
            )
        logger.info("another line of the namespace", account="scanner")
    finally:
        logger.observer = original

    def value(provider: str) -> float | None:
        return metrics.registry.get_sample_value(
            "gateway_upstream_logins_total", {"protocol": "imap", "provider": provider}
        )

    assert value("corp") == 2
    assert value("gmail") == 1
    assert metrics.registry.get_sample_value("gateway_metrics_observer_errors_total") == 0
