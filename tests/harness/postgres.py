"""A real, throwaway PostgreSQL 15 cluster on 127.0.0.1 for tests, benchmarks and the demo.

The PostgreSQL state backend is only worth something against the server it
will meet, so tests run Debian's packaged binaries (``initdb``, ``pg_ctl``)
from a temporary directory on a free loopback port, like the Dovecot harness.
``initdb`` and ``postgres`` refuse to run as root: as root (CI), the cluster
belongs to an unprivileged user (``pgtest``, created by scripts/ensure-deps.sh
or here) and the binaries run through ``runuser``.

The session's cluster is shared; each test takes a fresh database from it
(`create_database`). Tests that stop or crash the server start their own.
``fsync`` stays on: durability is what several tests check.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from types import TracebackType

from tests.harness.gateway_process import free_port

BIN_DIR = Path("/usr/lib/postgresql/15/bin")
TEST_USER = "pgtest"
SUPERUSER = "gw"


class PostgresError(RuntimeError):
    """The cluster did not start or stop; the text has pg_ctl's output and log."""


def _pg_binary(name: str) -> str:
    found = BIN_DIR / name
    if found.exists():
        return str(found)
    return shutil.which(name) or name


def _runas() -> list[str]:
    """The prefix that runs a PostgreSQL binary as a user it accepts."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", TEST_USER], check=True)
    return ["runuser", "-u", TEST_USER, "--"]


class PostgresCluster:
    """One cluster: `start()`, `dsn(database)`, `stop(mode)`, `start()` again."""

    def __init__(self) -> None:
        self.port = free_port()
        # Outside pytest's 0700 temporary root, which pgtest could not enter.
        self.base = Path(tempfile.mkdtemp(prefix="gw-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self._runas = _runas()
        if self._runas:
            user = pwd.getpwnam(TEST_USER)
            os.chown(self.base, user.pw_uid, user.pw_gid)
        self._initdb()
        self.running = False

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self._runas, *argv], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise PostgresError(f"{argv[0]} failed: {result.stdout}{result.stderr}\n{log}")
        return result

    def _initdb(self) -> None:
        self._run(
            _pg_binary("initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            SUPERUSER,
            "--no-instructions",
            "-E",
            "UTF8",
        )

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port}"
            f" -c unix_socket_directories={self.base} -c max_connections=200"
        )
        self._run(
            _pg_binary("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "30",
            "start",
            "-o",
            options,
        )
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """ "fast": a clean shutdown; "immediate": a crash (recovery at next start)."""
        if not self.running:
            return
        self._run(_pg_binary("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        self.running = False

    def dsn(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={database}"

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; its DSN."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def query(self, dsn: str, sql: str, *params: object) -> list[tuple[object, ...]]:
        """Rows of one statement, for tests that look at what the gateway stored."""
        import psycopg

        with psycopg.connect(dsn, autocommit=True) as connection:
            cursor = connection.execute(sql.encode(), params or None)
            return cursor.fetchall() if cursor.description else []

    def close(self) -> None:
        with contextlib.suppress(PostgresError):
            self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
