"""The real twistd gateway with `[admin]` on a loopback port: a scripted POP3
session (poplib, Dovecot behind), an SMTP submission (smtplib, an aiosmtpd
submission server behind) and failed logins move the metrics as they should;
promtool accepts the exposition; /healthz and /readyz answer as documented;
the JSON log has the session's fields."""

from __future__ import annotations

import json
import poplib
import smtplib
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_config import config_head, listen, provider
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.harness.smtp_sink import SMTPSink
from tests.helpers.pop3 import HASHER
from tests.helpers.smtp_gateway import SMTPS_USERS, smtps_sink, wait_for
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.integration

POP3_LISTENER = "pop3-implicit-127.0.0.1-{port}"
SECRETS = ("printer-pw", "mailer-pw", "alice-pw", "relay-pw")


class Ports:
    def __init__(self) -> None:
        self.pop3 = free_port()
        self.smtp = free_port()
        self.admin = free_port()


def config_text(
    state: Path,
    ports: Ports,
    dovecot: Dovecot,
    sink_port: int,
    upstream: TLSMaterial,
    own: TLSMaterial,
) -> str:
    [(relay_user, relay_password)] = SMTPS_USERS.items()
    return "\n".join(
        [
            *config_head(state, own),
            "[admin]",
            f'address = "127.0.0.1"\nport = {ports.admin}',
            "[log]",
            'format = "json"',
            *listen("pop3", ports.pop3, "implicit"),
            *listen("smtp", ports.smtp, "implicit"),
            *provider(
                "dovecot", "pop3", dovecot.pop3s_port, "implicit", upstream.ca_file, timeout=5
            ),
            *provider("smtps", "smtp", sink_port, "implicit", upstream.ca_file, timeout=5),
            "[accounts.alice]",
            'provider = "dovecot"\nusername = "alice"\npassword = "alice-pw"',
            "[accounts.relay]",
            f'provider = "smtps"\nusername = "{relay_user}"\npassword = "{relay_password}"',
            "[devices.printer]",
            f'password_hash = "{HASHER.hash("printer-pw")}"',
            'account = "alice"\nprotocols = ["pop3"]\nallow_from = ["127.0.0.0/8"]',
            "[devices.mailer]",
            f'password_hash = "{HASHER.hash("mailer-pw")}"',
            'account = "relay"\nprotocols = ["smtp"]\nallow_from = ["127.0.0.0/8"]',
            "[devices.idle-one]",
            f'password_hash = "{HASHER.hash("idle-pw")}"',
            'account = "alice"\nprotocols = ["pop3"]',
        ]
    )


@pytest.fixture(scope="module")
def smtps(
    tmp_path_factory: pytest.TempPathFactory, tls_upstream: TLSMaterial
) -> Iterator[SMTPSink]:
    with smtps_sink(tmp_path_factory.mktemp("admin-smtps"), tls_upstream) as server:
        yield server


