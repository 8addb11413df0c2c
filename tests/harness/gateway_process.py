"""Runs the real gateway (`twistd -n gateway --config FILE`) as a child process.

Integration tests, benchmarks and the demo use this so they exercise exactly
what an admin runs: the twistd plugin, the config loader and the listeners.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def twistd_command(
    config: Path,
    logfile: Path | None,
    twistd_args: list[str] | None = None,
    twistd: list[str] | None = None,
) -> list[str]:
    """`twistd`: how to run twistd, if not the one beside this interpreter."""
    beside = Path(sys.executable).with_name("twistd")
    return [
        *(twistd or [str(beside) if beside.exists() else "twistd"]),
        "-n",
        "--pidfile=",
        f"--logfile={logfile}" if logfile else "--logfile=-",
        *(twistd_args or []),
        "gateway",
        "--config",
        str(config),
    ]


class GatewayProcess:
    """A gateway child process with its own config file and log file."""

    def __init__(
        self,
        base_dir: Path,
        config_text: str,
        ports: list[int],
        *,
        twistd_args: list[str] | None = None,
        twistd: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """`twistd_args`: more of twistd's own options (`--uid`, `--gid`);
        `twistd`: the command that runs twistd; `env`: more environment."""
        self.base_dir = base_dir
        self.twistd_args = twistd_args
        self.twistd = twistd
        self.extra_env = env or {}
        self.config = base_dir / "gateway.toml"
        self.logfile = base_dir / "gateway.log"
        self.config_text = config_text
        self.ports = ports
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.config_text)
        env = dict(os.environ)
        env.update(self.extra_env)
        # twistd finds plugins in every twisted/plugins directory on sys.path.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        self.process = subprocess.Popen(
            twistd_command(self.config, self.logfile, self.twistd_args, self.twistd),
            cwd=self.base_dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        pending = list(self.ports)
        while pending:
            if self.process.poll() is not None:
                output = (
                    self.process.stdout.read().decode(errors="replace")
                    if self.process.stdout
                    else ""
                )
                raise RuntimeError(
                    f"gateway exited with {self.process.returncode}:\n{output}\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"gateway did not listen on {pending}:\n{self.log_text()}")
            try:
                socket.create_connection(("127.0.0.1", pending[0]), timeout=0.5).close()
                pending.pop(0)
            except OSError:
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()
        self.process = None

    def kill(self) -> None:
        """kill -9: what a crash looks like."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, needle: str, timeout: float = 5.0) -> str:
        return wait_until(
            self.log_text,
            timeout,
            lambda text: f"{needle!r} not in gateway log:\n{text[-3000:]}",
            done=lambda text: needle in text,
        )

    def __enter__(self) -> GatewayProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
