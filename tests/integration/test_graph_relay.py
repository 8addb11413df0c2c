"""The real twistd gateway relaying SMTP through Microsoft Graph's sendMail:
devices (smtplib, swaks, msmtp) in front, the Graph emulator (a thread of
this process, tokens checked by introspection at the suite's authorization
server, sendMail needing the Mail.Send scope) behind."""

from __future__ import annotations

import base64
import json
import smtplib
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.gateway_config import config_head, listen
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.harness.graph_emulator import GraphEmulator, IntrospectedTokens, Sent, StaticTokens
from tests.harness.oauth_server import OAuthServerProcess
from tests.helpers.device_grant import store_device_grant
from tests.helpers.pop3 import HASHER
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.integration

CLIENT_SECRET = "graph-relay-secret"
USER = "alice@example.com"
SCOPES = "mail Mail.Send offline_access"
GRAPH_LIMIT = 3_000_000


@dataclass
class Ports:
    submission: int = field(default_factory=free_port)
    smtps: int = field(default_factory=free_port)

    def listening(self) -> list[int]:
        return [self.submission, self.smtps]


def authorize(state: Path, idp: OAuthServerProcess, account: str) -> None:
    """Tokens for `account` as `gateway oauth authorize` would store them."""
    store_device_grant(state, idp, account, CLIENT_SECRET, USER, scope=SCOPES)


def config(base: Path, ports: Ports, graph_url: str, idp_url: str, own: TLSMaterial) -> str:
    secret = base / "client-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    secret.chmod(0o600)
    device = 'password_hash = "{}"\naccount = "relay"\nallow_from = ["127.0.0.0/8"]\n'
    return (
        "\n".join(
            [
                *config_head(base / "state", own),
                "[smtp]",
                "idle_timeout = 60",
                "max_message_size = 5000000",
                "retry_first = 1",
                "retry_max_interval = 2",
                *listen("smtp", ports.submission, "starttls"),
                *listen("smtp", ports.smtps, "implicit"),
                # Graph only: no smtp endpoint, so a Graph mailbox relays through Graph.
                "[providers.m365]",
                f'graph_url = "{graph_url}"',
                "timeout = 5",
                f'oauth = {{ token_url = "{idp_url}/token", '
                f'device_authorization_url = "{idp_url}/device", client_id = "gateway", '
                f'client_secret_file = "{secret}", '
                'scopes = ["mail", "Mail.Send", "offline_access"] }',
                "[accounts.relay]",
                f'provider = "m365"\nusername = "{USER}"\nauth = "oauth2"\ngrant = "device_code"',
                'mailbox = "graph"\nallowed_senders = ["*@example.com"]',
                "[devices.printer]",
                device.format(HASHER.hash("printer-pw")) + 'protocols = ["smtp"]',
                # A printer that cannot authenticate, known by its address.
                "[devices.lan]",
                f'password_hash = "{HASHER.hash("lan-pw")}"\naccount = "relay"',
                'allow_from = ["127.0.0.2/32"]\nprotocols = ["smtp"]\nrelay_without_auth = true',
            ]
        )
        + "\n"
    )


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OAuthServerProcess]:
    with OAuthServerProcess(tmp_path_factory.mktemp("idp-relay"), client_secret=CLIENT_SECRET) as s:
        yield s


@pytest.fixture(scope="module")
def graph(idp: OAuthServerProcess) -> Iterator[GraphEmulator]:
    # The gateway's Graph token: Graph's scopes on the host of graph_url.
    check = IntrospectedTokens(
        f"{idp.url}/introspect",
        scope="https://127.0.0.1/Mail.ReadWrite",
        send_scope="https://127.0.0.1/Mail.Send",
    )
    with GraphEmulator(check) as emulator:
        yield emulator


