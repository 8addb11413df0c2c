"""The gateway's Prometheus registry and the metrics counted from log events.

One `CollectorRegistry` per running gateway, never prometheus-client's global
one: a test (or a second gateway in one process) gets its own numbers, and
nothing a library registers globally ends up in the exposition unasked.

Every label value comes from a bounded set: protocols and steps are fixed;
listeners, devices and accounts are the configured ones; whatever a peer may
influence (a session outcome, a refusal reason) is folded into a known value
or "other", and a device name from a failed login counts only if it is a
configured device. No label or value ever holds a password, a token or a
peer-supplied string.
"""

from __future__ import annotations

import re
from collections import Counter as Counts
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from gateway.timing import UPSTREAM_STEP_SECONDS

# Distinct values one free-text label may take before new ones count as "other".
MAX_LABEL_VALUES = 40
_LABEL_TEXT = re.compile(r"[A-Za-z0-9 ,._:/-]{1,80}")

# Refusals the console lists per device.
RECENT_REFUSALS = 5

# A refusal's reason as the authenticator words it, by its start; the
# address in "address 10.0.0.9 not in allow_from" must not become a label.
LOGIN_REASONS: tuple[tuple[str, str], ...] = (
    ("unknown device", "unknown_device"),
    ("wrong password", "wrong_password"),
    ("address locked out", "locked_out"),
    ("address ", "address_not_allowed"),
    ("protocol ", "protocol_not_allowed"),
)


def login_reason(text: object) -> str:
    if not isinstance(text, str):
        return "other"
    for start, reason in LOGIN_REASONS:
        if text.startswith(start):
            return reason
    return "other"


class BoundedLabel:
    """The values one label has taken, at most `limit`; later ones are "other".

    For labels whose values the gateway writes but whose set is open-ended
    (a session outcome names the upstream step that failed).
    """

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: object) -> str:
        if not isinstance(value, str) or not _LABEL_TEXT.fullmatch(value):
            return "other"
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return "other"
        self._seen.add(value)
        return value


@dataclass(frozen=True)
class LoginAttempt:
    """One login as the web console shows it: `outcome` is "success" or the
    refusal's reason; the TLS fields and `session` (the session's outcome)
    come with a successful login's session event."""

    when: float
    peer: str
    protocol: str
    outcome: str
    tls_version: str = "none"
    tls_cipher: str = "none"
    session: str = ""


@dataclass
class DeviceLogin:
    """What the metrics (and the console) remember about one configured device."""

    last_success: float | None = None
    last_outcome: str = "none"
    last_attempt: LoginAttempt | None = None
    refusals: deque[LoginAttempt] = field(default_factory=lambda: deque(maxlen=RECENT_REFUSALS))


