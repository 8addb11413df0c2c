"""`workers = N`: real twistd parents with real worker processes on one port.

Which worker served a session is read from the log: the parent writes every
worker's events with "worker N pid P" in the line's system field.
"""

from __future__ import annotations

import json
import os
import poplib
import re
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_config import config_head, listen, provider
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.helpers.pop3 import device
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.integration

WORKER_STARTED = re.compile(r"worker (\d+) of (\d+) started, pid (\d+)")
# The system field of a line a worker wrote: "[gateway.pop3#info worker 1 pid 1234]".
WORKER_LINE = re.compile(r"\[([\w.]+)#\w+ worker (\d+) pid (\d+)\] (.*)")


def config_text(
    state: Path,
    port: int,
    dovecot: Dovecot,
    upstream: TLSMaterial,
    own: TLSMaterial,
    *,
    workers: int,
    extra: tuple[str, ...] = (),
) -> str:
    return "\n".join(
        [
            f"workers = {workers}",
            *config_head(state, own),
            *listen("pop3", port, "implicit"),
            *provider(
                "dovecot", "pop3", dovecot.pop3s_port, "implicit", upstream.ca_file, timeout=5
            ),
            "[accounts.alice]",
            'provider = "dovecot"\nusername = "alice"\npassword = "alice-pw"',
            device("printer", "alice"),
            *extra,
        ]
    )


def started_workers(text: str) -> dict[int, int]:
    """Worker index -> pid of its latest start, from the log."""
    found: dict[int, int] = {}
    for match in WORKER_STARTED.finditer(text):
        found[int(match.group(1))] = int(match.group(3))
    return found


def wait_for_workers(gateway: GatewayProcess, count: int, timeout: float = 20.0) -> dict[int, int]:
    return wait_until(
        lambda: started_workers(gateway.log_text()),
        timeout,
        lambda found: f"{count} workers not started ({found}):\n{gateway.log_text()[-3000:]}",
        done=lambda found: len(found) == count,
    )


def pids_that_logged(text: str, needle: str) -> set[int]:
    return {int(match.group(3)) for match in WORKER_LINE.finditer(text) if needle in match.group(4)}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too; its parent (gone) has not reaped it yet.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Devices:
    def __init__(self, tls: TLSMaterial, port: int) -> None:
        self.context = ssl.create_default_context(cafile=str(tls.ca_file))
        self.port = port

    def session(self) -> int | None:
        """One full device session: the number of messages it saw, None for
        [IN-USE] (another session of the account was open at the time)."""
        client = poplib.POP3_SSL("localhost", self.port, context=self.context, timeout=20)
        try:
            client.user("printer")
            try:
                client.pass_("printer-pw")
            except poplib.error_proto as e:
                if b"[IN-USE]" in e.args[0]:
                    return None
                raise
            count, _size = client.stat()
        finally:
            client.quit()
        return count

    def sessions(self, count: int, parallel: int = 1) -> list[int | None]:
        if parallel == 1:
            return [self.session() for _ in range(count)]
        with ThreadPoolExecutor(parallel) as pool:
            return list(pool.map(lambda _: self.session(), range(count)))


@pytest.fixture
def devices(tls_gateway: TLSMaterial) -> Iterator[Devices]:
    yield Devices(tls_gateway, free_port())