def make_gateway(
    base: Path, ports: Ports, graph: GraphEmulator, idp: OAuthServerProcess, own: TLSMaterial
) -> GatewayProcess:
    base.mkdir(parents=True, exist_ok=True)
    text = config(base, ports, graph.url, idp.url, own)
    authorize(base / "state", idp, "relay")
    return GatewayProcess(base, text, ports.listening())


@pytest.fixture(scope="module")
def ports() -> Ports:
    return Ports()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    ports: Ports,
    graph: GraphEmulator,
    idp: OAuthServerProcess,
    tls_gateway: TLSMaterial,
) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("graph-relay")
    with make_gateway(base, ports, graph, idp, tls_gateway) as gw:
        yield gw


@pytest.fixture
def clean(graph: GraphEmulator, gateway: GatewayProcess) -> GraphEmulator:
    with graph.lock:
        graph.throttles.clear()
        graph.send_delay = 0.0
    return graph


def marker() -> bytes:
    return b"relay-" + uuid.uuid4().hex.encode()


def sent_with(graph: GraphEmulator, mark: bytes, count: int = 1, timeout: float = 20) -> list[Sent]:
    def sent() -> list[Sent]:
        with graph.lock:
            return [s for s in graph.sent if mark in s.mime]

    return wait_until(
        sent,
        timeout,
        lambda found: f"{len(found)} of {count} messages with {mark!r} sent",
        done=lambda found: len(found) >= count,
    )


def submit(port: int, ctx: ssl.SSLContext, sender: str, recipients: list[str], data: bytes) -> None:
    with smtplib.SMTP("localhost", port, timeout=20) as client:
        client.starttls(context=ctx)
        client.login("printer", "printer-pw")
        client.sendmail(sender, recipients, data)


def message(
    mark: bytes, headers: bytes = b"To: r@example.org\r\n", body: bytes = b"hi\r\n"
) -> bytes:
    return (
        b"From: scan@example.com\r\n" + headers + b"Subject: " + mark + b"\r\n"
        b"Date: Mon, 2 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <" + mark + b"@example.com>\r\n\r\n" + body
    )


# -- what Graph is sent ----------------------------------------------------------------


def test_smtplib_message_is_sent_byte_for_byte(
    clean: GraphEmulator, ports: Ports, ctx: ssl.SSLContext
) -> None:
    mark = marker()
    body = b"".join(
        [b"first\r\n", b".\r\n", b"..\r\n", b".dot\r\n", b"x" * 998 + b"\r\n"]
        + ["caf\u00e9 \u00fc\r\n".encode()] * 3
        + [b"line %d\r\n" % i for i in range(20000)]
    )
    data = message(mark, body=body)
    submit(ports.submission, ctx, "scan@example.com", ["r@example.org"], data)
    [sent] = sent_with(clean, mark)
    assert sent.mime == data
    assert sent.recipients == ["r@example.org"] and sent.user == USER
    # Graph keeps a copy in Sent Items.
    with clean.lock:
        assert data in [m.mime for m in clean.mailbox(USER).in_folder("sentitems")]


def test_envelope_decides_who_receives(
    clean: GraphEmulator, ports: Ports, ctx: ssl.SSLContext
) -> None:
    mark = marker()
    data = message(mark, b"To: r@example.org\r\nCc: header-only@example.org\r\n")
    envelope = ["r@example.org", "hidden@example.net"]
    submit(ports.submission, ctx, "scan@example.com", envelope, data)
    [sent] = sent_with(clean, mark)
    # The documented changes only: the Cc naming no envelope recipient goes,
    # the envelope-only recipient is added as Bcc at the end of the header.
    expected = data.replace(b"Cc: header-only@example.org\r\n", b"").replace(
        b"\r\n\r\nhi", b"\r\nBcc: <hidden@example.net>\r\n\r\nhi"
    )
    assert sent.mime == expected
    assert sorted(sent.recipients) == sorted(envelope)