class LoginWindow:
    """Login attempts of the last hour by outcome, in one-minute buckets."""

    def __init__(self, span: int = 60) -> None:
        self._span = span
        self._buckets: deque[tuple[int, Counts[str]]] = deque()

    def add(self, when: float, outcome: str) -> None:
        minute = int(when // 60)
        if not self._buckets or self._buckets[-1][0] < minute:
            self._buckets.append((minute, Counts()))
        for bucket_minute, counts in reversed(self._buckets):
            if bucket_minute <= minute:
                counts[outcome] += 1
                break
        self._trim(minute)

    def counts(self, now: float) -> Counts[str]:
        self._trim(int(now // 60))
        total: Counts[str] = Counts()
        for _, counts in self._buckets:
            total.update(counts)
        return total

    def _trim(self, minute: int) -> None:
        while self._buckets and self._buckets[0][0] <= minute - self._span:
            self._buckets.popleft()


class DeviceLogins:
    """Each configured device's last successful login and last login outcome.

    `configured()` is read at every update and scrape, so a device removed
    from the configuration disappears from the metrics, and a name that is
    not configured (a guess in a failed login) never makes a series.
    """

    def __init__(self, configured: Callable[[], Collection[str]]) -> None:
        self._configured = configured
        self._devices: dict[str, DeviceLogin] = {}

    def succeeded(self, device: object, when: float, attempt: LoginAttempt | None = None) -> None:
        entry = self._entry(device)
        if entry is not None:
            entry.last_success = max(when, entry.last_success or when)
            entry.last_outcome = "success"
            if attempt is not None:
                entry.last_attempt = attempt

    def refused(self, device: object, reason: str, attempt: LoginAttempt | None = None) -> None:
        entry = self._entry(device)
        if entry is not None:
            entry.last_outcome = reason
            if attempt is not None:
                entry.last_attempt = attempt
                entry.refusals.append(attempt)

    def get(self, device: str) -> DeviceLogin | None:
        return self._devices.get(device)

    def _entry(self, device: object) -> DeviceLogin | None:
        if not isinstance(device, str) or device not in self._configured():
            return None
        return self._devices.setdefault(device, DeviceLogin())

    def collect(self) -> Iterator[Metric]:
        last_success = GaugeMetricFamily(
            "gateway_device_last_login_success_timestamp_seconds",
            "Unix time of the start of the last session in which the device logged in "
            "(configured devices that logged in since the gateway started).",
            labels=["device"],
        )
        last_outcome = GaugeMetricFamily(
            "gateway_device_last_login_outcome",
            "1 for each configured device, labelled with the outcome of its last login "
            'attempt since the gateway started ("none": no attempt yet).',
            labels=["device", "outcome"],
        )
        for name in sorted(self._configured()):
            entry = self._devices.get(name, DeviceLogin())
            if entry.last_success is not None:
                last_success.add_metric([name], entry.last_success)
            last_outcome.add_metric([name, entry.last_outcome], 1.0)
        yield last_success
        yield last_outcome


class GatewayMetrics:
    """The registry and the metrics the log observer counts into."""

    def __init__(
        self,
        *,
        devices: Callable[[], Collection[str]],
        listeners: Callable[[], Collection[str]],
        process: bool = True,
    ) -> None:
        # A `_created` series per counter doubles the exposition for a
        # timestamp Prometheus does not use (process-wide switch).
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self.listeners = listeners
        r = self.registry
        self.sessions = Counter(
            "gateway_sessions",
            "Device sessions ended, by protocol, listener and outcome.",
            ["protocol", "listener", "outcome"],
            registry=r,
        )
        self.session_duration = Histogram(
            "gateway_session_duration_seconds",
            "Duration of device sessions.",
            ["protocol"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
            registry=r,
        )
        self.logins = Counter(
            "gateway_logins",
            "Device login attempts, by protocol, outcome (success, failure) and reason.",
            ["protocol", "outcome", "reason"],
            registry=r,
        )
        self.bytes = Counter(
            "gateway_session_bytes",
            "Message bytes sent to devices (pop3) or received from them (smtp).",
            ["protocol", "direction"],
            registry=r,
        )
        self.tls = Counter(
            "gateway_tls_sessions",
            "Device sessions over TLS, by listener, TLS version and cipher.",
            ["protocol", "listener", "version", "cipher"],
            registry=r,
        )
        self.smtp_recipients = Counter(
            "gateway_smtp_recipients_accepted",
            "Recipients of messages devices handed to the SMTP relay (spooled).",
            ["listener"],
            registry=r,
        )
        self.deliveries = Counter(
            "gateway_relay_deliveries",
            "Relay delivery attempts by outcome: delivered (at least one recipient "
            "accepted), deferred, expired, dead_letter.",
            ["outcome"],
            registry=r,
        )
        self.delivered_recipients = Counter(
            "gateway_relay_recipients_delivered",
            "Recipients the upstream accepted from the relay.",
            registry=r,
        )
        self.connections_refused = Counter(
            "gateway_connections_refused",
            "Device connections refused or closed for a connection limit, by protocol "
            "and limit (total, address, device; see [limits]).",
            ["protocol", "limit"],
            registry=r,
        )
        self.penalties = Counter(
            "gateway_login_penalties",
            "Login penalties started (gateway.penalties): lockout (an address refused "
            "outright), device_slowdown (a device name failing from many addresses).",
            ["kind"],
            registry=r,
        )
        self.upstream_logins = Counter(
            "gateway_upstream_logins",
            "Logins the gateway made at upstream mail servers, by protocol and provider "
            "(a kept IMAP connection makes one for many device sessions).",
            ["protocol", "provider"],
            registry=r,
        )
        self.observer_errors = Counter(
            "gateway_metrics_observer_errors",
            "Log events the metrics observer could not count (a bug: see the log).",
            registry=r,
        )
        self.device_logins = DeviceLogins(devices)
        # For the console's overview; not exported (the counters above are).
        self.recent_logins = LoginWindow()
        r.register(self.device_logins)
        r.register(UPSTREAM_STEP_SECONDS)
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.outcome_label = {"pop3": BoundedLabel(), "smtp": BoundedLabel()}
        self.tls_label = BoundedLabel(limit=80)
        self.provider_label = BoundedLabel()

    def listener_label(self, value: object) -> str:
        """A configured listener's name, "unknown" when the event names none."""
        if value is None:
            return "unknown"
        return value if isinstance(value, str) and value in self.listeners() else "other"
