"""`make demo` really works: the demo module starts Dovecot and the gateway and
a real curl fetches a message through it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.gateway_process import REPO_ROOT, free_port

pytestmark = pytest.mark.integration


def test_demo_serves_its_mailbox_to_curl(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.harness.demo",
            "--check",
            "--dir",
            str(tmp_path / "demo"),
            "--pop3s-port",
            str(free_port()),
            "--pop3-port",
            str(free_port()),
        ],
        capture_output=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "device user name: printer" in out and "curl pop3s://" in out
    assert "demo check: ok" in out
