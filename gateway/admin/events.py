"""Counting what happened from the structured log events the gateway writes.

The device-facing servers write one event per session and one per refused
login, and the relay one per delivery outcome; their fields (device, peer,
outcome, tls_version, bytes, ...) are what the metrics need. Reading those
fields keeps the servers free of metric calls and makes the log and the
metrics agree by construction. The text of a line is never formatted or
parsed here: only the event's keys and values are read.

Which event is which, by namespace and fields:

- a session: namespace ``gateway.pop3`` or ``gateway.smtp`` with ``outcome``
  and ``duration``;
- a refused login: the same namespaces with ``device``, ``peer`` and
  ``reason`` and no ``outcome``;
- a delivery outcome: namespace ``gateway.smtp.relay`` with ``delivery``;
- a login penalty that starts: namespace ``gateway.penalties`` with ``penalty``;
- a connection refused for a limit: namespace ``gateway.limits`` with
  ``limit`` and ``protocol``;
- an upstream login: namespace ``gateway.upstream.logins`` with
  ``upstream_login`` (the protocol) and ``provider``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from twisted.logger import ILogObserver, Logger
from zope.interface import implementer

from gateway.admin.metrics import GatewayMetrics, LoginAttempt, login_reason
from gateway.limits import LIMIT_NAMES

log = Logger(namespace="gateway.admin")

SESSION_NAMESPACES = {"gateway.pop3": "pop3", "gateway.smtp": "smtp"}
RELAY_NAMESPACE = "gateway.smtp.relay"
LIMITS_NAMESPACE = "gateway.limits"
LIMITS = frozenset(LIMIT_NAMES)
DELIVERY_OUTCOMES = frozenset({"delivered", "deferred", "expired", "dead_letter"})
PENALTY_NAMESPACE = "gateway.penalties"
PENALTY_KINDS = frozenset({"lockout", "device_slowdown"})
UPSTREAM_LOGINS_NAMESPACE = "gateway.upstream.logins"
UPSTREAM_PROTOCOLS = frozenset({"pop3", "imap", "smtp", "graph"})


def _text(event: Mapping[str, Any], key: str) -> Any:
    """A field as the gateway meant it: values a device chose are written
    quoted (`gateway.sessions.log_value`) so the text line stays unambiguous;
    the metrics want the value itself."""
    value = event.get(key)
    if isinstance(value, str) and value.startswith('"'):
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        return decoded if isinstance(decoded, str) else value
    return value


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _logged_in(protocol: str, event: Mapping[str, Any]) -> bool:
    """Whether the session had a successful device login. POP3 names the
    device only after one; SMTP also names a device it recognised by its
    address (relay_without_auth), which is no login."""
    if protocol == "smtp":
        return event.get("identified_by") == "password"
    device = _text(event, "device")
    return isinstance(device, str) and device != "-"


@implementer(ILogObserver)
class MetricsObserver:
    """An `ILogObserver` that counts sessions, logins and deliveries."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def __call__(self, event: Mapping[str, Any]) -> None:
        namespace = event.get("log_namespace")
        try:
            if namespace in SESSION_NAMESPACES:
                protocol = event.get("protocol", SESSION_NAMESPACES[namespace])
                if protocol not in ("pop3", "smtp"):
                    protocol = SESSION_NAMESPACES[namespace]
                if "outcome" in event and "duration" in event:
                    self._session(protocol, event)
                elif "reason" in event and "peer" in event and "device" in event:
                    self._refused_login(protocol, event)
            elif namespace == RELAY_NAMESPACE and "delivery" in event:
                self._delivery(event)
            elif namespace == LIMITS_NAMESPACE and "limit" in event:
                self._refused_connection(event)
            elif namespace == PENALTY_NAMESPACE and "penalty" in event:
                kind = event["penalty"]
                self.metrics.penalties.labels(kind if kind in PENALTY_KINDS else "other").inc()
            elif namespace == UPSTREAM_LOGINS_NAMESPACE and "upstream_login" in event:
                protocol = event["upstream_login"]
                self.metrics.upstream_logins.labels(
                    protocol if protocol in UPSTREAM_PROTOCOLS else "other",
                    self.metrics.provider_label(event.get("provider")),
                ).inc()
        except Exception:
            # Never let a metrics bug disturb logging; say so once per event.
            self.metrics.observer_errors.inc()
            if namespace != log.namespace:
                log.failure("metrics observer failed on a {namespace} event", namespace=namespace)

    def _session(self, protocol: str, event: Mapping[str, Any]) -> None:
        m = self.metrics
        listener = m.listener_label(_text(event, "listener"))
        outcome = m.outcome_label[protocol](_text(event, "outcome"))
        m.sessions.labels(protocol, listener, outcome).inc()
        duration = _number(event.get("duration"))
        if duration is not None:
            m.session_duration.labels(protocol).observe(max(duration, 0.0))
        if protocol == "pop3":
            sent = _number(event.get("bytes_out"))
            if sent:
                m.bytes.labels("pop3", "to_device").inc(sent)
        else:
            received = _number(event.get("bytes_in"))
            if received:
                m.bytes.labels("smtp", "from_device").inc(received)
            recipients = _number(event.get("recipients"))
            if recipients:
                m.smtp_recipients.labels(listener).inc(recipients)
        version = _text(event, "tls_version")
        if isinstance(version, str) and version != "none":
            m.tls.labels(
                protocol, listener, m.tls_label(version), m.tls_label(_text(event, "tls_cipher"))
            ).inc()
        if _logged_in(protocol, event):
            m.logins.labels(protocol, "success", "none").inc()
            logged = _number(event.get("log_time"))
            if logged is not None:
                start = logged - (duration or 0.0)
                m.recent_logins.add(logged, "success")
                attempt = LoginAttempt(
                    when=start,
                    peer=str(_text(event, "peer")),
                    protocol=protocol,
                    outcome="success",
                    tls_version=str(version),
                    tls_cipher=str(_text(event, "tls_cipher")),
                    session=str(_text(event, "outcome")),
                )
                m.device_logins.succeeded(_text(event, "device"), start, attempt)

    def _refused_login(self, protocol: str, event: Mapping[str, Any]) -> None:
        reason = login_reason(event.get("reason"))
        self.metrics.logins.labels(protocol, "failure", reason).inc()
        logged = _number(event.get("log_time"))
        attempt = None
        if logged is not None:
            self.metrics.recent_logins.add(logged, reason)
            text = event.get("reason")
            attempt = LoginAttempt(
                when=logged,
                peer=str(_text(event, "peer")),
                protocol=protocol,
                outcome=text if isinstance(text, str) else reason,
            )
        self.metrics.device_logins.refused(_text(event, "device"), reason, attempt)

    def _refused_connection(self, event: Mapping[str, Any]) -> None:
        protocol = event.get("protocol")
        limit = event.get("limit")
        self.metrics.connections_refused.labels(
            protocol if protocol in SESSION_NAMESPACES.values() else "other",
            limit if limit in LIMITS else "other",
        ).inc()

    def _delivery(self, event: Mapping[str, Any]) -> None:
        outcome = event.get("delivery")
        if outcome not in DELIVERY_OUTCOMES:
            outcome = "other"
        self.metrics.deliveries.labels(outcome).inc()
        if outcome == "delivered":
            count = _number(event.get("count"))
            if count:
                self.metrics.delivered_recipients.inc(count)
