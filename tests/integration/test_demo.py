"""`make demo` really works: the demo module starts Dovecot, the test
authorization server, an SMTPS sink and the gateway, and `--check` drives one
message of each kind through (a POP3 password account, an IMAP-backed one,
an OAuth2 one after connecting it in the web console, the SMTP relay into the
sink) with real curl, then stops everything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.gateway_process import REPO_ROOT, free_port

pytestmark = pytest.mark.integration


def test_demo_serves_every_kind_of_account_and_stops(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("pop3s", "pop3", "smtp", "admin")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.harness.demo",
            "--check",
            "--dir",
            str(tmp_path / "demo"),
            *(arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))),
        ],
        capture_output=True,
        cwd=REPO_ROOT,
        timeout=180,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "printer / printer-pw" in out and "curl pop3s://" in out
    assert f"http://127.0.0.1:{ports['admin']}/console/" in out and "admin name: admin" in out
    for step in (
        "pop3 password account: ok",
        "imap-backed account: ok",
        "connect oauth-demo in the console: ok",
        "oauth2 account: ok",
        "smtp relay into the sink: ok",
    ):
        assert step in out
    assert "demo check: ok" in out
    # Stopped cleanly: nothing listens on the demo's ports any more.
    for port in ports.values():
        assert (
            subprocess.run(
                ["curl", "-sS", "--max-time", "2", f"http://127.0.0.1:{port}/"],
                capture_output=True,
                check=False,
            ).returncode
            == 7
        )  # couldn't connect
