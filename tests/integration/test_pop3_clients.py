"""Real POP3 client programs, the kind legacy devices embed, through the gateway
to a real Dovecot: curl (POP3S and POP3 with STLS), mpop and fetchmail."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.helpers.pop3 import Ports, crlf, message

pytestmark = pytest.mark.integration


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(args, capture_output=True, timeout=60, **kwargs)
    assert result.returncode == 0, (args[0], result.returncode, result.stderr.decode())
    return result


def fill(dovecot: Dovecot, count: int = 3) -> list[bytes]:
    for n in range(count):
        dovecot.deliver("alice", message(n, body_lines=40))
    return [crlf(m) for m in dovecot.messages("alice")]


def curl(url: str, ca: Path, *extra: str) -> bytes:
    return run(
        [
            "curl",
            "-sS",
            "--max-time",
            "30",
            url,
            "-u",
            "printer:printer-pw",
            "--cacert",
            str(ca),
            *extra,
        ]
    ).stdout


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
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    run(
        [
            "mpop",
            "--quiet",
            "--host=localhost",
            f"--port={ports.starttls}",
            "--tls=on",
            "--tls-starttls=on",
            f"--tls-trust-file={tls_gateway.ca_file}",
            "--auth=user",
            "--user=printer",
            "--passwordeval=echo printer-pw",
            f"--delivery=maildir,{maildir}",
            f"--uidls-file={tmp_path / 'uidls'}",
            "--keep=off",
            "--only-new=off",
        ]
    )
    got = sorted(p.read_bytes() for p in (maildir / "new").iterdir())
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
    out = tmp_path / "delivered"
    out.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f"poll localhost protocol POP3 port {ports.implicit} auth password\n"
        f'  user "printer" there with password "printer-pw" is "root" here\n'
        f'  ssl sslcertck sslcertfile "{tls_gateway.ca_file}"\n'
        f"  mda \"/bin/sh -c 'cat > {out}/$$'\"\n"
    )
    rc.chmod(0o600)
    env = dict(os.environ, FETCHMAILHOME=str(tmp_path), HOME=str(tmp_path))
    result = subprocess.run(
        ["fetchmail", "-f", str(rc), "--nodetach", "--all", "--nokeep", "--nosyslog"],
        capture_output=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()
    got = [p.read_bytes() for p in out.iterdir()]
    assert len(got) == len(stored)
    for original in stored:
        body = original.partition(b"\r\n\r\n")[2].replace(b"\r\n", b"\n")
        assert any(g.endswith(body) for g in got)
    assert clean_mailboxes.messages("alice") == []
