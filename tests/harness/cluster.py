"""Several real gateway nodes sharing one PostgreSQL database behind a real HAProxy.

Issue 13's promises (one POP3 session per mailbox across nodes, one token
refresh, nothing lost when a node dies, the same UIDLs everywhere) only mean
something across processes that share nothing but the database, so the
harness runs what an admin would: 2-3 `twistd -n gateway` nodes, each with
its own state directory (its own "host"), the same accounts and devices,
`[state] backend = "postgresql"` with a short `lease_time`, every device
listener with `proxy_protocol = true`, and an admin listener whose `/readyz`
HAProxy checks. One `Balanced` HAProxy frontend per device listener spreads
clients over the nodes in turn with `send-proxy-v2`.

The database must be migrated before the nodes start (`state_dsn` or
`tests.helpers.state.migrated_database`). Nodes can be killed (-9) and
started again; `wait_servers` waits for HAProxy's health checks to agree.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tests.harness.certs import TLSMaterial
from tests.harness.gateway_config import config_head, listen
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.harness.haproxy import Balanced, HAProxy, Server
from tests.helpers.state import state_toml
from tests.helpers.waiting import wait_until

# Short, so that a killed node's locks and leases lapse within a test's patience.
LEASE_TIME = 6.0


@dataclass(frozen=True)
class Listening:
    """A device listener every node has: "pop3"/"smtp" and its TLS mode."""

    protocol: str
    tls: str


@dataclass
class ClusterNode:
    """One gateway node: its process, its ports and its log."""

    name: str
    base: Path
    ports: dict[str, int]
    admin_port: int = field(default_factory=free_port)
    process: GatewayProcess | None = None

    def log_text(self) -> str:
        return self.process.log_text() if self.process else ""

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        assert self.process is not None
        return self.process.wait_for_log(needle, timeout)

    def kill(self) -> None:
        """kill -9: the node dies holding whatever it held."""
        assert self.process is not None
        self.process.kill()

    @property
    def running(self) -> bool:
        return (
            self.process is not None
            and self.process.process is not None
            and self.process.process.poll() is None
        )

    def readyz(self) -> tuple[int, dict[str, object]]:
        """`/readyz` of this node: (HTTP status, JSON body)."""
        url = f"http://127.0.0.1:{self.admin_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")


class GatewayCluster:
    """`nodes` gateway nodes on one database, behind one HAProxy."""

    def __init__(
        self,
        base_dir: Path,
        *,
        dsn: str,
        own: TLSMaterial,
        listeners: dict[str, Listening],
        body: Iterable[str],
        nodes: int = 2,
        lease_time: float = LEASE_TIME,
        state_extra: dict[str, object] | None = None,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.dsn = dsn
        self.own = own
        self.listeners = dict(listeners)
        self.body = list(body)
        self.lease_time = lease_time
        self.state_extra = dict(state_extra or {})
        self.nodes = [
            ClusterNode(
                f"node{n}",
                self.base_dir / f"node{n}",
                {name: free_port() for name in self.listeners},
            )
            for n in range(1, nodes + 1)
        ]
        self.haproxy = HAProxy(
            self.base_dir / "haproxy",
            [],
            balanced=[
                Balanced(
                    name,
                    [Server(node.name, node.ports[name], node.admin_port) for node in self.nodes],
                )
                for name in self.listeners
            ],
        )

    def config_text(self, node: ClusterNode) -> str:
        lines = [
            *config_head(node.base / "state", self.own),
            state_toml(self.dsn, node=node.name, lease_time=self.lease_time, **self.state_extra),
            "[proxy]",
            'trusted = ["127.0.0.1"]',
            "header_timeout = 5",
            "[admin]",
            'address = "127.0.0.1"',
            f"port = {node.admin_port}",
        ]
        for name, listening in self.listeners.items():
            lines += [*listen(listening.protocol, node.ports[name], listening.tls)]
            lines.append("proxy_protocol = true")
        return "\n".join(lines + self.body) + "\n"

    def port(self, listener: str) -> int:
        """Where devices connect: HAProxy's frontend for `listener`."""
        return self.haproxy.port(listener)

    def node(self, name: str) -> ClusterNode:
        return next(node for node in self.nodes if node.name == name)

    # -- running

    def start(self) -> GatewayCluster:
        try:
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                for started in [pool.submit(self.start_node, node) for node in self.nodes]:
                    started.result()
            self.haproxy.start()
            for name in self.listeners:
                self.wait_servers(name, up={node.name for node in self.nodes})
        except BaseException:
            self.close()
            raise
        return self

    def start_node(self, node: ClusterNode, timeout: float = 30.0) -> None:
        """Start (or start again) `node` and wait until it holds its process
        lease in the database (until then it cannot serve devices)."""
        node.base.mkdir(parents=True, exist_ok=True)
        node.process = GatewayProcess(
            node.base, self.config_text(node), [*node.ports.values(), node.admin_port]
        )
        node.process.logfile.unlink(missing_ok=True)
        node.process.start(timeout)
        node.wait_for_log("state backend postgresql: schema version", timeout)

    def wait_servers(
        self,
        listener: str,
        *,
        up: set[str] | None = None,
        down: set[str] | None = None,
        timeout: float = 15.0,
    ) -> dict[str, str]:
        """Until HAProxy sees the `up` nodes UP and the `down` ones DOWN."""

        def agrees(states: dict[str, str]) -> bool:
            return all(states.get(n, "").startswith("UP") for n in up or ()) and all(
                states.get(n, "").startswith("DOWN") for n in down or ()
            )

        return wait_until(
            lambda: self.haproxy.server_states(listener),
            timeout,
            lambda states: f"HAProxy's view of {listener}: {states}; wanted up={up} down={down}",
            done=agrees,
        )

    def query(self, sql: str, *params: object) -> list[tuple[object, ...]]:
        """Rows of one statement on the nodes' database (what they stored)."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as connection:
            cursor = connection.execute(sql.encode(), params or None)
            return cursor.fetchall() if cursor.description else []

    def logs(self) -> dict[str, str]:
        return {node.name: node.log_text() for node in self.nodes}

    def close(self) -> None:
        self.haproxy.stop()
        for node in self.nodes:
            if node.process is not None:
                node.process.stop()

    def __enter__(self) -> GatewayCluster:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