def test_workers_share_one_port_reload_restart_and_stop(
    tmp_path: Path,
    clean_mailboxes: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    devices: Devices,
) -> None:
    dovecot = clean_mailboxes
    port = devices.port
    text = config_text(tmp_path / "state", port, dovecot, tls_upstream, tls_gateway, workers=3)
    with GatewayProcess(tmp_path / "gw", text, [port]) as gateway:
        assert gateway.process is not None
        parent = gateway.process.pid
        workers = wait_for_workers(gateway, 3)
        assert len(set(workers.values())) == 3 and parent not in workers.values()

        # Every worker serves: sessions in parallel until each pid logged one
        # (those that overlap get [IN-USE]: one account, one session at a time).
        def served() -> set[int]:
            assert set(devices.sessions(12, parallel=4)) <= {0, None}
            return pids_that_logged(gateway.log_text(), "pop3 session device=printer")

        seen = wait_until(
            served,
            60,
            lambda pids: f"sessions served by {pids}, workers {workers}",
            done=lambda pids: pids >= set(workers.values()),
        )
        assert seen == set(workers.values())

        # SIGHUP reaches every worker: each logs the new device and reads
        # the certificate again (a renewal reaches every worker).
        gateway.config.write_text(text + "\n" + device("copier", "alice"))
        gateway.process.send_signal(signal.SIGHUP)
        for needle in ("devices +copier", "tls certificate reloaded from"):
            wait_until(
                lambda needle=needle: pids_that_logged(gateway.log_text(), needle),
                15,
                lambda pids: (
                    f"reloaded in {pids}, workers {workers}:\n{gateway.log_text()[-3000:]}"
                ),
                done=lambda pids: pids == set(workers.values()),
            )

        # A worker killed with -9 is started again; the port serves throughout.
        os.kill(workers[1], signal.SIGKILL)
        assert devices.sessions(6) == [0] * 6
        restarted = wait_until(
            lambda: started_workers(gateway.log_text()),
            20,
            lambda found: f"worker 1 not restarted ({found}):\n{gateway.log_text()[-3000:]}",
            done=lambda found: found.get(1) not in (None, workers[1]),
        )
        assert restarted[0] == workers[0] and restarted[2] == workers[2]
        assert "worker 1 pid" in gateway.log_text() and "died after" in gateway.log_text()
        assert devices.sessions(6) == [0] * 6
        final = set(restarted.values())

    # Stopping the parent stopped every worker (none left orphaned).
    wait_until(
        lambda: [pid for pid in final if alive(pid)],
        15,
        lambda left: f"workers still running after stop: {left}",
        done=lambda left: not left,
    )
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_parent_killed_with_9_takes_its_workers_along(
    tmp_path: Path,
    clean_mailboxes: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    devices: Devices,
) -> None:
    text = config_text(
        tmp_path / "state", devices.port, clean_mailboxes, tls_upstream, tls_gateway, workers=2
    )
    with GatewayProcess(tmp_path / "gw", text, [devices.port]) as gateway:
        workers = wait_for_workers(gateway, 2)
        gateway.kill()
        wait_until(
            lambda: [pid for pid in workers.values() if alive(pid)],
            15,
            lambda left: f"orphaned workers still running: {left}",
            done=lambda left: not left,
        )


def pop3_sessions_counted(admin_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "gateway_sessions_total" and sample.labels.get("protocol") == "pop3"
        )
    )


def test_metrics_count_every_workers_sessions(
    tmp_path: Path,
    clean_mailboxes: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    devices: Devices,
) -> None:
    admin = free_port()
    text = config_text(
        tmp_path / "state",
        devices.port,
        clean_mailboxes,
        tls_upstream,
        tls_gateway,
        workers=2,
        extra=("[admin]", f'address = "127.0.0.1"\nport = {admin}', "[log]", 'format = "json"'),
    )

    def sessions_logged() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in gateway.log_text().splitlines() if line]
        return [line for line in lines if line["message"].startswith("pop3 session ")]

    with GatewayProcess(tmp_path / "gw", text, [devices.port, admin]) as gateway:
        wait_until(
            lambda: (devices.sessions(8, parallel=4), sessions_logged())[1],
            60,
            lambda logged: f"sessions not served by both workers:\n{logged}",
            done=lambda logged: {line["worker"] for line in logged} == {0, 1},
        )
        assert all(isinstance(line["worker_pid"], int) for line in sessions_logged())
        # Served by worker 0 (the admin listener's) and by worker 1: all counted
        # (the last session's line may follow its client's QUIT by a moment).
        wait_until(
            lambda: (pop3_sessions_counted(admin), len(sessions_logged())),
            10,
            lambda both: f"metrics count {both[0]} pop3 sessions, the log {both[1]}",
            done=lambda both: both[0] == both[1] >= 8,
        )


