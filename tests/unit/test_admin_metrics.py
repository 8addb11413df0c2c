"""The metrics observer and the scrape-time collectors, on synthetic log events,
events from the real POP3 and SMTP front ends, and fake state objects."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher

from gateway import timing as upstream_timing
from gateway.admin.collectors import ListenerCollector, SpoolCollector, TokenCollector
from gateway.admin.events import MetricsObserver
from gateway.admin.listeners import CountingFactory
from gateway.admin.metrics import GatewayMetrics, login_reason
from gateway.oauth.status import TokenStatus
from gateway.smtp.spool import Spool, SpoolDir
from gateway.smtp.spool_records import DeliveryState, Envelope, QueueEntry
from tests.unit import test_pop3_server, test_smtp_server

DEVICES = ("printer", "copier", "fax", "popper", "careless")
LISTENERS = ("pop3-implicit-0.0.0.0-995", "smtp-starttls-0.0.0.0-587")


def new_metrics() -> GatewayMetrics:
    return GatewayMetrics(devices=lambda: DEVICES, listeners=lambda: LISTENERS, process=False)


def value(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def samples(metrics: GatewayMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of one metric, by its sorted labels."""
    found = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def event(namespace: str, **fields: Any) -> dict[str, Any]:
    return {
        "log_namespace": namespace,
        "log_level": LogLevel.info,
        "log_time": 1_800_000_000.0,
        "log_format": "ignored: the observer never formats",
        **fields,
    }


def pop3_session(**fields: Any) -> dict[str, Any]:
    base = {
        "device": "printer",
        "peer": "10.1.2.3",
        "account": "scanner",
        "tls_version": "TLSv1.3",
        "tls_cipher": "TLS_AES_256_GCM_SHA384",
        "duration": 2.5,
        "outcome": "quit",
        "listed": 2,
        "retrieved": 1,
        "deleted": 1,
        "bytes_out": 1234,
        "listener": LISTENERS[0],
    }
    return event("gateway.pop3", **{**base, **fields})


# -- the observer on synthetic events ------------------------------------------------


def test_a_pop3_session_counts_session_login_bytes_tls_and_device() -> None:
    m = new_metrics()
    MetricsObserver(m)(pop3_session())

    listener = LISTENERS[0]
    assert value(m, "gateway_sessions_total", protocol="pop3", listener=listener, outcome="quit")
    assert value(m, "gateway_logins_total", protocol="pop3", outcome="success", reason="none")
    assert value(m, "gateway_session_bytes_total", protocol="pop3", direction="to_device") == 1234
    assert value(
        m,
        "gateway_tls_sessions_total",
        protocol="pop3",
        listener=listener,
        version="TLSv1.3",
        cipher="TLS_AES_256_GCM_SHA384",
    )
    assert value(m, "gateway_session_duration_seconds_count", protocol="pop3") == 1
    # The login time is the session's start: the event's time less its duration.
    assert value(
        m, "gateway_device_last_login_success_timestamp_seconds", device="printer"
    ) == pytest.approx(1_800_000_000.0 - 2.5)
    assert value(m, "gateway_device_last_login_outcome", device="printer", outcome="success")


def test_a_session_without_login_or_tls_counts_only_the_session() -> None:
    m = new_metrics()
    MetricsObserver(m)(
        pop3_session(device="-", tls_version="none", tls_cipher="none", outcome="dropped")
    )
    assert value(
        m, "gateway_sessions_total", protocol="pop3", listener=LISTENERS[0], outcome="dropped"
    )
    assert samples(m, "gateway_logins_total") == {}
    assert samples(m, "gateway_tls_sessions_total") == {}


def test_an_smtp_session_counts_a_login_only_for_a_password() -> None:
    m = new_metrics()
    observe = MetricsObserver(m)
    smtp = {"listener": LISTENERS[1], "peer": "10.1.2.3", "duration": 1.0, "outcome": "quit"}
    observe(event("gateway.smtp", device="copier", identified_by="network", bytes_in=10, **smtp))
    assert samples(m, "gateway_logins_total") == {}
    observe(
        event(
            "gateway.smtp",
            device="printer",
            identified_by="password",
            bytes_in=500,
            recipients=2,
            **smtp,
        )
    )
    assert value(m, "gateway_logins_total", protocol="smtp", outcome="success", reason="none")
    assert value(m, "gateway_session_bytes_total", protocol="smtp", direction="from_device") == 510
    assert value(m, "gateway_smtp_recipients_accepted_total", listener=LISTENERS[1]) == 2
    assert value(
        m, "gateway_sessions_total", protocol="smtp", listener=LISTENERS[1], outcome="quit"
    )


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("unknown device", "unknown_device"),
        ("wrong password", "wrong_password"),
        ("address 10.9.9.9 not in allow_from", "address_not_allowed"),
        ("protocol smtp not allowed", "protocol_not_allowed"),
        ("something new", "other"),
        (None, "other"),
    ],
)
def test_refusal_reasons_are_a_bounded_set_without_addresses(reason: Any, label: str) -> None:
    assert login_reason(reason) == label


