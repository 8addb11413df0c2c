"""The test authorization server as a child process, controlled over HTTP.

For tests whose body blocks (poplib against a twistd gateway), since Dovecot
must be able to introspect tokens while the test waits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any


class OAuthServerProcess:
    """`python -m tests.harness.oauth_server` as a child, controlled over HTTP."""

    def __init__(self, base_dir: Path, **settings: Any) -> None:
        self.base_dir = base_dir
        self.settings = settings
        self.port_file = base_dir / "oauth-server.port"
        self.log_file = base_dir / "oauth-server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> OAuthServerProcess:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.port_file.unlink(missing_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.harness.oauth_server",
                    "--port-file",
                    str(self.port_file),
                    "--settings",
                    json.dumps(self.settings),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
            )
        deadline = time.monotonic() + timeout
        while not self.port_file.exists() or not self.port_file.read_text().strip():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"oauth test server did not start:\n{self.log_text()}")
            time.sleep(0.02)
        self.port = int(self.port_file.read_text())
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def control(self, action: str, **body: Any) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.url}/control/{action}",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result

    def stats(self) -> dict[str, Any]:
        return self.control("stats")

    def count(self, name: str) -> int:
        return int(self.stats()["counts"].get(name, 0))

    def __enter__(self) -> OAuthServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
