"""Lines over 998 octets through the real twistd gateway, Dovecot's submission
service and an aiosmtpd sink: folded by default (as Postfix does), refused
with `554` when `long_lines = "refuse"`."""

from __future__ import annotations

import smtplib
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.smtp.folding import FOLD
from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import GatewayProcess
from tests.harness.smtp_sink import SMTPSink, read_messages
from tests.helpers.smtp_gateway import (
    SUBMISSION_USERS,
    SMTPPorts,
    smtp_gateway_config,
    wait_for,
    without_trace,
)
from tests.integration.test_smtp_gateway import marker, message
from tests.unit.test_smtp_folding import physical_lines, reference

pytestmark = pytest.mark.integration

LONG = 100 * 1024


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SMTPSink]:
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


def start_gateway(
    base: Path,
    ports: SMTPPorts,
    submission: Dovecot,
    sink: SMTPSink,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    long_lines: str | None,
) -> GatewayProcess:
    assert submission.submission_port is not None
    text = smtp_gateway_config(
        base / "state",
        ports,
        submission_port=submission.submission_port,
        smtps_port=sink.port,  # the implicit-TLS provider is not used here
        upstream=tls_upstream,
        own=tls_gateway,
    )
    if long_lines is not None:
        text = text.replace("[smtp]\n", f'[smtp]\nlong_lines = "{long_lines}"\n', 1)
    return GatewayProcess(base, text, ports.listening())


@pytest.fixture(scope="module")
def folding_ports() -> SMTPPorts:
    return SMTPPorts()


@pytest.fixture(scope="module")
def refusing_ports() -> SMTPPorts:
    return SMTPPorts()


@pytest.fixture(scope="module")
def folding(
    tmp_path_factory: pytest.TempPathFactory,
    folding_ports: SMTPPorts,
    submission: Dovecot,
    sink: SMTPSink,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
) -> Iterator[GatewayProcess]:
    """The gateway as shipped: no `long_lines` key, so "fold"."""
    base = tmp_path_factory.mktemp("folding-gateway")
    with start_gateway(
        base, folding_ports, submission, sink, tls_upstream, tls_gateway, None
    ) as gw:
        yield gw


