"""The PostgreSQL foundation against a real server: schema, thread pool, outages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pytest_twisted import ensureDeferred
from twisted.internet import reactor

from gateway.state.backend import StateService, open_state_backend
from gateway.state.database import Database, StateUnavailable
from gateway.state.schema import check, current_version, latest_version, migrations
from tests.harness.postgres import PostgresCluster
from tests.helpers.state import postgres_settings

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, dsn: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[state]\nbackend = "postgresql"\ndsn = "{dsn}"\n'
    )
    path.chmod(0o600)
    return path


def _gateway(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *argv], capture_output=True, text=True, check=False
    )


def test_migrate_creates_the_schema_once_and_status_reports_it(
    tmp_path: Path, postgres: PostgresCluster
) -> None:
    dsn = postgres.create_database()
    config = _config(tmp_path, dsn)
    status = _gateway("--config", str(config), "state", "status")
    assert status.returncode == 1 and "schema version: 0" in status.stdout
    first = _gateway("--config", str(config), "state", "migrate")
    assert first.returncode == 0, first.stderr
    assert f"schema version {latest_version()}" in first.stdout
    assert "applied 0001 processes" in first.stdout
    again = _gateway("--config", str(config), "state", "migrate")
    assert again.returncode == 0 and "up to date" in again.stdout
    rows = postgres.query(dsn, "SELECT version FROM gateway_schema ORDER BY version")
    assert [r[0] for r in rows] == [m.version for m in migrations()]
    status = _gateway("--config", str(config), "state", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"schema version: {latest_version()}" in status.stdout


def test_status_names_an_unreachable_database(tmp_path: Path) -> None:
    config = _config(tmp_path, "host=127.0.0.1 port=9 user=gw dbname=none connect_timeout=2")
    status = _gateway("--config", str(config), "state", "status")
    assert status.returncode == 1
    assert status.stderr.startswith("gateway state status: ")
    assert "Traceback" not in status.stderr


@ensureDeferred
async def test_work_runs_off_the_reactor_thread_in_one_transaction(state_dsn: str) -> None:
    import threading

    database = Database(postgres_settings(state_dsn), reactor)
    try:
        main = threading.get_ident()

        def work(connection: object) -> int:
            assert threading.get_ident() != main
            return check(connection)  # type: ignore[arg-type]

        assert await database.run(work) == latest_version()

        def fails_halfway(connection: object) -> None:
            connection.execute(
                "INSERT INTO gateway_processes (process, node, pid, lease_until)"  # type: ignore[attr-defined]
                " VALUES ('x', 'n', 1, now())"
            )
            raise ValueError("after the insert")

        with pytest.raises(ValueError):
            await database.run(fails_halfway)
        rows = await database.run(
            lambda c: c.execute("SELECT count(*) FROM gateway_processes").fetchone()
        )
        assert rows == (0,)
    finally:
        await database.stop()


@ensureDeferred
async def test_a_stopped_server_fails_fast_and_a_restarted_one_is_used_again() -> None:
    with PostgresCluster() as cluster:
        dsn = cluster.create_database()
        database = Database(postgres_settings(dsn, timeout=2.0), reactor)
        try:
            assert await database.run(lambda c: c.execute("SELECT 1").fetchone()) == (1,)
            cluster.stop("immediate")
            with pytest.raises(StateUnavailable):
                await database.run(lambda c: c.execute("SELECT 1").fetchone())
            cluster.start()
            # The same Database recovers: its pool reconnects on demand (a
            # try may still time out while the server finishes recovery).
            deadline = reactor.seconds() + 30
            while True:
                try:
                    row = await database.run(lambda c: c.execute("SELECT 2").fetchone())
                    break
                except StateUnavailable:
                    assert reactor.seconds() < deadline, "no recovery within 30 s"
            assert row == (2,)
        finally:
            await database.stop()


@ensureDeferred
async def test_the_service_holds_a_process_lease_and_gives_it_up(state_dsn: str) -> None:
    backend = open_state_backend(postgres_settings(state_dsn, lease_time=6.0), reactor)
    service = StateService(backend, reactor)
    service.startService()
    assert backend.database is not None
    try:
        await service.when_ready()

        def lease_rows() -> object:
            return backend.database.run(  # type: ignore[union-attr]
                lambda c: c.execute(
                    "SELECT process, lease_until > now() FROM gateway_processes"
                ).fetchall()
            )

        assert await lease_rows() == [(backend.identity.name, True)]
    finally:
        await service.stopService()
    database = Database(postgres_settings(state_dsn), reactor)
    try:
        rows = await database.run(
            lambda c: c.execute("SELECT count(*) FROM gateway_processes").fetchone()
        )
        assert rows == (0,)
        assert await database.run(current_version) == latest_version()
    finally:
        await database.stop()
