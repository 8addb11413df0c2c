"""The real twistd gateway relaying SMTP: devices (smtplib, swaks, msmtp, curl)
in front, Dovecot's submission service (STARTTLS) and an aiosmtpd submission
server (implicit TLS) behind, an aiosmtpd sink at the end of the line."""

from __future__ import annotations

import json
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import GatewayProcess
from tests.harness.smtp_sink import SMTPSink, read_messages
from tests.helpers.smtp_gateway import (
    SUBMISSION_USERS,
    SMTPPorts,
    smtp_gateway_config,
    smtps_sink,
    wait_for,
    without_trace,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SMTPSink]:
    """Where Dovecot's submission service relays to."""
    with SMTPSink(tmp_path_factory.mktemp("sink")) as server:
        yield server


@pytest.fixture(scope="module")
def submission(
    tmp_path_factory: pytest.TempPathFactory, sink: SMTPSink, tls_upstream: TLSMaterial
) -> Iterator[Dovecot]:
    with Dovecot(
        tmp_path_factory.mktemp("dovecot-submission"),
        SUBMISSION_USERS,
        tls=tls_upstream,
        submission_relay_port=sink.port,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def smtps_upstream(
    tmp_path_factory: pytest.TempPathFactory, tls_upstream: TLSMaterial
) -> Iterator[SMTPSink]:
    with smtps_sink(tmp_path_factory.mktemp("smtps"), tls_upstream) as server:
        yield server


@pytest.fixture(scope="module")
def smtp_ports() -> SMTPPorts:
    return SMTPPorts()


def make_gateway(
    base: Path,
    ports: SMTPPorts,
    submission: Dovecot,
    smtps_port: int,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
) -> GatewayProcess:
    assert submission.submission_port is not None
    text = smtp_gateway_config(
        base / "state",
        ports,
        submission_port=submission.submission_port,
        smtps_port=smtps_port,
        upstream=tls_upstream,
        own=tls_gateway,
    )
    return GatewayProcess(base, text, ports.listening())


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    smtp_ports: SMTPPorts,
    submission: Dovecot,
    smtps_upstream: SMTPSink,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("smtp-gateway")
    with make_gateway(
        base, smtp_ports, submission, smtps_upstream.port, tls_upstream, tls_gateway
    ) as gw:
        yield gw


def marker() -> bytes:
    return b"test-" + uuid.uuid4().hex.encode()


def message(mark: bytes, sender: bytes = b"alarm@example.com", body: bytes = b"hello\r\n") -> bytes:
    return (
        b"From: " + sender + b"\r\nTo: someone@example.org\r\nSubject: " + mark + b"\r\n"
        b"Date: Mon, 2 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <" + mark + b"@example.com>\r\n\r\n" + body
    )


def queue_cli(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    gateway_cmd = Path(sys.executable).with_name("gateway")
    return subprocess.run(
        [str(gateway_cmd), "--config", str(gw.config), "queue", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def queue_json(gw: GatewayProcess) -> list[dict]:
    result = queue_cli(gw, "list", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["messages"]  # type: ignore[no-any-return]


def submit(
    port: int,
    ctx: ssl.SSLContext,
    device: str | None,
    sender: str,
    recipients: list[str],
    data: bytes,
    *,
    implicit: bool = False,
    source: str | None = None,
) -> None:
    source_address = (source, 0) if source else None
    if implicit:
        client: smtplib.SMTP = smtplib.SMTP_SSL(
            "localhost", port, context=ctx, timeout=20, source_address=source_address
        )
    else:
        client = smtplib.SMTP("localhost", port, timeout=20, source_address=source_address)
        if device is not None:
            client.starttls(context=ctx)
    with client:
        if device is not None:
            client.login(device, f"{device}-pw")
        client.sendmail(sender, recipients, data)


# -- what arrives ------------------------------------------------------------------


def test_smtplib_message_arrives_byte_for_byte(
    gateway: GatewayProcess, smtp_ports: SMTPPorts, ctx: ssl.SSLContext, sink: SMTPSink
) -> None:
    mark = marker()
    parts = [b"first line\r\n", b".\r\n", b"..\r\n", b".leading dot\r\n", b"x" * 998 + b"\r\n"]
    parts.append("caf\u00e9 \u2013 8-bit \u00fc\r\n".encode())
    body = b"".join(parts)
    # "." lines exactly at the 16 KiB boundary Twisted's sender got wrong and
    # at the relay's own 256 KiB read size, and at many offsets around them.
    for boundary in (16 * 1024, 64 * 1024, 256 * 1024, 512 * 1024):
        for shift in (-3, -2, -1, 0, 1, 2):
            target = boundary + shift
            head = message(mark, body=body)
            gap = target - len(head)
            if gap > 2:
                filler = (b"y" * 76 + b"\r\n") * (gap // 78)
                rest = gap - len(filler)
                body += filler + (b"z" * (rest - 2) + b"\r\n" if rest >= 2 else b"")
            body += b".\r\n" if shift % 2 else b".dot at " + str(target).encode() + b"\r\n"
    data = message(mark, body=body)
    submit(smtp_ports.submission, ctx, "alarm-panel", "alarm@example.com", ["r@example.org"], data)
    [got] = wait_for(sink.directory, mark)
    assert without_trace(got.content) == data
    assert got.mail_from == "alarm@example.com" and got.rcpt_tos == ("r@example.org",)
    assert "BODY=8BITMIME" in got.mail_options


def test_sender_and_from_header_are_rewritten(
    gateway: GatewayProcess, smtp_ports: SMTPPorts, ctx: ssl.SSLContext, sink: SMTPSink
) -> None:
    mark = marker()
    data = message(mark, sender=b'"Floor 3" <floor3@scan.example.com>')
    submit(
        smtp_ports.submission, ctx, "printer", "floor3@scan.example.com", ["r@example.org"], data
    )
    [got] = wait_for(sink.directory, mark)
    assert got.mail_from == "scanner@example.com"
    assert without_trace(got.content) == data.replace(
        b'"Floor 3" <floor3@scan.example.com>', b"Floor 3 <scanner@example.com>"
    )
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        submit(smtp_ports.submission, ctx, "printer", "boss@example.com", ["r@example.org"], data)
    assert refused.value.smtp_code == 550 and b"5.7.1" in refused.value.smtp_error


def test_swaks_auth_login_over_starttls(
    gateway: GatewayProcess, smtp_ports: SMTPPorts, tls_gateway: TLSMaterial, sink: SMTPSink
) -> None:
    mark = marker().decode()
    swaks(smtp_ports.submission, tls_gateway, mark, "LOGIN", "--tls")
    [got] = wait_for(sink.directory, mark.encode())
    assert got.mail_from == "scanner@example.com"  # rewritten for the scanner account
    assert (
        b"From: swaks <scanner@example.com>" in got.content or b"scanner@example.com" in got.content
    )


def test_swaks_auth_plain_over_implicit_tls(
    gateway: GatewayProcess, smtp_ports: SMTPPorts, tls_gateway: TLSMaterial, sink: SMTPSink
) -> None:
    mark = marker().decode()
    swaks(smtp_ports.smtps, tls_gateway, mark, "PLAIN", "--tls-on-connect")
    [got] = wait_for(sink.directory, mark.encode())
    assert got.mail_from == "scanner@example.com"  # rewritten for the scanner account
    assert got.rcpt_tos == ("r@example.org",)
    assert f"Subject: {mark}".encode() in got.content


def swaks(port: int, tls: TLSMaterial, mark: str, mechanism: str, tls_flag: str) -> None:
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"localhost:{port}",
            tls_flag,
            "--tls-verify",
            "--tls-ca-path",
            str(tls.ca_file),
            "--auth",
            mechanism,
            "--auth-user",
            "printer",
            "--auth-password",
            "printer-pw",
            "--from",
            "scan@scan.example.com",
            "--to",
            "r@example.org",
            "--header",
            f"Subject: {mark}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"AUTH {mechanism}" in result.stdout and "250 2.0.0 OK queued as" in result.stdout


def test_msmtp(
    gateway: GatewayProcess,
    smtp_ports: SMTPPorts,
    tls_gateway: TLSMaterial,
    sink: SMTPSink,
    tmp_path: Path,
) -> None:
    mark = marker()
    data = message(mark).replace(b"\r\n", b"\n")
    result = subprocess.run(
        [
            "msmtp",
            "--host=localhost",
            f"--port={smtp_ports.submission}",
            "--tls=on",
            "--tls-starttls=on",
            f"--tls-trust-file={tls_gateway.ca_file}",
            "--auth=plain",
            "--user=alarm-panel",
            "--passwordeval=echo alarm-panel-pw",
            "--from=alarm@example.com",
            "r@example.org",
        ],
        input=data,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    [got] = wait_for(sink.directory, mark)
    assert without_trace(got.content) == data.replace(b"\n", b"\r\n")


def test_curl(
    gateway: GatewayProcess,
    smtp_ports: SMTPPorts,
    tls_gateway: TLSMaterial,
    sink: SMTPSink,
    tmp_path: Path,
) -> None:
    mark = marker()
    data = message(mark, body=b".dotted\r\nend\r\n")
    upload = tmp_path / "mail.eml"
    upload.write_bytes(data)
    result = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            f"smtp://localhost:{smtp_ports.submission}",
            "--ssl-reqd",
            "--cacert",
            str(tls_gateway.ca_file),
            "--user",
            "alarm-panel:alarm-panel-pw",
            "--mail-from",
            "alarm@example.com",
            "--mail-rcpt",
            "r@example.org",
            "--upload-file",
            str(upload),
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    [got] = wait_for(sink.directory, mark)
    assert without_trace(got.content) == data


def test_implicit_tls_upstream(
    gateway: GatewayProcess, smtp_ports: SMTPPorts, ctx: ssl.SSLContext, smtps_upstream: SMTPSink
) -> None:
    mark = marker()
    data = message(mark, sender=b"relay@example.com")
    submit(
        smtp_ports.smtps,
        ctx,
        "direct-dev",
        "relay@example.com",
        ["r@example.org"],
        data,
        implicit=True,
    )
    [got] = wait_for(smtps_upstream.directory, mark)
    assert got.content == data and got.mail_from == "relay@example.com"


# -- who may relay ---------------------------------------------------------------------


def test_network_device_relays_without_auth(
    gateway: GatewayProcess, smtp_ports: SMTPPorts, ctx: ssl.SSLContext, sink: SMTPSink
) -> None:
    mark = marker()
    data = message(mark)
    # Plain SMTP on the port-25 style listener, no STARTTLS, no AUTH, from 127.0.0.2.
    submit(
        smtp_ports.lan, ctx, None, "alarm@example.com", ["r@example.org"], data, source="127.0.0.2"
    )
    [got] = wait_for(sink.directory, mark)
    assert without_trace(got.content) == data
    assert "device=lan-printer" in gateway.wait_for_log("from=<alarm@example.com>")


def test_stranger_is_refused(
    gateway: GatewayProcess, smtp_ports: SMTPPorts, ctx: ssl.SSLContext
) -> None:
    with smtplib.SMTP(
        "localhost", smtp_ports.lan, timeout=10, source_address=("127.0.0.3", 0)
    ) as c:
        c.ehlo("stranger")
        assert not c.has_extn("auth")
        assert c.docmd("AUTH", "PLAIN " + "AHgAeA==")[0] == 538
        code, text = c.mail("alarm@example.com")
        assert code == 550 and text.startswith(b"5.7.1")
        assert c.rcpt("r@example.org")[0] == 503
    # Even with TLS, an unauthenticated stranger cannot relay.
    with smtplib.SMTP_SSL("localhost", smtp_ports.smtps, context=ctx, timeout=10) as c:
        c.ehlo("stranger")
        assert c.mail("alarm@example.com")[0] == 550


def test_starttls_injection_is_discarded(
    gateway: GatewayProcess, smtp_ports: SMTPPorts, ctx: ssl.SSLContext
) -> None:
    raw = socket.create_connection(("127.0.0.1", smtp_ports.submission), timeout=10)
    reader = raw.makefile("rb")
    assert reader.readline().startswith(b"220")
    raw.sendall(b"EHLO x\r\n")
    while not reader.readline().startswith(b"250 "):
        pass
    # The classic injection: a command after STARTTLS in the same packet.
    raw.sendall(b"STARTTLS\r\nRSET\r\nNOOP injected\r\n")
    assert reader.readline() == b"220 2.0.0 ready to start TLS\r\n"
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    tls_reader = tls.makefile("rb")
    tls.sendall(b"HELP\r\n")
    # The first answer inside TLS is to HELP: RSET and NOOP were never run.
    assert tls_reader.readline().startswith(b"214")
    tls.sendall(b"MAIL FROM:<alarm@example.com>\r\n")
    assert tls_reader.readline().startswith(b"503 5.5.1")  # EHLO needed again
    tls.close()


# test_overlong_data_line_keeps_framing: in test_smtp_long_lines.py (long_lines = "refuse").


def test_size_limit(gateway: GatewayProcess, smtp_ports: SMTPPorts, ctx: ssl.SSLContext) -> None:
    with smtplib.SMTP("localhost", smtp_ports.submission, timeout=20) as c:
        c.starttls(context=ctx)
        c.login("alarm-panel", "alarm-panel-pw")
        assert c.has_extn("size") and c.esmtp_features["size"] == "5000000"
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            c.sendmail("alarm@example.com", ["r@example.org"], b"x" * 10, ["SIZE=6000000"])
        assert e.value.smtp_code == 552


# -- the spool and the relay --------------------------------------------------------------


def test_upstream_down_then_back(
    gateway: GatewayProcess,
    smtp_ports: SMTPPorts,
    ctx: ssl.SSLContext,
    tls_upstream: TLSMaterial,
    tmp_path: Path,
) -> None:
    mark = marker()
    data = message(mark, sender=b"relay@example.com")
    submit(smtp_ports.submission, ctx, "flaky-dev", "relay@example.com", ["r@example.org"], data)
    gateway.wait_for_log("smtp deferred", timeout=10)
    [entry] = [m for m in queue_json(gateway) if m["account"] == "flaky"]
    assert entry["status"] == "queued" and entry["attempts"] >= 1
    assert "cannot connect" in entry["last_error"]
    with smtps_sink(tmp_path / "late", tls_upstream, port=smtp_ports.flaky) as late:
        [got] = wait_for(late.directory, mark, timeout=20)
        assert got.content == data
    assert [m for m in queue_json(gateway) if m["account"] == "flaky"] == []


def test_upstream_5xx_bounces_and_leaves_a_dead_letter(
    gateway: GatewayProcess, smtp_ports: SMTPPorts, ctx: ssl.SSLContext, sink: SMTPSink
) -> None:
    mark = marker()
    sink.refuse["nobody@example.org"] = "550 5.1.1 no such user here"
    try:
        data = message(mark, sender=b"floor3@scan.example.com")
        submit(
            smtp_ports.submission,
            ctx,
            "printer",
            "floor3@scan.example.com",
            ["nobody@example.org"],
            data,
        )
        [bounce] = wait_for(sink.directory, b"Final-Recipient: rfc822; nobody@example.org")
    finally:
        sink.refuse.clear()
    assert bounce.mail_from == "<>" and bounce.rcpt_tos == ("floor3@scan.example.com",)
    assert b"multipart/report; report-type=delivery-status" in bounce.content
    assert b"Subject: " + mark in bounce.content and b"no such user here" in bounce.content
    dead = [
        m
        for m in queue_json(gateway)
        if m["status"] == "dead" and m["sender"] == "floor3@scan.example.com"
    ]
    assert len(dead) == 1 and "no such user here" in dead[0]["dead_reason"]
    log = gateway.wait_for_log("is a dead letter")
    assert f"#error] smtp message {dead[0]['id']} from device printer" in log
    listing = queue_cli(gateway, "list")
    assert dead[0]["id"] in listing.stdout and "dead" in listing.stdout
    # Retry after the admin fixed the cause: delivered this time.
    retried = queue_cli(gateway, "retry", dead[0]["id"])
    assert retried.returncode == 0 and "requested" in retried.stdout
    found = wait_for(sink.directory, b"Subject: " + mark + b"\r\n", count=2, timeout=20)
    [got] = [m for m in found if m.rcpt_tos == ("nobody@example.org",)]  # the other: the bounce
    assert without_trace(got.content) == data.replace(
        b"floor3@scan.example.com", b"scanner@example.com"
    )
    assert dead[0]["id"] not in {m["id"] for m in queue_json(gateway)}


# -- kill -9 ---------------------------------------------------------------------------------


def test_kill_9_with_100_spooled_messages_then_restart(
    tmp_path: Path,
    smtp_ports: SMTPPorts,
    submission: Dovecot,
    smtps_upstream: SMTPSink,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    ctx: ssl.SSLContext,
) -> None:
    ports = SMTPPorts()  # its own listeners and its own (down) flaky upstream
    gw = make_gateway(
        tmp_path / "gw", ports, submission, smtps_upstream.port, tls_upstream, tls_gateway
    )
    gw.start()
    marks = [b"kill9-%03d-" % i + uuid.uuid4().hex.encode() for i in range(100)]
    try:
        with smtplib.SMTP("localhost", ports.submission, timeout=20) as c:
            c.starttls(context=ctx)
            c.login("flaky-dev", "flaky-dev-pw")
            for mark in marks:
                c.sendmail(
                    "relay@example.com",
                    ["r@example.org"],
                    message(mark, sender=b"relay@example.com"),
                )
        gw.kill()
        queue = tmp_path / "gw" / "state" / "spool" / "queue"
        assert len(list(queue.glob("*.msg"))) == 100
        with smtps_sink(tmp_path / "late", tls_upstream, port=ports.flaky) as late:
            gw.start()
            late.wait_for(100, timeout=60)
            gw.wait_for_log("smtp relayed", timeout=10)
            # Nothing more turns up afterwards: with the queue empty, the relay
            # has nothing left to send (a message leaves it after the sink's 250).
            wait_until_empty(queue)
            arrived = read_messages(late.directory)
        subjects = sorted(m.content.split(b"Subject: ")[1].split(b"\r\n")[0] for m in arrived)
        assert subjects == sorted(marks)
        assert list(queue.glob("*.msg")) == []
    finally:
        gw.stop()


def wait_until_empty(queue: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while left := list(queue.glob("*.msg")):
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(left)} message(s) still queued in {queue}")
        time.sleep(0.05)


def test_a_second_gateway_on_the_same_spool_refuses_to_start(
    gateway: GatewayProcess,
    tmp_path: Path,
    submission: Dovecot,
    smtps_upstream: SMTPSink,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
) -> None:
    second = make_gateway(
        tmp_path, SMTPPorts(), submission, smtps_upstream.port, tls_upstream, tls_gateway
    )
    # The running gateway's state directory (the first line of both configs).
    same_state = gateway.config_text.splitlines()[0]
    second.config_text = "\n".join([same_state, *second.config_text.splitlines()[1:]])
    second.start()  # its listeners bind before the spool is opened
    assert second.process is not None and second.process.wait(timeout=20) == 1
    assert "is in use by another gateway process" in second.log_text()
    second.stop()


def test_no_secret_in_any_log_line(gateway: GatewayProcess) -> None:
    text = gateway.log_text()
    assert "smtp session" in text
    for secret in ("-pw", "scanner-pw", "alarm-pw", "relay-pw", "$argon2"):
        assert secret not in text