@pytest.fixture(scope="module")
def refusing(
    tmp_path_factory: pytest.TempPathFactory,
    refusing_ports: SMTPPorts,
    submission: Dovecot,
    sink: SMTPSink,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("refusing-gateway")
    with start_gateway(
        base, refusing_ports, submission, sink, tls_upstream, tls_gateway, "refuse"
    ) as gw:
        yield gw


def long_message(mark: bytes) -> bytes:
    """A message with a 100 KiB header field and a 100 KiB body line, and no
    CRLF SPACE of its own (so that the folds are the only ones)."""
    body = (
        b"before\r\n"
        + b"".join(bytes([0x41 + i % 26]) for i in range(LONG))
        + b"\r\n"
        + b"x" * 998
        + b"\r\nafter\r\n"
    )
    head = message(mark, body=body)
    return head.replace(b"\r\n\r\n", b"\r\nX-Report: " + b"r" * LONG + b"\r\n\r\n", 1)


def assert_arrived_folded(got: bytes, sent: bytes) -> None:
    assert got == FOLD.join(reference(sent, 998))
    assert got.replace(FOLD, b"") == sent  # every other byte as sent
    assert max(map(len, physical_lines(got))) == 998
    # The header field ("X-Report: " + 100 KiB) and the body line: 998 octets,
    # then 997 after each fold's space.
    assert got.count(FOLD) == sum(-(-(n - 998) // 997) for n in (LONG + 10, LONG))


def test_smtplib_long_line_arrives_folded(
    folding: GatewayProcess, folding_ports: SMTPPorts, ctx: ssl.SSLContext, sink: SMTPSink
) -> None:
    mark = marker()
    data = long_message(mark)
    with smtplib.SMTP("localhost", folding_ports.submission, timeout=30) as c:
        c.starttls(context=ctx)
        c.login("alarm-panel", "alarm-panel-pw")
        c.sendmail("alarm@example.com", ["r@example.org"], data)
    [got] = wait_for(sink.directory, mark)
    assert_arrived_folded(without_trace(got.content), data)
    assert "lines over 998 octets folded" in folding.logfile.read_text()


def test_swaks_long_line_arrives_folded(
    folding: GatewayProcess,
    folding_ports: SMTPPorts,
    tls_gateway: TLSMaterial,
    sink: SMTPSink,
    tmp_path: Path,
) -> None:
    mark = marker()
    data = long_message(mark)
    message_file = tmp_path / "message.eml"
    # --no-data-fixup: swaks sends the file as it is, terminator included.
    message_file.write_bytes(data + b".\r\n")
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"localhost:{folding_ports.submission}",
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            str(tls_gateway.ca_file),
            "--auth",
            "PLAIN",
            "--auth-user",
            "alarm-panel",
            "--auth-password",
            "alarm-panel-pw",
            "--from",
            "alarm@example.com",
            "--to",
            "r@example.org",
            "--no-data-fixup",
            "--data",
            f"@{message_file}",
            "--suppress-data",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 OK queued as" in result.stdout
    [got] = wait_for(sink.directory, mark)
    assert_arrived_folded(without_trace(got.content), data)


def test_long_lines_refuse_answers_554_as_before(
    refusing: GatewayProcess, refusing_ports: SMTPPorts, ctx: ssl.SSLContext, sink: SMTPSink
) -> None:
    mark = marker()
    with smtplib.SMTP("localhost", refusing_ports.submission, timeout=20) as c:
        c.starttls(context=ctx)
        c.login("alarm-panel", "alarm-panel-pw")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            c.sendmail("alarm@example.com", ["r@example.org"], long_message(mark))
        assert refused.value.smtp_code == 554 and refused.value.smtp_error.startswith(b"5.6.0")
        assert c.noop()[0] == 250
    assert [m for m in read_messages(sink.directory) if mark in m.content] == []


# Moved from test_smtp_gateway.py, whose gateway now folds: the framing after a
# refused long line, with `long_lines = "refuse"`.
def test_overlong_data_line_keeps_framing(
    refusing: GatewayProcess, refusing_ports: SMTPPorts, ctx: ssl.SSLContext, sink: SMTPSink
) -> None:
    mark = marker()
    with smtplib.SMTP("localhost", refusing_ports.submission, timeout=20) as c:
        c.starttls(context=ctx)
        c.login("alarm-panel", "alarm-panel-pw")
        c.mail("alarm@example.com")
        c.rcpt("r@example.org")
        assert c.docmd("DATA")[0] == 354
        smuggled = (
            b"RSET\r\nMAIL FROM:<alarm@example.com>\r\nRCPT TO:<victim@example.org>\r\n"
            b"DATA\r\nSubject: " + mark + b"\r\n\r\nsmuggled\r\n"
        )
        c.send(b"Subject: long\r\n\r\n" + b"A" * 100_000 + b"\r\n" + smuggled + b".\r\n")
        code, text = c.getreply()
        assert code == 554 and text.startswith(b"5.6.0"), text
        assert c.noop()[0] == 250
    assert [m for m in read_messages(sink.directory) if mark in m.content] == []


def test_folding_keeps_framing(
    folding: GatewayProcess, folding_ports: SMTPPorts, ctx: ssl.SSLContext, sink: SMTPSink
) -> None:
    """The same smuggling attempt when folding: one message, the would-be
    commands are its body, and no second message goes out."""
    mark = marker()
    with smtplib.SMTP("localhost", folding_ports.submission, timeout=20) as c:
        c.starttls(context=ctx)
        c.login("alarm-panel", "alarm-panel-pw")
        c.mail("alarm@example.com")
        c.rcpt("r@example.org")
        assert c.docmd("DATA")[0] == 354
        smuggled = (
            b"RSET\r\nMAIL FROM:<alarm@example.com>\r\nRCPT TO:<victim@example.org>\r\n"
            b"DATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n"
        )
        c.send(b"Subject: " + mark + b"\r\n\r\n" + b"A" * 100_000 + b"\r\n" + smuggled + b".\r\n")
        code, text = c.getreply()
        assert code == 250, text
        assert c.noop()[0] == 250
    [got] = wait_for(sink.directory, mark)
    assert got.rcpt_tos == ("r@example.org",)
    assert without_trace(got.content).endswith(smuggled)