def test_a_refused_login_of_a_configured_device_sets_its_last_outcome() -> None:
    m = new_metrics()
    observe = MetricsObserver(m)
    observe(pop3_session())
    observe(event("gateway.pop3", device="printer", peer="10.1.2.3", reason="wrong password"))
    assert value(
        m, "gateway_logins_total", protocol="pop3", outcome="failure", reason="wrong_password"
    )
    outcomes = samples(m, "gateway_device_last_login_outcome")
    assert outcomes[(("device", "printer"), ("outcome", "wrong_password"))] == 1
    # Still one series per device, and the last success is kept.
    assert len(outcomes) == len(DEVICES)
    assert value(m, "gateway_device_last_login_success_timestamp_seconds", device="printer")


def test_names_from_failed_logins_never_make_a_series() -> None:
    m = new_metrics()
    observe = MetricsObserver(m)
    for n in range(200):
        observe(event("gateway.smtp", device=f"guess{n}", peer="10.6.6.6", reason="unknown device"))
    observe(event("gateway.smtp", device="ghost\nfrom 10.7.7.7", peer="10.6.6.6", reason="x"))
    assert (
        value(
            m, "gateway_logins_total", protocol="smtp", outcome="failure", reason="unknown_device"
        )
        == 200
    )
    devices = {dict(k)["device"] for k in samples(m, "gateway_device_last_login_outcome")}
    assert devices == set(DEVICES)
    assert samples(m, "gateway_device_last_login_success_timestamp_seconds") == {}
    exposition = generate_latest(m.registry).decode()
    assert "guess" not in exposition and "ghost" not in exposition and "10.6.6.6" not in exposition


def test_free_text_labels_are_bounded() -> None:
    m = new_metrics()
    observe = MetricsObserver(m)
    for n in range(100):
        observe(pop3_session(outcome=f"upstream lost during step{n}", device="-"))
    observe(pop3_session(outcome="line one\nline two", device="-"))
    observe(pop3_session(listener="pop3-implicit-6.6.6.6-1", device="-"))
    outcomes = {dict(k)["outcome"] for k in samples(m, "gateway_sessions_total")}
    assert len(outcomes) <= 41 and "other" in outcomes
    listeners = {dict(k)["listener"] for k in samples(m, "gateway_sessions_total")}
    assert listeners == {LISTENERS[0], "other"}


def test_a_session_event_without_a_listener_counts_as_unknown_listener() -> None:
    m = new_metrics()
    session = pop3_session()
    del session["listener"]
    MetricsObserver(m)(session)
    assert value(m, "gateway_sessions_total", protocol="pop3", listener="unknown", outcome="quit")


def test_relay_delivery_outcomes() -> None:
    m = new_metrics()
    observe = MetricsObserver(m)
    relay = "gateway.smtp.relay"
    observe(event(relay, delivery="delivered", id="1", count=2, total=3, account="scanner"))
    observe(event(relay, delivery="deferred", id="1", account="scanner", error="451"))
    observe(event(relay, delivery="dead_letter", id="2", account="scanner"))
    observe(event(relay, delivery="made-up", id="3"))
    observe(event(relay, id="4", account="scanner", detail="no delivery field: not counted"))
    assert {
        dict(k)["outcome"]: v for k, v in samples(m, "gateway_relay_deliveries_total").items()
    } == {
        "delivered": 1,
        "deferred": 1,
        "dead_letter": 1,
        "other": 1,
    }
    assert value(m, "gateway_relay_recipients_delivered_total") == 2


def test_other_events_are_ignored_and_odd_values_do_not_break_the_observer() -> None:
    m = new_metrics()
    observe = MetricsObserver(m)
    observe({"log_namespace": "gateway.oauth", "account": "x", "outcome": "y", "duration": 1})
    observe({"log_format": "no namespace at all"})
    observe(pop3_session(duration="soon", bytes_out=None, log_time="now", tls_cipher=object()))
    assert value(m, "gateway_metrics_observer_errors_total") == 0
    assert value(
        m, "gateway_sessions_total", protocol="pop3", listener=LISTENERS[0], outcome="quit"
    )


# -- the observer on events from the real front ends ---------------------------------


@pytest.fixture
def observed() -> Iterator[GatewayMetrics]:
    """Metrics fed by the global log publisher, as in the running gateway."""
    m = new_metrics()
    observer = MetricsObserver(m)
    globalLogPublisher.addObserver(observer)
    try:
        yield m
    finally:
        globalLogPublisher.removeObserver(observer)


