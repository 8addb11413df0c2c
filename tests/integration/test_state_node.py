"""A real twistd gateway on the PostgreSQL backend: it checks the schema at
start, holds a process lease while it runs, reports it in /readyz and in
`gateway state status`, and gives it up when stopped."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.gateway_config import config_head
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.harness.postgres import PostgresCluster
from tests.helpers.state import state_toml
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.integration


def node_config(base: Path, own: TLSMaterial, admin_port: int, dsn: str) -> str:
    return "\n".join(
        [
            *config_head(base / "state", own),
            "[admin]",
            f'address = "127.0.0.1"\nport = {admin_port}',
            state_toml(dsn, node="gw-test", lease_time=6),
        ]
    )


def readyz(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def state_status(config: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(config), "--json", "state", "status"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_a_node_holds_its_lease_while_it_runs(
    tmp_path: Path, state_dsn: str, tls_gateway: TLSMaterial
) -> None:
    admin = free_port()
    with GatewayProcess(
        tmp_path, node_config(tmp_path, tls_gateway, admin, state_dsn), [admin]
    ) as gw:
        gw.wait_for_log("state backend postgresql: schema version")
        _, body = wait_until(
            lambda: readyz(admin), 10, lambda r: f"not ready: {r}", done=lambda r: r[0] == 200
        )
        assert body["checks"]["state_database"] == {"ok": True}  # type: ignore[index]
        processes = state_status(gw.config)["processes"]
        assert [(p["node"], p["alive"]) for p in processes] == [("gw-test", True)]  # type: ignore[index,union-attr]
    assert state_status(gw.config)["processes"] == []


def test_a_node_refuses_a_database_without_the_schema(
    tmp_path: Path, postgres: PostgresCluster, tls_gateway: TLSMaterial
) -> None:
    dsn = postgres.create_database()
    admin = free_port()
    gw = GatewayProcess(tmp_path, node_config(tmp_path, tls_gateway, admin, dsn), [admin])
    try:
        gw.start()  # it may bind its admin port before the check answers
    except RuntimeError as e:
        assert "gateway exited with 78" in str(e)
    else:
        assert gw.process is not None
        assert gw.process.wait(timeout=20) == 78
    finally:
        gw.stop()
    assert "run `gateway state migrate`" in gw.log_text()