def test_a_worker_that_cannot_start_stops_the_gateway_with_status_1(
    tmp_path: Path,
    clean_mailboxes: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    devices: Devices,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    # Worker 0 runs the spool; a file where its directory goes stops it.
    (state / "spool").write_text("not a directory")
    smtp = free_port()
    text = config_text(
        state,
        devices.port,
        clean_mailboxes,
        tls_upstream,
        tls_gateway,
        workers=2,
        extra=tuple(listen("smtp", smtp, "implicit")),
    )
    gateway = GatewayProcess(tmp_path / "gw", text, [devices.port])
    gateway.start()
    try:
        assert gateway.process is not None
        assert gateway.process.wait(30) == 1
        log = gateway.log_text()
        assert "smtp spool cannot be used" in log
        assert "could not start" in log and "stopping the gateway" in log
    finally:
        gateway.stop()


def low_free_port() -> int:
    for port in range(700, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free port below 1024 to test privilege dropping with")


@pytest.mark.skipif(os.geteuid() != 0, reason="binding a port below 1024 needs root")
def test_twistd_with_uid_gid_binds_a_low_port_for_its_workers(
    tmp_path: Path,
    clean_mailboxes: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    port = low_free_port()
    # Somewhere the unprivileged user can read the config and key and write state.
    base = Path(
        subprocess.check_output(["mktemp", "-d", "/tmp/gw-workers-XXXXXX"]).decode().strip()
    )
    try:
        base.chmod(0o755)
        state = base / "state"
        state.mkdir()
        os.chown(state, nobody.pw_uid, nobody.pw_gid)
        own = TLSMaterial(
            **{
                name: _copy_readable(getattr(tls_gateway, name), base, nobody.pw_uid)
                for name in ("certificate", "private_key", "ca_file")
            }
        )
        upstream_ca = _copy_readable(tls_upstream.ca_file, base, nobody.pw_uid)
        text = "\n".join(
            [
                "workers = 2",
                *config_head(state, own),
                *listen("pop3", port, "implicit"),
                *provider("dovecot", "pop3", clean_mailboxes.pop3s_port, "implicit", upstream_ca),
                "[accounts.alice]",
                'provider = "dovecot"\nusername = "alice"\npassword = "alice-pw"',
                device("printer", "alice"),
            ]
        )
        gateway = GatewayProcess(
            base / "gw",
            text,
            [port],
            twistd_args=[f"--uid={nobody.pw_uid}", f"--gid={nobody.pw_gid}"],
            **readable_interpreter(nobody.pw_uid, nobody.pw_gid),
        )
        base.joinpath("gw").mkdir()
        base.joinpath("gw").chmod(0o777)
        with gateway:
            workers = wait_for_workers(gateway, 2)
            for pid in workers.values():
                assert os.stat(f"/proc/{pid}").st_uid == nobody.pw_uid
            assert Devices(tls_gateway, port).sessions(4) == [0] * 4
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


def readable_interpreter(uid: int, gid: int) -> dict[str, Any]:
    """twistd under an interpreter the unprivileged user may run too.

    The workers are started after twistd dropped privileges, so they run the
    interpreter as that user: a deployment's system-wide Python. The test's
    own may sit where that user cannot reach (a root-only pyenv), so take the
    system's of the same version with this one's packages, or fail."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    packages = sysconfig.get_paths()["purelib"]
    repo = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": os.pathsep.join([repo, packages])}
    for python in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        try:
            probe = subprocess.run(
                [python, "-c", "import twisted.scripts.twistd, gateway.workers.child"],
                user=uid,
                group=gid,
                env={**os.environ, **env},
                capture_output=True,
                check=False,
                cwd="/",
            )
        except OSError:
            continue
        if probe.returncode == 0:
            run = (
                "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
            )
            return {"twistd": [python, "-c", run], "env": env}
    pytest.fail(f"no {version} interpreter the unprivileged user can run with these packages")


def _copy_readable(source: Path, base: Path, uid: int) -> Path:
    target = base / f"{source.parent.name}-{source.name}"
    target.write_bytes(source.read_bytes())
    os.chown(target, uid, -1)
    target.chmod(0o600)
    return target
