"""A real, throwaway HAProxy 2.6 on 127.0.0.1 in TCP mode, for PROXY protocol tests.

The gateway's PROXY protocol support is only worth something if it reads
what a real load balancer writes, so tests put the packaged ``haproxy``
binary in front of it: one frontend per route, on a free loopback port, each
forwarding to one gateway port with ``send-proxy`` (v1) or ``send-proxy-v2``.
It runs in the foreground (``-db``) from a generated configuration under one
directory and is stopped by the PID of the process started here.

A `Balanced` frontend spreads its clients over several gateway nodes
(round robin, ``send-proxy-v2``), each checked with ``option httpchk GET
/readyz`` against the node's admin port, the way the README's two-node set-up
runs; `server_states` reads HAProxy's own view (its stats socket), so a test
can wait for a killed node to be taken out instead of sleeping.
"""

from __future__ import annotations

import csv
import io
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from tests.harness.gateway_process import free_port

HAPROXY = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/haproxy"

ProxyVersion = Literal["v1", "v2"]
_SERVER_OPTION: dict[ProxyVersion, str] = {"v1": "send-proxy", "v2": "send-proxy-v2"}


class HAProxyError(RuntimeError):
    """HAProxy refused its configuration or did not listen; the text has its output."""


@dataclass
class Route:
    """One frontend: clients connect to `front_port`, HAProxy connects to
    `backend_port` and writes the PROXY header of `version` first."""

    name: str
    backend_port: int
    version: ProxyVersion
    front_port: int = field(default_factory=free_port)
    # TCP health checks of the backend that send a header too: with v2 one
    # with the LOCAL command (no addresses), which the backend must accept.
    health_check: bool = False


@dataclass
class Server:
    """One node behind a `Balanced` frontend: its device port and the admin
    port its `/readyz` health check goes to (None: no check)."""

    name: str
    port: int
    check_port: int | None = None


@dataclass
class Balanced:
    """One frontend spread over `servers` in turn, each sent a PROXY header
    of `version`. A server failing `health_path` twice is taken out; a
    connection that cannot reach a server goes to the next one."""

    name: str
    servers: list[Server]
    version: ProxyVersion = "v2"
    front_port: int = field(default_factory=free_port)
    health_path: str = "/readyz"
    check_interval_ms: int = 300


class HAProxy:
    def __init__(
        self,
        base_dir: Path,
        routes: list[Route],
        *,
        balanced: list[Balanced] | None = None,
        backend_host: str = "127.0.0.1",
        startup_timeout: float = 10.0,
        maxconn: int = 200,
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.routes = {route.name: route for route in routes}
        self.balanced = {each.name: each for each in balanced or []}
        self.backend_host = backend_host
        self.startup_timeout = startup_timeout
        self.maxconn = maxconn
        self.config_file = self.base_dir / "haproxy.cfg"
        self.output_file = self.base_dir / "haproxy.out"
        self.stats_socket = self.base_dir / "stats.sock"
        self._process: subprocess.Popen[bytes] | None = None

    def port(self, name: str) -> int:
        if name in self.balanced:
            return self.balanced[name].front_port
        return self.routes[name].front_port

    def _front_ports(self) -> list[int]:
        return [r.front_port for r in self.routes.values()] + [
            b.front_port for b in self.balanced.values()
        ]

    def render_config(self) -> str:
        lines = [
            "global",
            f"  maxconn {self.maxconn}",
            "  nbthread 1",
            f"  stats socket {self.stats_socket} mode 600 level admin",
            "defaults",
            "  mode tcp",
            "  timeout connect 5s",
            "  timeout client 2m",
            "  timeout server 2m",
        ]
        for route in self.routes.values():
            lines += [
                f"frontend front_{route.name}",
                f"  bind 127.0.0.1:{route.front_port}",
                f"  default_backend back_{route.name}",
                f"backend back_{route.name}",
                f"  server gateway {self.backend_host}:{route.backend_port} "
                + _SERVER_OPTION[route.version]
                + (" check check-send-proxy inter 500ms" if route.health_check else ""),
            ]
        for each in self.balanced.values():
            lines += [
                f"frontend front_{each.name}",
                f"  bind 127.0.0.1:{each.front_port}",
                f"  default_backend back_{each.name}",
                f"backend back_{each.name}",
                "  balance roundrobin",
                "  retries 2",
                "  option redispatch 1",
                f"  option httpchk GET {each.health_path}",
                "  http-check expect status 200",
            ]
            for server in each.servers:
                check = (
                    f" check port {server.check_port} inter {each.check_interval_ms}ms"
                    " fall 2 rise 1"
                    if server.check_port is not None
                    else ""
                )
                lines.append(
                    f"  server {server.name} {self.backend_host}:{server.port} "
                    + _SERVER_OPTION[each.version]
                    + check
                )
        return "\n".join(lines) + "\n"

    def server_states(self, balanced: str) -> dict[str, str]:
        """Server name -> HAProxy's status ("UP", "DOWN", "UP 1/2", ...) in
        the backend of a `Balanced` frontend, from the stats socket."""
        chunks = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            try:
                client.connect(str(self.stats_socket))
            except (FileNotFoundError, ConnectionRefusedError):
                return {}  # HAProxy has not opened its socket yet
            client.sendall(b"show stat\n")
            while chunk := client.recv(65536):
                chunks.append(chunk)
        text = b"".join(chunks).decode().lstrip("# ")
        return {
            row["svname"]: row["status"]
            for row in csv.DictReader(io.StringIO(text))
            if row.get("pxname") == f"back_{balanced}" and row["svname"] != "BACKEND"
        }

    def start(self) -> HAProxy:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self.render_config())
        check = subprocess.run(
            [HAPROXY, "-c", "-f", str(self.config_file)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise HAProxyError(f"haproxy -c refused the config:\n{check.stdout}{check.stderr}")
        with self.output_file.open("wb") as output:
            self._process = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.config_file)],
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_listening(self) -> None:
        """Every frontend port bound. Probed by connect and close, which HAProxy
        may or may not pass on to the backend: no test counts those."""
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        pending = self._front_ports()
        while pending:
            if self._process.poll() is not None:
                raise HAProxyError(
                    f"haproxy exited with {self._process.returncode}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise HAProxyError(f"haproxy did not listen on {pending}:\n{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", pending[0]), timeout=0.5).close()
                pending.pop(0)
            except OSError:
                time.sleep(0.02)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def output(self) -> str:
        try:
            return self.output_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