def test_real_pop3_events(observed: GatewayMetrics) -> None:
    gw = test_pop3_server.Gateway()
    guesser = gw.connect()
    guesser.send(b"USER ghost", b"PASS nothing")
    guesser.send(b"USER printer", b"PASS wrong")
    guesser.proto.connectionLost(None)
    device = gw.connect()
    device.login()
    device.send(b"RETR 1")
    device.send(b"QUIT")
    device.proto.connectionLost(None)

    def login(outcome: str, reason: str) -> float | None:
        return value(
            observed, "gateway_logins_total", protocol="pop3", outcome=outcome, reason=reason
        )

    assert login("failure", "unknown_device") == 1
    assert login("failure", "wrong_password") == 1
    assert login("success", "none") == 1
    sessions = samples(observed, "gateway_sessions_total")
    assert sum(sessions.values()) == 2
    assert value(observed, "gateway_session_bytes_total", protocol="pop3", direction="to_device")
    assert value(observed, "gateway_device_last_login_outcome", device="printer", outcome="success")
    assert value(observed, "gateway_device_last_login_outcome", device="copier", outcome="none")


def test_real_smtp_events(observed: GatewayMetrics, tmp_path: Path) -> None:
    gw = test_smtp_server.Gateway(tmp_path)
    client = gw.connect()
    client.send(b"EHLO printer.local")
    client.send(b"AUTH PLAIN " + test_smtp_server.b64(b"\0printer\0wrong"))
    client.send(b"AUTH PLAIN " + test_smtp_server.b64(b"\0printer\0printer-pw"))
    client.send(b"MAIL FROM:<scan@scan.example.com>", b"RCPT TO:<a@example.com>", b"DATA")
    client.send(b"Subject: x", b"", b"hello", b".")
    client.send(b"QUIT")
    client.proto.connectionLost(None)

    assert value(
        observed,
        "gateway_logins_total",
        protocol="smtp",
        outcome="failure",
        reason="wrong_password",
    )
    assert value(
        observed, "gateway_logins_total", protocol="smtp", outcome="success", reason="none"
    )
    assert value(observed, "gateway_session_bytes_total", protocol="smtp", direction="from_device")
    assert sum(samples(observed, "gateway_smtp_recipients_accepted_total").values()) == 1
    assert value(observed, "gateway_device_last_login_outcome", device="printer", outcome="success")


# -- collectors read at scrape time ---------------------------------------------------


def envelope(n: int, received: float, account: str = "scanner") -> Envelope:
    return Envelope(
        id=f"id{n}",
        account=account,
        device="printer",
        peer="10.1.2.3",
        identified_by="password",
        original_sender="a@example.com",
        sender="a@example.com",
        recipients=("b@example.com",),
        received=received,
        size=10,
        eight_bit=False,
    )


def test_spool_depth_and_oldest_queued_age(tmp_path: Path) -> None:
    m = new_metrics()
    spool = Spool(SpoolDir(tmp_path / "spool"))
    now = [1000.0]
    m.registry.register(SpoolCollector(spool, lambda: now[0]))
    assert value(m, "gateway_spool_messages", status="queued") == 0
    assert value(m, "gateway_spool_oldest_queued_age_seconds") == 0
    spool.track(QueueEntry(envelope(1, 900.0), DeliveryState()))
    spool.track(QueueEntry(envelope(2, 700.0), DeliveryState(), status="dead"))
    spool.track(QueueEntry(envelope(3, 950.0, "other"), DeliveryState()))
    assert value(m, "gateway_spool_messages", status="queued") == 2
    assert value(m, "gateway_spool_messages", status="dead") == 1
    assert value(m, "gateway_spool_oldest_queued_age_seconds") == 100
    now[0] = 1500.0
    assert value(m, "gateway_spool_oldest_queued_age_seconds") == 600


@dataclass
class FakeTokens:
    found: list[TokenStatus] = field(default_factory=list)

    def statuses(self) -> list[TokenStatus]:
        return self.found


def test_token_state_expiry_and_refreshes() -> None:
    m = new_metrics()
    tokens = FakeTokens(
        [
            TokenStatus("m365", "ok", 1300.0, {"ok": 4, "failed": 1}),
            TokenStatus("gmail", "needs_reauth", 900.0, {"refused": 1}),
            TokenStatus("new", "unauthorised", None, {}),
        ]
    )
    m.registry.register(TokenCollector(tokens, lambda: 1000.0))
    assert value(m, "gateway_oauth_token_state", account="m365", state="ok") == 1
    assert value(m, "gateway_oauth_token_state", account="new", state="unauthorised") == 1
    assert value(m, "gateway_oauth_access_token_expiry_seconds", account="m365") == 300
    assert value(m, "gateway_oauth_access_token_expiry_seconds", account="gmail") == -100
    assert value(m, "gateway_oauth_access_token_expiry_seconds", account="new") is None
    assert value(m, "gateway_oauth_refreshes_total", account="m365", outcome="ok") == 4
    assert value(m, "gateway_oauth_refreshes_total", account="gmail", outcome="refused") == 1
    assert value(m, "gateway_oauth_refreshes_total", account="new", outcome="failed") == 0