@pytest.fixture(scope="module")
def admin_ports() -> Ports:
    return Ports()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    dovecot: Dovecot,
    smtps: SMTPSink,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    admin_ports: Ports,
) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("admin-gateway")
    text = config_text(base / "state", admin_ports, dovecot, smtps.port, tls_upstream, tls_gateway)
    ports = [admin_ports.pop3, admin_ports.smtp, admin_ports.admin]
    with GatewayProcess(base, text, ports) as gw:
        yield gw


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> tuple[str, Samples]:
    status, body = get(port, "/metrics")
    assert status == 200
    text = body.decode()
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, found


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over every series of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def eventually(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll until `check()` returns something true (the metrics of a session
    appear when its connection is closed on the gateway's side)."""
    return wait_until(check, timeout, lambda result: f"still {result!r} after {timeout} s")


def test_health_and_readiness(gateway: GatewayProcess, admin_ports: Ports) -> None:
    status, body = get(admin_ports.admin, "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "alive", "failed": []})
    status, body = get(admin_ports.admin, "/readyz")
    ready = json.loads(body)
    assert status == 200, ready
    assert ready["failed"] == []
    assert set(ready["checks"]) == {"listeners", "state_dir", "spool"}


def test_metrics_follow_pop3_smtp_and_failed_logins(
    gateway: GatewayProcess,
    admin_ports: Ports,
    clean_mailboxes: Dovecot,
    smtps: SMTPSink,
    ctx: ssl.SSLContext,
) -> None:
    port = admin_ports.admin
    _, before = scrape(port)
    pop3_listener = POP3_LISTENER.format(port=admin_ports.pop3)
    assert total(before, "gateway_listener_up", listener=pop3_listener) == 1
    clean_mailboxes.deliver("alice", b"Subject: metrics\n\n" + b"x" * 1000 + b"\n")

    # Failed logins: a wrong password for a configured device, an unknown name.
    for user, password in (("printer", "wrong"), ("ghost-device", "whatever")):
        client = poplib.POP3_SSL("localhost", admin_ports.pop3, context=ctx, timeout=20)
        client.user(user)
        with pytest.raises(poplib.error_proto):
            client.pass_(password)
        client.quit()

    # A scripted POP3 session; while it is open, it is an active session.
    client = poplib.POP3_SSL("localhost", admin_ports.pop3, context=ctx, timeout=20)
    client.user("printer")
    client.pass_("printer-pw")
    assert client.stat()[0] == 1
    _, during = scrape(port)
    assert total(during, "gateway_sessions_active", listener=pop3_listener) == 1
    client.retr(1)
    client.quit()

    # An SMTP submission, relayed to the upstream submission server.
    mark = uuid.uuid4().hex
    with smtplib.SMTP_SSL("localhost", admin_ports.smtp, context=ctx, timeout=20) as smtp:
        smtp.login("mailer", "mailer-pw")
        smtp.sendmail(
            "relay@example.com",
            ["someone@example.org"],
            f"Subject: {mark}\r\n\r\nhello\r\n".encode(),
        )
    wait_for(smtps.directory, mark.encode())

    def settled() -> Samples | None:
        _, now = scrape(port)
        done = (
            total(now, "gateway_sessions_total", protocol="pop3")
            - total(before, "gateway_sessions_total", protocol="pop3")
            >= 3
            and total(now, "gateway_sessions_total", protocol="smtp")
            > total(before, "gateway_sessions_total", protocol="smtp")
            and total(now, "gateway_relay_deliveries_total", outcome="delivered")
            > total(before, "gateway_relay_deliveries_total", outcome="delivered")
            and total(now, "gateway_sessions_active") == 0
        )
        return now if done else None

    after: Samples = eventually(settled)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("gateway_sessions_total", protocol="pop3", outcome="quit before login") == 2
    assert grew("gateway_sessions_total", protocol="pop3", outcome="quit") == 1
    assert grew("gateway_logins_total", protocol="pop3", outcome="success") == 1
    assert grew("gateway_logins_total", protocol="smtp", outcome="success") == 1
    assert grew("gateway_logins_total", outcome="failure", reason="wrong_password") == 1
    assert grew("gateway_logins_total", outcome="failure", reason="unknown_device") == 1
    assert grew("gateway_session_bytes_total", protocol="pop3", direction="to_device") > 1000
    assert grew("gateway_session_bytes_total", protocol="smtp", direction="from_device") > 0
    assert grew("gateway_tls_sessions_total", protocol="pop3", version="TLSv1.3") == 3
    assert grew("gateway_tls_sessions_total", protocol="smtp") == 1
    assert grew("gateway_relay_recipients_delivered_total") == 1
    sent = grew(
        "gateway_upstream_step_seconds_count",
        protocol="smtp",
        provider="smtps",
        step="send",
        result="ok",
    )
    assert sent == 1
    step_count = "gateway_upstream_step_seconds_count"
    for step in ("connect", "tls", "login", "open", "retrieve"):
        assert grew(step_count, protocol="pop3", provider="dovecot", step=step) >= 1, step
    for step in ("connect", "tls", "login"):
        assert grew(step_count, protocol="smtp", provider="smtps", step=step) >= 1, step
    assert (
        grew("gateway_sessions_total", protocol="pop3", listener=pop3_listener, outcome="quit") == 1
    )
    assert grew("gateway_tls_sessions_total", listener=pop3_listener, version="TLSv1.3") == 3
    assert total(after, "gateway_sessions_total", listener="unknown") == 0
    assert total(after, "gateway_spool_messages", status="queued") == 0
    assert total(after, "gateway_device_last_login_outcome", device="printer", outcome="success")
    assert total(after, "gateway_device_last_login_outcome", device="mailer", outcome="success")
    assert total(after, "gateway_device_last_login_outcome", device="idle-one", outcome="none")
    assert total(after, "gateway_device_last_login_success_timestamp_seconds", device="printer")
    assert not any("ghost" in str(labels) for _, labels in after)


def test_promtool_accepts_the_exposition(gateway: GatewayProcess, admin_ports: Ports) -> None:
    text, _ = scrape(admin_ports.admin)
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def test_readyz_fails_while_the_state_directory_is_gone(
    gateway: GatewayProcess, admin_ports: Ports
) -> None:
    state = gateway.base_dir / "state"
    moved = gateway.base_dir / "state-away"
    state.rename(moved)
    try:
        status, body = get(admin_ports.admin, "/readyz")
        report = json.loads(body)
        assert status == 503
        assert report["status"] == "not ready"
        assert report["failed"] == ["state_dir", "spool"]
        assert str(state) in report["checks"]["state_dir"]["error"]
        assert get(admin_ports.admin, "/healthz")[0] == 200
    finally:
        moved.rename(state)
    assert get(admin_ports.admin, "/readyz")[0] == 200


def test_the_json_log_has_the_session_fields_and_no_secret(
    gateway: GatewayProcess, admin_ports: Ports, ctx: ssl.SSLContext
) -> None:
    client = poplib.POP3_SSL("localhost", admin_ports.pop3, context=ctx, timeout=20)
    client.user("printer")
    client.pass_("printer-pw")
    client.quit()

    def session_lines() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in gateway.log_text().splitlines()]
        return [
            line
            for line in lines
            if line.get("namespace") == "gateway.pop3"
            and line.get("outcome") == "quit"
            and line.get("device") == "printer"
        ]

    line = eventually(session_lines)[-1]
    assert {
        "time",
        "level",
        "message",
        "device",
        "peer",
        "account",
        "tls_version",
        "tls_cipher",
        "outcome",
        "bytes_out",
        "duration",
    } <= set(line)
    assert (line["peer"], line["account"], line["tls_version"]) == ("127.0.0.1", "alice", "TLSv1.3")
    assert line["message"].startswith("pop3 session device=printer peer=127.0.0.1")
    text = gateway.log_text()
    for secret in SECRETS:
        assert secret not in text


# -- HTTPS off loopback's default, and a listener that cannot bind ----------------------


@pytest.fixture(scope="module")
def taken_port() -> Iterator[int]:
    """A port someone else listens on, so the gateway's listener cannot bind."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(8)
        yield blocker.getsockname()[1]


@pytest.fixture(scope="module")
def https_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    dovecot: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    taken_port: int,
) -> Iterator[tuple[GatewayProcess, int]]:
    base = tmp_path_factory.mktemp("admin-https")
    admin = free_port()
    text = "\n".join(
        [
            *config_head(base / "state", tls_gateway),
            "[admin]",
            f'address = "127.0.0.1"\nport = {admin}\ntls = true',
            *listen("pop3", taken_port, "implicit"),
            *provider("dovecot", "pop3", dovecot.pop3s_port, "implicit", tls_upstream.ca_file),
            "[accounts.alice]",
            'provider = "dovecot"\nusername = "alice"\npassword = "alice-pw"',
        ]
    )
    with GatewayProcess(base, text, [admin]) as gw:
        yield gw, admin


def test_https_admin_listener_and_an_unbound_listener_is_not_ready(
    https_gateway: tuple[GatewayProcess, int], ctx: ssl.SSLContext, taken_port: int
) -> None:
    _, admin = https_gateway
    url = f"https://localhost:{admin}"
    with urllib.request.urlopen(f"{url}/healthz", context=ctx, timeout=10) as answer:
        assert answer.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{url}/readyz", context=ctx, timeout=10)
    assert refused.value.code == 503
    report = json.loads(refused.value.read())
    assert report["failed"] == ["listeners"]
    error = report["checks"]["listeners"]["error"]
    assert f"pop3-implicit-127.0.0.1-{taken_port}" in error and "in use" in error
    with urllib.request.urlopen(f"{url}/metrics", context=ctx, timeout=10) as answer:
        text = answer.read().decode()
    listener = f"pop3-implicit-127.0.0.1-{taken_port}"
    assert f'gateway_listener_up{{listener="{listener}",protocol="pop3"}} 0.0' in text
    # No plain HTTP on the HTTPS listener (the handshake fails, the connection drops).
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=5)
