"""Real POP3 client programs, the kind legacy devices embed, through the gateway
to a real Dovecot: curl (POP3S and POP3 with STLS), mpop and fetchmail."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.helpers.pop3 import Ports, crlf, message
from tests.helpers.pop3_programs import curl, fetchmail_download, mpop_download

pytestmark = pytest.mark.integration


def fill(dovecot: Dovecot, count: int = 3) -> list[bytes]:
    for n in range(count):
        dovecot.deliver("alice", message(n, body_lines=40))
    return [crlf(m) for m in dovecot.messages("alice")]


def test_curl_pop3s_lists_and_retrieves(
    gateway, ports: Ports, tls_gateway: TLSMaterial, clean_mailboxes: Dovecot
) -> None:
    stored = fill(clean_mailboxes)
    listing = curl(f"pop3s://localhost:{ports.implicit}/", tls_gateway.ca_file)
    assert listing == b"".join(f"{i} {len(m)}\r\n".encode() for i, m in enumerate(stored, 1))
    assert curl(f"pop3s://localhost:{ports.implicit}/2", tls_gateway.ca_file) == stored[1]


def test_curl_pop3_with_stls_and_dele(
    gateway, ports: Ports, tls_gateway: TLSMaterial, clean_mailboxes: Dovecot
) -> None:
    stored = fill(clean_mailboxes)
    url = f"pop3://localhost:{ports.starttls}/1"
    assert curl(url, tls_gateway.ca_file, "--ssl-reqd") == stored[0]
    curl(url, tls_gateway.ca_file, "--ssl-reqd", "-X", "DELE", "-I")
    assert [crlf(m) for m in clean_mailboxes.messages("alice")] == stored[1:]


def test_curl_without_stls_cannot_log_in(
    gateway, ports: Ports, tls_gateway: TLSMaterial, clean_mailboxes: Dovecot
) -> None:
    result = subprocess.run(
        ["curl", "-sS", f"pop3://localhost:{ports.starttls}/", "-u", "printer:printer-pw"],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode != 0


def test_mpop_downloads_and_deletes(
    gateway, ports: Ports, tls_gateway: TLSMaterial, clean_mailboxes: Dovecot, tmp_path: Path
) -> None:
    stored = fill(clean_mailboxes)
    got = sorted(mpop_download(ports.starttls, tls_gateway.ca_file, tmp_path))
    assert len(got) == len(stored)
    # mpop stores LF line ends and adds its own Received: header on top.
    for original in stored:
        unix = original.replace(b"\r\n", b"\n")
        assert any(g.endswith(unix) for g in got), original[:80]
    assert clean_mailboxes.messages("alice") == []


def test_fetchmail_downloads_and_deletes(
    gateway, ports: Ports, tls_gateway: TLSMaterial, clean_mailboxes: Dovecot, tmp_path: Path
) -> None:
    stored = fill(clean_mailboxes)
    got = fetchmail_download(ports.implicit, tls_gateway.ca_file, tmp_path)
    assert len(got) == len(stored)
    for original in stored:
        body = original.partition(b"\r\n\r\n")[2].replace(b"\r\n", b"\n")
        assert any(g.endswith(body) for g in got)
    assert clean_mailboxes.messages("alice") == []