class FakeFactory:
    def buildProtocol(self, addr: Any) -> Any:
        from twisted.internet.protocol import Protocol

        return Protocol()

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


@dataclass
class FakeWatch:
    name: str
    protocol: str
    factory: CountingFactory
    bound: bool = True

    def active(self) -> int:
        return self.factory.open_connections()


def test_open_connections_are_counted_per_listener() -> None:
    m = new_metrics()
    factory = CountingFactory(FakeFactory())
    watch = FakeWatch(LISTENERS[0], "pop3", factory)
    m.registry.register(ListenerCollector(lambda: [watch]))  # type: ignore[list-item]
    transports = []
    for port in range(3):
        protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", port))
        transport = StringTransport()
        transport.connected = True  # type: ignore[attr-defined]
        # As a TCP transport does (the reactor holds the transport).
        transport.protocol = protocol  # type: ignore[attr-defined]
        protocol.makeConnection(transport)
        transports.append(transport)
    labels = {"protocol": "pop3", "listener": LISTENERS[0]}
    assert value(m, "gateway_sessions_active", **labels) == 3
    transports[0].disconnected = True
    assert value(m, "gateway_sessions_active", **labels) == 2
    assert value(m, "gateway_listener_up", **labels) == 1
    watch.bound = False
    assert value(m, "gateway_listener_up", **labels) == 0


# -- upstream step timing (the hook the upstream code calls) --------------------------


def test_timed_step_records_successes_and_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    m = new_metrics()
    ticks = iter([10.0, 10.25, 20.0, 21.0])
    monkeypatch.setattr(upstream_timing, "clock", lambda: next(ticks))

    async def ok() -> str:
        return "done"

    async def broken() -> None:
        raise ConnectionRefusedError()

    provider = "timing-test-provider"
    labels = {"protocol": "pop3", "provider": provider, "step": "connect"}
    assert asyncio.run(upstream_timing.timed_step("pop3", provider, "connect", ok())) == "done"
    with pytest.raises(ConnectionRefusedError):
        asyncio.run(upstream_timing.timed_step("pop3", provider, "connect", broken()))
    assert value(m, "gateway_upstream_step_seconds_sum", **labels, result="ok") == 0.25
    assert value(m, "gateway_upstream_step_seconds_count", **labels, result="error") == 1
    upstream_timing.observe_step("pop3", provider, "made-up", 1.0, ok=True)
    assert value(
        m,
        "gateway_upstream_step_seconds_count",
        protocol="pop3",
        provider=provider,
        step="other",
        result="ok",
    )


def test_protocol_of_an_endpoint() -> None:
    from gateway.model import Endpoint, Provider

    smtp = Endpoint("smtp.example.com", 465)
    provider = Provider("corp", pop3=Endpoint("pop.example.com", 995), smtp=smtp)
    assert upstream_timing.protocol_of(provider, smtp) == "smtp"
    assert upstream_timing.protocol_of(provider, provider.pop3) == "pop3"  # type: ignore[arg-type]
    assert upstream_timing.protocol_of(provider, Endpoint("smtp.example.com", 465)) == "other"


# -- the exposition ---------------------------------------------------------------------


def filled_metrics(tmp_path: Path) -> GatewayMetrics:
    m = GatewayMetrics(devices=lambda: DEVICES, listeners=lambda: LISTENERS)
    observe = MetricsObserver(m)
    observe(pop3_session())
    observe(event("gateway.pop3", device="printer", peer="10.1.2.3", reason="wrong password"))
    observe(event("gateway.smtp.relay", delivery="delivered", count=1))
    m.registry.register(SpoolCollector(Spool(SpoolDir(tmp_path)), lambda: 0.0))
    m.registry.register(TokenCollector(FakeTokens([TokenStatus("a", "ok", 5.0, {})]), lambda: 0.0))
    return m


def test_the_exposition_parses_and_names_every_family_once(tmp_path: Path) -> None:
    text = generate_latest(filled_metrics(tmp_path).registry).decode()
    names = [family.name for family in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))
    assert {
        "gateway_sessions",
        "gateway_logins",
        "gateway_device_last_login_outcome",
        "gateway_spool_messages",
        "gateway_oauth_token_state",
        "gateway_upstream_step_seconds",
        "process_resident_memory_bytes",
    } <= set(names)
    assert "_created" not in text


def test_promtool_accepts_the_exposition(tmp_path: Path) -> None:
    text = generate_latest(filled_metrics(tmp_path).registry)
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