def test_swaks_auth_login_over_starttls(
    clean: GraphEmulator, ports: Ports, tls_gateway: TLSMaterial
) -> None:
    mark = marker().decode()
    result = subprocess.run(
        [
            "swaks",
            "--server",
            f"localhost:{ports.submission}",
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            str(tls_gateway.ca_file),
            "--auth",
            "LOGIN",
            "--auth-user",
            "printer",
            "--auth-password",
            "printer-pw",
            "--from",
            "swaks@example.com",
            "--to",
            "r@example.org,s@example.org",
            "--header",
            f"Subject: {mark}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [sent] = sent_with(clean, mark.encode())
    assert sorted(sent.recipients) == ["r@example.org", "s@example.org"]
    assert f"Subject: {mark}".encode() in sent.mime


def test_msmtp_over_implicit_tls(
    clean: GraphEmulator, ports: Ports, tls_gateway: TLSMaterial
) -> None:
    mark = marker()
    data = message(mark).replace(b"\r\n", b"\n")
    result = subprocess.run(
        [
            "msmtp",
            "--host=localhost",
            f"--port={ports.smtps}",
            "--tls=on",
            "--tls-starttls=off",
            f"--tls-trust-file={tls_gateway.ca_file}",
            "--auth=plain",
            "--user=printer",
            "--passwordeval=echo printer-pw",
            "--from=scan@example.com",
            "r@example.org",
        ],
        input=data,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    [sent] = sent_with(clean, mark)
    assert sent.mime == data.replace(b"\n", b"\r\n")


# -- size ----------------------------------------------------------------------------------


def test_oversize_is_refused_at_mail_and_at_end_of_data(
    clean: GraphEmulator, ports: Ports, ctx: ssl.SSLContext
) -> None:
    with smtplib.SMTP("localhost", ports.submission, timeout=20) as client:
        client.starttls(context=ctx)
        client.login("printer", "printer-pw")
        code, text = client.mail("scan@example.com", [f"SIZE={GRAPH_LIMIT + 1}"])
        assert (code, text[:5]) == (552, b"5.3.4")
        assert str(GRAPH_LIMIT).encode() in text
        client.rset()
        mark = marker()
        big = message(mark, body=(b"y" * 98 + b"\r\n") * (GRAPH_LIMIT // 100 + 1))
        # Without SIZE= (smtplib would send it): refused at the end of DATA.
        assert client.mail("scan@example.com")[0] == 250
        assert client.rcpt("r@example.org")[0] == 250
        code, text = client.data(big)
        assert (code, text[:5]) == (552, b"5.3.4") and str(GRAPH_LIMIT).encode() in text
        # Just under the limit goes through, in one sendMail of base64 below 4 MB.
        fits = message(mark, body=(b"z" * 98 + b"\r\n") * ((GRAPH_LIMIT - 300) // 100))
        assert len(fits) <= GRAPH_LIMIT
        client.sendmail("scan@example.com", ["r@example.org"], fits)
    [sent] = sent_with(clean, mark)
    assert sent.mime == fits and len(base64.b64encode(fits)) < 4 * 1024 * 1024


def test_ehlo_size_is_graphs_for_a_device_known_by_address(
    clean: GraphEmulator, ports: Ports, ctx: ssl.SSLContext
) -> None:
    with smtplib.SMTP("localhost", ports.submission, timeout=20) as anyone:
        anyone.ehlo()
        # Before AUTH the device is not known: the listener's limit.
        assert anyone.esmtp_features["size"] == "5000000"
    with smtplib.SMTP(
        "127.0.0.1", ports.submission, timeout=20, source_address=("127.0.0.2", 0)
    ) as lan:
        lan.ehlo()
        assert lan.esmtp_features["size"] == str(GRAPH_LIMIT)
        mark = marker()
        lan.sendmail("scan@example.com", ["r@example.org"], message(mark))
    [sent] = sent_with(clean, mark)
    assert sent.mime == message(mark)


# -- throttling ----------------------------------------------------------------------------


def test_429_is_retried_after_retry_after(
    clean: GraphEmulator, ports: Ports, ctx: ssl.SSLContext
) -> None:
    clean.throttle(1, status=429, retry_after="2", kind="sendMail")
    mark = marker()
    started = time.monotonic()
    submit(ports.submission, ctx, "scan@example.com", ["r@example.org"], message(mark))
    [sent] = sent_with(clean, mark)
    assert time.monotonic() - started >= 2.0
    assert sent.mime == message(mark)
    with clean.lock:
        assert not clean.throttles


# -- kill -9 ---------------------------------------------------------------------------------


def test_kill_9_with_messages_in_flight_then_restart(
    tmp_path: Path,
    graph: GraphEmulator,
    idp: OAuthServerProcess,
    tls_gateway: TLSMaterial,
    ctx: ssl.SSLContext,
) -> None:
    own = Ports()
    gw = make_gateway(tmp_path / "gw", own, graph, idp, tls_gateway)
    marks = [b"kill9-graph-%02d-" % i + uuid.uuid4().hex.encode() for i in range(12)]
    with graph.lock:
        graph.send_delay = 1.0  # each sendMail answers a second late
        before = len(graph.sent)
    gw.start()
    try:
        with smtplib.SMTP("localhost", own.submission, timeout=20) as client:
            client.starttls(context=ctx)
            client.login("printer", "printer-pw")
            for mark in marks:
                client.sendmail("scan@example.com", ["r@example.org"], message(mark))
        wait_until(
            lambda: graph.counts["sendMail"] > 0 and graph.inflight[USER],
            20,
            "no sendMail in flight",
            interval=0.01,
        )
        gw.kill()
        queue = tmp_path / "gw" / "state" / "spool" / "queue"
        left = len(list(queue.glob("*.msg")))
        assert left > 0
        with graph.lock:
            graph.send_delay = 0.0
        gw.start()
        for mark in marks:
            sent_with(graph, mark, timeout=30)
        wait_until(lambda: not list(queue.glob("*.msg")), 20, "messages still queued")
        with graph.lock:
            sent = [s for s in graph.sent[before:] if any(m in s.mime for m in marks)]
        counts = {m: sum(m in s.mime for s in sent) for m in marks}
        assert all(n >= 1 for n in counts.values())
        # A duplicate only for a message whose sendMail was in flight at the
        # crash: at most one per relay lane (3 per account).
        assert sum(n - 1 for n in counts.values()) <= 3
    finally:
        with graph.lock:
            graph.send_delay = 0.0
        gw.stop()


# -- the emulator's sendMail, as documented ------------------------------------------------


def post(url: str, body: bytes, token: str, content_type: str = "text/plain") -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": content_type},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_emulator_sendmail_answers() -> None:
    tokens = StaticTokens({"t": "bob@example.com", "readonly": "bob@example.com"}, {"readonly"})
    with GraphEmulator(tokens) as emulator:
        url = f"{emulator.url}/users/bob@example.com/sendMail"
        mime = b"From: bob@example.com\r\nTo: a@x.org, B <b@x.org>\r\nBcc: c@x.org\r\n\r\nhi\r\n"
        assert post(url, base64.b64encode(mime), "t") == (202, b"")
        [sent] = emulator.sent
        assert sent.mime == mime and sent.recipients == ["a@x.org", "b@x.org", "c@x.org"]
        status, error = post(url, b"not base64!", "t")
        assert status == 400
        assert error["error"]["code"] == "ErrorMimeContentInvalidBase64String"
        assert error["error"]["message"] == "Invalid base64 string for MIME content."
        status, error = post(url, base64.b64encode(mime), "readonly")
        assert (status, error["error"]["code"]) == (403, "ErrorAccessDenied")
        emulator.throttle(1, retry_after="3", kind="sendMail")
        status, error = post(url, base64.b64encode(mime), "t")
        assert status == 429
        big = base64.b64encode(b"x" * (3 * 1024 * 1024 + 1))
        assert post(url, big, "t")[0] == 413
        assert len(emulator.sent) == 1
