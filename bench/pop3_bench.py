"""POP3 gateway vs Dovecot direct, both on implicit TLS, in one harness and one run.

    python bench/pop3_bench.py            # full run: 3 rounds A B A B ..., a few minutes
    python bench/pop3_bench.py --quick    # smoke run: 1 round, smaller sizes, < 60 s

One throwaway Dovecot serves both sides: "direct" is a device talking POP3S to
Dovecot itself, "gateway" is the same device talking POP3S to the real gateway
(`twistd -n gateway`), which logs in to that Dovecot over POP3S. Each
measurement alternates gateway, direct, gateway, direct, ... and the table
shows the median of each side, the ratio gateway/direct and the target.

Measured:
- RETR throughput: one session RETRs 20 x 1 MiB, another 2 x 50 MiB; only the
  RETR exchanges are timed (command sent to terminator received); every byte
  is compared with the expected wire form (CRLF, dot-stuffed, ".\\r\\n").
  MB/s counts 10^6 bytes of that wire form per second.
- Full sessions per second: TCP connect, full TLS handshake (no resumption),
  greeting, USER, PASS, STAT, UIDL, QUIT; sequential and with 16 and 64
  concurrent clients, each client its own device/account/mailbox (10 messages).
  Completions are counted in a window that opens after a warm-up.
- Memory: the gateway's VmRSS growth per idle authenticated session (its
  upstream session included) with 1,000 sessions open, on a fresh gateway; and
  the peak RSS (VmHWM, reset before each message) a 50 MiB RETR adds, also
  with a reader that stalls for 2 s.

The benchmark client uses raw `ssl` sockets with TCP_NODELAY, recv_into a
reused buffer and an end-of-buffer check for the terminator, so it is not the
bottleneck; for concurrency it calibrates threads against processes first and
uses the faster (both sides the same). Both sides use the same client TLS
context settings (verified chain and name, no session resumption) and
negotiate the same protocol and cipher (printed). Dovecot runs with its
high-performance process settings (see DOVECOT_FAST; --dovecot stock for the
harness defaults). Device passwords use default argon2 parameters, except for
the 1,000 devices of the memory test (cheap parameters: only their one-time
verification is cheaper). A second table shows the cores busy per party
during each run, and --profile runs py-spy on the gateway in extra runs.

These figures are reported, not asserted: benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import trustme  # noqa: E402
from argon2 import PasswordHasher  # noqa: E402

from bench.common import (  # noqa: E402
    BENCH_LIMITS,
    PeakRSS,
    POP3Client,
    ProtocolError,
    find_py_spy,
    hotspots,
    make_message,
    proc_status,
    record_profile,
    wire_form,
)
from tests.harness.certs import TLSMaterial, make_tls_material  # noqa: E402
from tests.harness.dovecot import Dovecot  # noqa: E402
from tests.harness.gateway_process import GatewayProcess, free_port  # noqa: E402

MB = 1_000_000
KIB = 1024
MIB = 1024 * 1024
SESSION_MESSAGES = 10
DEVICE_PASSWORD = "device-pw"
UPSTREAM_HOST = ["localhost"]  # --upstream-host
RESULTS = Path(__file__).resolve().with_name("results-pop3.json")

# Issue 14's targets: ratios to Dovecot direct in the same run.
TARGETS = {
    "retr_1m": ("RETR 20 x 1 MiB", "MB/s", 0.8),
    "retr_50m": ("RETR 2 x 50 MiB", "MB/s", 0.7),
    "sessions_seq": ("sessions/s, sequential", "1/s", 0.5),
    "sessions_c16": ("sessions/s, 16 clients", "1/s", 0.6),
    "sessions_c64": ("sessions/s, 64 clients", "1/s", 0.6),
}
# The gateway's own CPU (every process of it, workers included), per unit of work.
CPU_PER_SESSION_TARGET_MS = 2.0  # at 16 clients
CPU_PER_GB_TARGET_S = 3.5
BURST_SESSIONS = 5000
IDLE_SESSION_TARGET_KIB = 48
RETR_50M_RSS_TARGET_MIB = 5

# Room for 5,000 idle sessions: every session holds one pop3 process, and
# raised limits for processes and clients. Sections repeated after the
# harness's own are merged by Dovecot.
DOVECOT_LIMITS = """\
# Added by bench/pop3_bench.py: room for 5,000 concurrent sessions.
default_process_limit = 6000
default_client_limit = 12000
service pop3-login {
  process_limit = 6000
}
service pop3 {
  process_limit = 6000
}
"""
# "fast" (the default): Dovecot's documented high-performance mode for the
# login processes (each serves many clients; no fork per connection) and
# reused pop3 processes. On this 2-core machine that gives the direct figures
# the targets were set against (~200-265 sessions/s sequentially); the stock
# settings fork a login and a pop3 process per session (~55 sessions/s).
DOVECOT_FAST = """\
service pop3-login {
  service_count = 0
  process_min_avail = 2
}
service pop3 {
  service_count = 0
  process_min_avail = 4
}
"""
DOVECOT_PROFILES = {"fast": DOVECOT_LIMITS + DOVECOT_FAST, "stock": DOVECOT_LIMITS}


class BenchDovecot(Dovecot):
    """The test harness's Dovecot with settings appended to its dovecot.conf."""

    def __init__(self, *args: Any, extra_config: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra_config = extra_config

    def render_config(self) -> str:
        return super().render_config() + self.extra_config


# --------------------------------------------------------------------------
# The benchmark client


CONTEXTS: dict[str, ssl.SSLContext] = {}  # side -> client context
CA_FILES: dict[str, Path] = {}  # side -> CA file, for client worker processes


def client_context(ca_file: Path) -> ssl.SSLContext:
    # The same settings for both sides: verified chain and host name, default
    # protocol range (TLS 1.3 is negotiated with both), no session reuse.
    return ssl.create_default_context(cafile=str(ca_file))


class Client(POP3Client):
    """The benchmarks' POP3S client, with the TLS context of `side`."""

    def __init__(self, port: int, side: str, timeout: float = 60.0) -> None:
        super().__init__(port, CONTEXTS[side], timeout)


def full_session(port: int, side: str, user: str, password: str) -> None:
    client = Client(port, side)
    try:
        client.login(user, password)
        stat = client.command(b"STAT").split()
        if int(stat[1]) != SESSION_MESSAGES:
            raise ProtocolError(f"STAT says {stat[1]!r} messages")
        uidl = client.multi(b"UIDL")
        if uidl.count(b"\r\n") != SESSION_MESSAGES + 1:
            raise ProtocolError("UIDL listing has the wrong number of lines")
        client.command(b"QUIT")
    finally:
        client.close()


# --------------------------------------------------------------------------
# Session rates


# One client's result: ([(start, end) of each completed session], errors, first error)
LoopResult = tuple[list[tuple[float, float]], int, str | None]


def _session_loop(
    port: int, side: str, cred: tuple[str, str], start: float, end: float
) -> LoopResult:
    done: list[tuple[float, float]] = []
    errors = 0
    first_error = None
    delay = start - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    while (t0 := time.monotonic()) < end:
        try:
            full_session(port, side, *cred)
        except Exception as e:  # counted and reported, never fatal
            errors += 1
            first_error = first_error or f"{type(e).__name__}: {e}"
            time.sleep(0.01)
            continue
        done.append((t0, time.monotonic()))
    return done, errors, first_error


def _threads(
    port: int, side: str, creds: Sequence[tuple[str, str]], start: float, end: float
) -> list[LoopResult]:
    if len(creds) == 1:
        return [_session_loop(port, side, creds[0], start, end)]
    with ThreadPoolExecutor(len(creds)) as pool:
        futures = [pool.submit(_session_loop, port, side, c, start, end) for c in creds]
        return [f.result() for f in futures]


def _client_process(
    port: int,
    side: str,
    ca_file: str,
    creds: Sequence[tuple[str, str]],
    ready: Any,
    go: Any,
    times: Any,
    results: Any,
) -> None:
    """A client worker process: builds its own TLS context, reports ready,
    waits for the common start time, runs its clients as threads."""
    CONTEXTS[side] = client_context(Path(ca_file))
    ready.put(os.getpid())
    go.wait()
    results.put(_threads(port, side, creds, times[0], times[1]))


_MP: Any = None


def _multiprocessing() -> Any:
    """A forkserver context: workers fork from a clean single-threaded server
    that has imported this module, never from this process, whose threads and
    OpenSSL locks a fork could freeze in a locked state."""
    global _MP
    if _MP is None:
        _MP = get_context("forkserver")
        _MP.set_forkserver_preload(["__main__"])
    return _MP


def client_layout(mode: str, clients: int) -> tuple[int, int]:
    """(processes, threads per process) for a client mode."""
    if mode == "threads" or clients == 1:
        return 1, clients
    if mode == "procs":
        return clients, 1
    procs = min(clients, 4)  # "hybrid"
    return procs, clients // procs


def session_rate(
    port: int,
    side: str,
    creds: Sequence[tuple[str, str]],
    mode: str,
    warmup: float,
    window: float,
    meter: Callable[[], CpuMeter] | None = None,
) -> dict[str, Any]:
    """Sessions completed per second by len(creds) closed-loop clients, counted
    over ``window`` seconds after ``warmup``."""
    procs, per_proc = client_layout(mode, len(creds))
    groups = [creds[i * per_proc : (i + 1) * per_proc] for i in range(procs)]
    results: list[LoopResult] = []
    busy: dict[str, float] = {}
    watcher = None

    def watch_window(open_at: float, end: float) -> threading.Thread | None:
        if meter is None:
            return None

        def watch() -> None:
            time.sleep(max(0.0, open_at - time.monotonic()))
            running = meter()
            time.sleep(max(0.0, end - time.monotonic()))
            busy.update(running.stop())

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread

    if procs == 1:
        start = time.monotonic() + 0.02
        open_at, end = start + warmup, start + warmup + window
        watcher = watch_window(open_at, end)
        results = _threads(port, side, groups[0], start, end)
    else:
        mp = _multiprocessing()
        ready, done, go = mp.Queue(), mp.Queue(), mp.Event()
        times = mp.Array("d", 2)
        workers = [
            mp.Process(
                target=_client_process,
                args=(port, side, str(CA_FILES[side]), g, ready, go, times, done),
                daemon=True,
            )
            for g in groups
        ]
        for w in workers:
            w.start()
        for _ in workers:
            ready.get(timeout=120)
        start = time.monotonic() + 0.05
        open_at, end = start + warmup, start + warmup + window
        times[0], times[1] = start, end
        watcher = watch_window(open_at, end)
        go.set()
        for _ in workers:
            results.extend(done.get(timeout=warmup + window + 180))
        for w in workers:
            w.join(timeout=30)
    if watcher is not None:
        watcher.join()
    counted = [(s, e) for r in results for s, e in r[0] if open_at <= e < end]
    errors = sum(r[1] for r in results)
    first_error = next((r[2] for r in results if r[2]), None)
    latencies = sorted(e - s for s, e in counted)
    return {
        "rate": len(counted) / window,
        "sessions": len(counted),
        "errors": errors,
        "first_error": first_error,
        "median_latency_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        **({"cores_busy": busy} if busy else {}),
    }


# --------------------------------------------------------------------------
# Memory probes


_TICK = os.sysconf("SC_CLK_TCK")


def _process_table() -> dict[int, tuple[int, int, float, float]]:
    """pid -> (ppid, pgid, CPU seconds, CPU seconds of reaped children)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (
            int(fields[1]),
            int(fields[2]),
            (int(fields[11]) + int(fields[12])) / _TICK,
            (int(fields[13]) + int(fields[14])) / _TICK,
        )
    return table


class CpuMeter:
    """Cores kept busy by the gateway, Dovecot and the benchmark client during
    a run (CPU seconds / wall seconds); the machine has os.cpu_count() cores.
    "gateway" is the twistd process and its descendants (the worker processes).
    "client" is this process and its other descendants (client workers, the
    forkserver); "other" is the rest of the machine's busy time (/proc/stat):
    processes outside this benchmark and kernel work charged to no process."""

    def __init__(self, gateway_pids: set[int], dovecot_pgid: int, report_gateway: bool) -> None:
        self.gateway_pids = gateway_pids
        self.dovecot_pgid = dovecot_pgid
        self.report_gateway = report_gateway
        self.wall = time.monotonic()
        self.start = self._sample()

    def _sample(self) -> dict[str, float]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        table = _process_table()
        me = os.getpid()
        dovecot = gateway = client = 0.0
        for pid, (_ppid, pgid, cpu, reaped) in table.items():
            if pgid == self.dovecot_pgid:
                dovecot += cpu + (reaped if pid == pgid else 0.0)
            elif pid in self.gateway_pids or any(
                self._descends_from(pid, g, table) for g in self.gateway_pids
            ):
                # The twistd process, and its worker processes (`workers = N`).
                gateway += cpu
            elif pid != me and self._descends_from(pid, me, table):
                client += cpu
        own = resource.getrusage(resource.RUSAGE_SELF)
        client += own.ru_utime + own.ru_stime
        # user nice system idle iowait irq softirq steal ...
        return {
            "machine": (ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]) / _TICK,
            "steal": ticks[7] / _TICK,
            "dovecot": dovecot,
            "gateway": gateway,
            "client": client,
        }

    @staticmethod
    def _descends_from(
        pid: int, ancestor: int, table: dict[int, tuple[int, int, float, float]]
    ) -> bool:
        for _ in range(64):
            parent = table.get(pid, (0,))[0]
            if parent == ancestor:
                return True
            if parent <= 1:
                return False
            pid = parent
        return False

    def stop(self) -> dict[str, float]:
        end = self._sample()
        wall = time.monotonic() - self.wall
        busy = {k: (end[k] - self.start[k]) / wall for k in end}
        busy["other"] = max(
            0.0, busy["machine"] - busy["dovecot"] - busy["client"] - busy["gateway"]
        )
        if not self.report_gateway:
            del busy["gateway"]
        return busy


def process_group_pss(pgid: int) -> tuple[int, int]:
    """(number of processes, total PSS in bytes) of a process group."""
    count = total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pgid:
                continue
            with open(f"/proc/{entry}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * KIB
                        count += 1
                        break
        except (OSError, ValueError):
            continue
    return count, total


# --------------------------------------------------------------------------
# Profiling (optional: --profile DIR, needs py-spy)

# --------------------------------------------------------------------------
# Setup


@dataclass
class Setup:
    base: Path
    dovecot: BenchDovecot
    upstream_tls: TLSMaterial
    gateway_tls: TLSMaterial
    session_users: list[str]
    memory_users: list[str]
    retr_small: list[bytes]  # expected wire forms
    retr_large: list[bytes]


def user_password(user: str) -> str:
    return f"pw-{user}"


def raise_fd_limit(wanted: int = 65536) -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


def gateway_config(
    setup: Setup,
    state: Path,
    port: int,
    users: Sequence[str],
    password_hash: str,
    workers: int | None = None,
) -> str:
    lines = [
        *([f"workers = {workers}"] if workers else []),
        f'state_dir = "{state}"',
        "[tls]",
        f'certificate = "{setup.gateway_tls.certificate}"',
        f'private_key = "{setup.gateway_tls.private_key}"',
        "[pop3]",
        "idle_timeout = 600",
        "[[pop3.listen]]",
        f'address = "127.0.0.1"\nport = {port}\ntls = "implicit"',
        BENCH_LIMITS,
        "[providers.dovecot]",
        f'pop3 = {{ host = "{UPSTREAM_HOST[0]}", port = {setup.dovecot.pop3s_port}, '
        'tls = "implicit" }',
        f'ca_file = "{setup.upstream_tls.ca_file}"',
        "timeout = 60",
    ]
    for user in users:
        lines += [
            f"[accounts.acct-{user}]",
            f'provider = "dovecot"\nusername = "{user}"\npassword = "{user_password(user)}"',
            f"[devices.dev-{user}]",
            f'password_hash = "{password_hash}"\naccount = "acct-{user}"',
            'allow_from = ["127.0.0.0/8"]',
        ]
    return "\n".join(lines) + "\n"


def start_gateway(
    setup: Setup, name: str, users: Sequence[str], password_hash: str, workers: int | None = None
) -> tuple[GatewayProcess, int]:
    port = free_port()
    text = gateway_config(setup, setup.base / name / "state", port, users, password_hash, workers)
    gateway = GatewayProcess(setup.base / name, text, [port])
    gateway.start(timeout=60)
    return gateway, port


def device_cred(user: str) -> tuple[str, str]:
    return f"dev-{user}", DEVICE_PASSWORD


def direct_cred(user: str) -> tuple[str, str]:
    return user, user_password(user)


# --------------------------------------------------------------------------
# Running


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def log(text: str) -> None:
    print(text, flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick: bool = args.quick
        self.rounds = 1 if self.quick else args.rounds
        self.window = 1.0 if self.quick else args.window
        self.warmup = 0.3 if self.quick else 0.5
        self.idle_sessions = 100 if self.quick else args.idle_sessions
        # None: the configuration's default (one process); N: `workers = N`.
        self.workers: int | None = args.workers
        self.burst = 500 if self.quick else BURST_SESSIONS
        self.profile_clients: int = args.profile_clients
        self.key_type = trustme.KeyType.RSA if args.key_type == "rsa" else trustme.KeyType.ECDSA
        self.small = (5, 1 * MIB) if self.quick else (20, 1 * MIB)
        self.large = (1, 10 * MIB) if self.quick else (2, 50 * MIB)
        self.results: dict[str, Any] = {"rounds": {}, "info": {}}
        self.ports: dict[str, int] = {}
        self.gateway: GatewayProcess | None = None
        self.memory_gateway: GatewayProcess | None = None
        self.client_mode = args.client_mode
        self.client_modes: dict[int, str] = {}
        self.dovecot_profile = args.dovecot
        self.setup: Setup | None = None

    # -- setup --

    def prepare(self, base: Path) -> Setup:
        t0 = time.monotonic()
        upstream_tls = make_tls_material(base / "tls-upstream", key_type=self.key_type)
        gateway_tls = make_tls_material(base / "tls-gateway", key_type=self.key_type)
        session_users = [f"u{i:04d}" for i in range(64)]
        memory_users = [f"m{i:04d}" for i in range(self.idle_sessions)]
        users = [*session_users, *memory_users, "retr-small", "retr-large"]
        dovecot = BenchDovecot(
            base / "dovecot",
            {u: user_password(u) for u in users},
            tls=upstream_tls,
            extra_config=DOVECOT_PROFILES[self.dovecot_profile],
        )
        dovecot.start()
        for user in [*session_users, *memory_users]:
            for n in range(SESSION_MESSAGES):
                dovecot.deliver(user, make_message(n, 2000 + 300 * n))
        small = [make_message(1000 + i, self.small[1]) for i in range(self.small[0])]
        large = [make_message(2000 + i, self.large[1]) for i in range(self.large[0])]
        for m in small:
            dovecot.deliver("retr-small", m)
        for m in large:
            dovecot.deliver("retr-large", m)
        setup = Setup(
            base=base,
            dovecot=dovecot,
            upstream_tls=upstream_tls,
            gateway_tls=gateway_tls,
            session_users=session_users,
            memory_users=memory_users,
            retr_small=[wire_form(m) for m in small],
            retr_large=[wire_form(m) for m in large],
        )
        CA_FILES.update(direct=upstream_tls.ca_file, gateway=gateway_tls.ca_file)
        for side, ca_file in CA_FILES.items():
            CONTEXTS[side] = client_context(ca_file)
        assert dovecot.pop3s_port is not None
        self.ports["direct"] = dovecot.pop3s_port
        self.setup = setup
        log(f"setup: Dovecot up, {len(users)} mailboxes filled in {time.monotonic() - t0:.1f} s")
        return setup

    def start_perf_gateway(self, setup: Setup) -> None:
        t0 = time.monotonic()
        # Default argon2 parameters: the gateway checks each device's hash
        # once and then remembers the verified password.
        password_hash = PasswordHasher().hash(DEVICE_PASSWORD)
        users = [*setup.session_users, "retr-small", "retr-large"]
        self.gateway, self.ports["gateway"] = start_gateway(
            setup, "gw-perf", users, password_hash, self.workers
        )
        log(
            f"setup: gateway up (pid {self.gateway.process.pid}) in "  # type: ignore[union-attr]
            f"{time.monotonic() - t0:.1f} s"
        )

    def creds(self, side: str, users: Sequence[str]) -> list[tuple[str, str]]:
        return [device_cred(u) if side == "gateway" else direct_cred(u) for u in users]

    def warm_up(self, setup: Setup) -> None:
        """One session per mailbox on each side: Dovecot builds its indexes,
        the gateway verifies each device's argon2 hash once."""
        t0 = time.monotonic()
        for side in ("direct", "gateway"):
            creds = self.creds(side, setup.session_users)
            # With worker processes each worker checks a device's argon2 hash
            # once: passes enough that every worker has seen every device
            # (the kernel hands a connection to whichever worker accepts).
            workers = self.workers or 1 if side == "gateway" else 1
            passes = 1 if workers == 1 else 3 * workers * workers
            with ThreadPoolExecutor(4) as pool:
                for _ in range(passes):
                    list(pool.map(lambda c, s=side: full_session(self.ports[s], s, *c), creds))
            for user, expected in (("retr-small", setup.retr_small[:1]), ("retr-large", [])):
                client = Client(self.ports[side], side)
                client.login(*(device_cred(user) if side == "gateway" else direct_cred(user)))
                for i, exp in enumerate(expected, 1):
                    client.retr(i, exp)
                client.command(b"QUIT")
                client.close()
        # TLS details, to show both sides negotiate the same thing.
        for side in ("direct", "gateway"):
            client = Client(self.ports[side], side)
            self.results["info"][f"tls_{side}"] = [client.sock.version(), client.sock.cipher()[0]]
            client.ok()
            client.close()
        log(f"warm-up: sessions on every device in {time.monotonic() - t0:.1f} s")

    # -- measurements --

    def alternate(self, key: str, run: Callable[[str], dict[str, Any]]) -> None:
        rounds: dict[str, list[Any]] = {"gateway": [], "direct": []}
        for _ in range(self.rounds):
            for side in ("gateway", "direct"):
                meter = self.meter(side)
                result = run(side)
                result.setdefault("cores_busy", meter.stop())
                rounds[side].append(result)
        self.results["rounds"][key] = rounds
        g, d = (median([x["value"] for x in rounds[s]]) for s in ("gateway", "direct"))
        log(f"  {TARGETS[key][0]:<26} gateway {g:8.1f}  direct {d:8.1f}  ratio {g / d:.2f}")

    def retr_measure(self, key: str, user: str, expected: list[bytes]) -> None:
        def run(side: str) -> dict[str, Any]:
            client = Client(self.ports[side], side)
            client.login(*(device_cred(user) if side == "gateway" else direct_cred(user)))
            seconds = 0.0
            added: list[int] = []
            for i, exp in enumerate(expected, 1):
                probe = (
                    PeakRSS(self.gateway_pid) if side == "gateway" and self.one_process else None
                )
                t0 = time.perf_counter()
                client.retr(i, exp)
                seconds += time.perf_counter() - t0
                if probe is not None:
                    added.append(probe.added())
            client.command(b"QUIT")
            client.close()
            size = sum(len(e) for e in expected)
            return {
                "value": size / seconds / MB,
                "bytes": size,
                "seconds": seconds,
                "peak_rss_added": added,
            }

        self.alternate(key, run)

    def meter(self, side: str) -> CpuMeter:
        pids = {
            gw.process.pid
            for gw in (self.gateway, self.memory_gateway)
            if gw is not None and gw.process is not None
        }
        return CpuMeter(pids, self.dovecot_pgid, report_gateway=side == "gateway")

    @property
    def dovecot_pgid(self) -> int:
        assert self.setup is not None and self.setup.dovecot._process is not None
        return os.getpgid(self.setup.dovecot._process.pid)

    @property
    def one_process(self) -> bool:
        """Whether the gateway's RSS is one process's (not with worker processes)."""
        return not self.workers or self.workers == 1

    @property
    def gateway_pid(self) -> int:
        assert self.gateway is not None and self.gateway.process is not None
        return self.gateway.process.pid

    def calibrate_client(self, setup: Setup) -> None:
        """Threads vs processes for the concurrent clients, both sides, one run
        each; the mode with the higher sum wins (the same mode for both sides).
        Full mode calibrates 16 and 64 clients separately; --quick only 16."""
        if self.client_mode != "auto":
            self.client_modes = {16: self.client_mode, 64: self.client_mode}
            self.results["info"]["client_modes"] = self.client_modes
            return
        levels = (16,) if self.quick else (16, 64)
        window = self.window if self.quick else 2.0
        calibration: dict[str, Any] = {}
        for clients in levels:
            found: dict[str, dict[str, float]] = {}
            for mode in ("threads", "hybrid", "procs"):
                found[mode] = {}
                for side in ("direct", "gateway"):
                    creds = self.creds(side, setup.session_users[:clients])
                    r = session_rate(self.ports[side], side, creds, mode, self.warmup, window)
                    found[mode][side] = r["rate"]
            best = max(found, key=lambda m: found[m]["direct"] + found[m]["gateway"])
            self.client_modes[clients] = best if self.client_mode == "auto" else self.client_mode
            calibration[str(clients)] = {"sessions_per_s": found, "chosen": best}
            text = ", ".join(f"{m} {v['direct']:.0f}/{v['gateway']:.0f}" for m, v in found.items())
            log(
                f"client calibration ({clients} clients, sessions/s direct/gateway): {text}"
                f" -> {self.client_modes[clients]}"
            )
        if 64 not in self.client_modes:
            self.client_modes[64] = self.client_modes[16]
        self.results["info"]["client_calibration"] = calibration
        self.results["info"]["client_modes"] = self.client_modes

    def sessions_measure(self, key: str, setup: Setup, clients: int) -> None:
        def run(side: str) -> dict[str, Any]:
            r = session_rate(
                self.ports[side],
                side,
                self.creds(side, setup.session_users[:clients]),
                self.client_modes.get(clients, "threads"),
                self.warmup,
                self.window,
                meter=lambda: self.meter(side),
            )
            r["value"] = r.pop("rate")
            if r["errors"]:
                log(f"    {side}: {r['errors']} failed sessions, first: {r['first_error']}")
            return r

        self.alternate(key, run)

    def burst_measure(self, setup: Setup) -> None:
        """Gateway CPU per session at 16 clients before and after a burst of
        `self.burst` sessions at 64 clients: sessions that leave garbage (objects
        in reference cycles that only a full collection frees) make the
        collector's passes longer after every burst."""

        def cpu_per_session() -> dict[str, Any]:
            r = session_rate(
                self.ports["gateway"],
                "gateway",
                self.creds("gateway", setup.session_users[:16]),
                self.client_modes.get(16, "threads"),
                self.warmup,
                max(self.window, 3.0),
                meter=lambda: self.meter("gateway"),
            )
            r["cpu_ms_per_session"] = 1000 * r["cores_busy"]["gateway"] / max(r["rate"], 1e-9)
            return r

        before = cpu_per_session()
        t0 = time.monotonic()
        rounds = self.results["rounds"].get("sessions_c64", {}).get("gateway", [{}])
        rate = max(rounds[0].get("value", 200.0), 1.0)
        done = errors = 0
        while done < self.burst:  # windows until the burst is complete
            burst = session_rate(
                self.ports["gateway"],
                "gateway",
                self.creds("gateway", setup.session_users[:64]),
                self.client_modes.get(64, "threads"),
                0.0,
                max((self.burst - done) / rate, 0.5),
            )
            done, errors = done + burst["sessions"], errors + burst["errors"]
            if not burst["sessions"]:
                break  # nothing completes: the errors say why
        burst_seconds = time.monotonic() - t0
        after = cpu_per_session()
        self.results["burst"] = {
            "before": before,
            "burst_sessions": done,
            "burst_errors": errors,
            "burst_seconds": burst_seconds,
            "after": after,
            "ratio": after["cpu_ms_per_session"] / before["cpu_ms_per_session"],
        }
        log(
            f"  burst: {before['cpu_ms_per_session']:.2f} ms CPU/session before, "
            f"{done} sessions in {burst_seconds:.0f} s, "
            f"{after['cpu_ms_per_session']:.2f} ms after"
        )

    def profile(self, setup: Setup, out_dir: Path, py_spy: str) -> None:
        """py-spy on the gateway during extra, unmeasured gateway runs (py-spy
        slows the gateway down, so these runs are not part of the figures)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        seconds = 3.0 if self.quick else 8.0

        def retr_loop() -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                client = Client(self.ports["gateway"], "gateway")
                client.login(*device_cred("retr-small"))
                for i, exp in enumerate(setup.retr_small, 1):
                    client.retr(i, exp)
                client.command(b"QUIT")
                client.close()

        def sessions() -> None:
            creds = self.creds("gateway", setup.session_users[: self.profile_clients])
            session_rate(self.ports["gateway"], "gateway", creds, "threads", 0.0, seconds)

        report: dict[str, list[str]] = {}
        runs = (("retr_1m", retr_loop), (f"sessions_c{self.profile_clients}", sessions))
        for name, action in runs:
            target = out_dir / f"gateway-{name}.collapsed.txt"
            error = record_profile(
                py_spy, self.gateway_pid, target, action, subprocesses=not self.one_process
            )
            if error:
                log(f"  py-spy failed: {error}")
                continue
            report[name] = hotspots(target)
            log(f"profile of the gateway during {name} ({target}):")
            for line in report[name]:
                log("  " + line)
        self.results["profile"] = report

    def stalled_reader(self, setup: Setup) -> None:
        """50 MiB (10 in --quick) through the gateway to a device that stops
        reading for 2 s after 1 MiB: back-pressure must keep the gateway small."""
        client = Client(self.ports["gateway"], "gateway")
        client.login(*device_cred("retr-large"))
        during: list[int] = []
        probe = PeakRSS(self.gateway_pid)
        client.retr(
            1,
            setup.retr_large[0],
            pause_after=MIB,
            pause=2.0,
            on_pause=lambda: during.append(proc_status(self.gateway_pid, "VmRSS")),
        )
        added = probe.added()
        client.command(b"QUIT")
        client.close()
        self.results["stalled_reader"] = {
            "peak_rss_added": added,
            "rss_added_while_stalled": during[0] - probe.before if during else None,
        }
        log(f"  stalled reader: peak RSS +{added / MIB:.1f} MiB")

    def memory_measure(self, setup: Setup) -> None:
        """Fresh gateway; warm it up, then hold N idle authenticated sessions."""
        cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(DEVICE_PASSWORD)
        warm_users = setup.session_users[:16]
        users = [*warm_users, *setup.memory_users]
        t0 = time.monotonic()
        self.memory_gateway, port = start_gateway(setup, "gw-memory", users, cheap)
        assert self.memory_gateway.process is not None
        pid = self.memory_gateway.process.pid
        creds = [device_cred(u) for u in setup.memory_users]

        def open_idle(cred: tuple[str, str]) -> Client:
            client = Client(port, "gateway", timeout=120)
            try:
                client.login(*cred)
                client.command(b"STAT")
            except BaseException:
                client.close()
                raise
            return client

        def close_all(clients: list[Client]) -> None:
            def bye(c: Client) -> None:
                with contextlib.suppress(Exception):
                    c.command(b"QUIT")
                c.close()

            with ThreadPoolExecutor(32) as pool:
                list(pool.map(bye, clients))

        # Warm-up: sequential sessions and a burst of idle ones on other devices.
        for user in warm_users:
            full_session(port, "gateway", *device_cred(user))
        with ThreadPoolExecutor(16) as pool:
            close_all(list(pool.map(open_idle, [device_cred(u) for u in warm_users])))
        time.sleep(1.0)
        assert setup.dovecot._process is not None
        dovecot_pgid = os.getpgid(setup.dovecot._process.pid)
        base_rss = proc_status(pid, "VmRSS")
        base_procs, base_pss = process_group_pss(dovecot_pgid)

        cycles = []
        for cycle in range(1 if self.quick else 2):
            before = proc_status(pid, "VmRSS")
            opened: list[Client] = []
            failures: list[str] = []
            t_open = time.monotonic()
            with ThreadPoolExecutor(32) as pool:
                futures = [pool.submit(open_idle, c) for c in creds]
                for f in futures:
                    try:
                        opened.append(f.result())
                    except Exception as e:
                        failures.append(f"{type(e).__name__}: {e}")
            open_seconds = time.monotonic() - t_open
            time.sleep(2.0)
            rss = proc_status(pid, "VmRSS")
            procs, pss = process_group_pss(dovecot_pgid)
            n = len(opened)
            close_all(opened)
            time.sleep(2.0)
            after = proc_status(pid, "VmRSS")
            cycles.append(
                {
                    "sessions": n,
                    "failed": len(failures),
                    "first_failure": failures[0] if failures else None,
                    "open_seconds": open_seconds,
                    "gateway_rss_before": before,
                    "gateway_rss_with_sessions": rss,
                    "gateway_rss_after_close": after,
                    "gateway_rss_per_session": (rss - base_rss) / n if n else float("nan"),
                    "dovecot_processes": [base_procs, procs],
                    "dovecot_pss_per_session": (pss - base_pss) / n if n else None,
                }
            )
            log(
                f"  cycle {cycle + 1}: {n} idle sessions ({len(failures)} failed) opened in "
                f"{open_seconds:.1f} s: gateway RSS {before / MIB:.1f} -> {rss / MIB:.1f} MiB "
                f"({(rss - base_rss) / max(n, 1) / KIB:.1f} KiB/session over the warm base "
                f"{base_rss / MIB:.1f} MiB); after closing {after / MIB:.1f} MiB"
            )
            if failures:
                log(f"    first failure: {failures[0]}")
        self.results["memory"] = {
            **cycles[0],
            "cycles": cycles,
            "gateway_rss_base": base_rss,
            "password_hashes": "argon2id t=1 m=1024 p=1 (only the one-time check is cheaper)",
            "setup_and_run_seconds": time.monotonic() - t0,
        }
        self.memory_gateway.stop()

    # -- report --

    def report(self) -> list[str]:
        rows: list[tuple[str, ...]] = []
        summary: dict[str, Any] = {}
        for key, (label, unit, target) in TARGETS.items():
            rounds = self.results["rounds"].get(key)
            if not rounds:
                continue
            g = median([r["value"] for r in rounds["gateway"]])
            d = median([r["value"] for r in rounds["direct"]])
            ratio = g / d if d else float("nan")
            ok = ratio >= target
            summary[key] = {"gateway": g, "direct": d, "ratio": ratio, "target": target, "pass": ok}
            rows.append(
                (
                    f"{label} ({unit})",
                    f"{g:.1f}",
                    f"{d:.1f}",
                    f"{ratio:.2f}",
                    f">= {target:.1f}x",
                    "PASS" if ok else "MISS",
                )
            )
        rows += self._cpu_rows(summary)
        large = self.results["rounds"].get("retr_50m", {}).get("gateway", [])
        peaks = [p for r in large for p in r["peak_rss_added"]]
        if peaks:
            worst = max(peaks) / MIB
            ok = worst < RETR_50M_RSS_TARGET_MIB
            size = self.large[1] // MIB
            summary["retr_50m_rss"] = {
                "peak_added_mib": worst,
                "all_mib": [p / MIB for p in peaks],
                "target_mib": RETR_50M_RSS_TARGET_MIB,
                "pass": ok,
            }
            rows.append(
                (
                    f"peak RSS added by a {size} MiB RETR (MiB, worst)",
                    f"{worst:.2f}",
                    "",
                    "",
                    f"< {RETR_50M_RSS_TARGET_MIB} MiB",
                    "PASS" if ok else "MISS",
                )
            )
        stalled = self.results.get("stalled_reader")
        if stalled:
            rows.append(
                (
                    "  same, reader stalled 2 s after 1 MiB (MiB)",
                    f"{stalled['peak_rss_added'] / MIB:.2f}",
                    "",
                    "",
                    "(info)",
                    "",
                )
            )
        memory = self.results.get("memory")
        if memory:
            per = memory["gateway_rss_per_session"] / KIB
            ok = per <= IDLE_SESSION_TARGET_KIB and not memory["failed"]
            summary["idle_session_rss"] = {
                "kib_per_session": per,
                "sessions": memory["sessions"],
                "target_kib": IDLE_SESSION_TARGET_KIB,
                "pass": ok,
            }
            dovecot = memory["dovecot_pss_per_session"]
            rows.append(
                (
                    f"RSS per idle session at {memory['sessions']} (KiB)",
                    f"{per:.1f}",
                    f"{dovecot / KIB:.0f}" if dovecot else "",
                    "",
                    f"<= {IDLE_SESSION_TARGET_KIB} KiB",
                    "PASS" if ok else "MISS",
                )
            )
        self.results["summary"] = summary
        lines = format_table(("metric", "gateway", "direct", "ratio", "target", "result"), rows)
        cpu_rows = []
        for key, (label, _unit, _target) in TARGETS.items():
            rounds = self.results["rounds"].get(key)
            if not rounds:
                continue

            def busy(side: str, who: str, rounds: dict[str, Any] = rounds) -> str:
                return f"{median([r['cores_busy'][who] for r in rounds[side]]):.2f}"

            cpu_rows.append(
                (
                    label,
                    busy("gateway", "gateway"),
                    busy("gateway", "dovecot"),
                    busy("gateway", "client"),
                    busy("gateway", "other"),
                    busy("gateway", "steal"),
                    "| " + busy("direct", "dovecot"),
                    busy("direct", "client"),
                    busy("direct", "other"),
                    busy("direct", "steal"),
                )
            )
        others = [
            r["cores_busy"]["other"] + r["cores_busy"]["steal"]
            for rounds in self.results["rounds"].values()
            for side in rounds.values()
            for r in side
        ]
        self.results["info"]["max_other_plus_steal_cores"] = max(others, default=0.0)
        if cpu_rows:
            lines += [
                "",
                f"cores busy during the runs (median; {os.cpu_count()} cores): "
                "gateway runs | direct runs",
            ]
            lines += format_table(
                (
                    "metric",
                    "gateway",
                    "dovecot",
                    "client",
                    "other",
                    "steal",
                    "| dovecot",
                    "client",
                    "other",
                    "steal",
                ),
                cpu_rows,
            )
        return lines

    def _cpu_rows(self, summary: dict[str, Any]) -> list[tuple[str, ...]]:
        """The gateway's own CPU per unit of work (all its processes), against
        issue 14's targets: steadier than rates on a shared machine."""
        rows: list[tuple[str, ...]] = []

        def gateway_cpu(key: str, per: Callable[[dict[str, Any]], float]) -> float | None:
            runs = self.results["rounds"].get(key, {}).get("gateway", [])
            values = [per(r) for r in runs if r.get("value")]
            return median(values) if values else None

        for key in ("sessions_seq", "sessions_c16", "sessions_c64"):
            ms = gateway_cpu(key, lambda r: 1000 * r["cores_busy"]["gateway"] / r["value"])
            if ms is None:
                continue
            target = CPU_PER_SESSION_TARGET_MS if key == "sessions_c16" else None
            ok = target is None or ms <= target
            summary[f"cpu_ms_per_session_{key}"] = {"ms": ms, "target": target, "pass": ok}
            rows.append(
                (
                    f"  gateway CPU per session, {TARGETS[key][0].split(', ')[1]} (ms)",
                    f"{ms:.2f}",
                    "",
                    "",
                    f"<= {target:.1f} ms" if target else "(info)",
                    ("PASS" if ok else "MISS") if target else "",
                )
            )
        for key in ("retr_1m", "retr_50m"):
            per_gb = gateway_cpu(key, lambda r: 1000 * r["cores_busy"]["gateway"] / r["value"])
            if per_gb is None:
                continue
            ok = per_gb <= CPU_PER_GB_TARGET_S
            summary[f"cpu_s_per_gb_{key}"] = {
                "s": per_gb,
                "target": CPU_PER_GB_TARGET_S,
                "pass": ok,
            }
            rows.append(
                (
                    f"  gateway CPU per GB, {TARGETS[key][0]} (s)",
                    f"{per_gb:.2f}",
                    "",
                    "",
                    f"<= {CPU_PER_GB_TARGET_S:.1f} s",
                    "PASS" if ok else "MISS",
                )
            )
        burst = self.results.get("burst")
        if burst:
            ok = burst["ratio"] <= 1.1
            summary["burst"] = {"ratio": burst["ratio"], "pass": ok}
            rows.append(
                (
                    f"CPU/session at 16 clients after {burst['burst_sessions']} sessions "
                    "/ before (ratio)",
                    f"{burst['ratio']:.2f}",
                    "",
                    "",
                    "about 1 (<= 1.1)",
                    "PASS" if ok else "MISS",
                )
            )
        return rows


def format_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for i, row in enumerate([header, *rows]):
        lines.append(
            "  ".join(
                str(c).ljust(widths[j]) if j == 0 else str(c).rjust(widths[j])
                for j, c in enumerate(row)
            )
        )
        if i == 0:
            lines.append("-" * len(lines[0]))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, small sizes (smoke run)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side (full mode)")
    parser.add_argument(
        "--window",
        type=float,
        default=3.0,
        help="seconds each session-rate run is counted (full mode)",
    )
    parser.add_argument(
        "--client-mode",
        choices=("auto", "threads", "hybrid", "procs"),
        default="auto",
        help="how concurrent clients run (default: calibrate)",
    )
    parser.add_argument(
        "--dovecot",
        choices=sorted(DOVECOT_PROFILES),
        default="fast",
        help="Dovecot process settings (default: fast, see DOVECOT_FAST)",
    )
    parser.add_argument(
        "--key-type",
        choices=("rsa", "ecdsa"),
        default="rsa",
        help="certificate keys of the gateway and of Dovecot (default: RSA-2048, as the "
        "figures issue 14 was measured with; ecdsa: P-256, what the README recommends)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--only", default="", help="comma list of: retr,sessions,burst,memory (default: all)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="`workers = N` in the measured gateway's configuration (default: not set, "
        "the default of one process); the memory test always runs one process",
    )
    parser.add_argument(
        "--idle-sessions",
        type=int,
        default=5000,
        help="idle authenticated sessions held for the memory test (full mode)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after measuring, profile the gateway with py-spy during extra runs; "
        "collapsed stacks go to DIR",
    )
    parser.add_argument("--py-spy", help="path of the py-spy binary (default: on PATH)")
    parser.add_argument(
        "--profile-clients", type=int, default=16, help="concurrent clients while profiling"
    )
    parser.add_argument(
        "--upstream-host",
        default="localhost",
        help="host name the gateway's provider entry uses for Dovecot (default: localhost; "
        "127.0.0.1 skips the gateway's name resolution)",
    )
    args = parser.parse_args(argv)
    UPSTREAM_HOST[0] = args.upstream_host
    only = set(filter(None, args.only.split(","))) or {"retr", "sessions", "burst", "memory"}

    started = time.monotonic()
    fd_limit = raise_fd_limit()
    base = Path(tempfile.mkdtemp(prefix="pop3bench-", dir="/tmp"))
    bench = Bench(args)
    bench.results["info"].update(
        {
            "mode": "quick" if args.quick else "full",
            "rounds_per_side": bench.rounds,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION,
            "fd_limit": fd_limit,
            "dovecot_profile": args.dovecot,
            "key_type": args.key_type,
            "workers": args.workers or "default (1)",
            "upstream_host": args.upstream_host,
            "loadavg_before": os.getloadavg(),
            "session_window_s": bench.window,
            "units": "MB = 10^6 bytes of RETR wire data; sessions per second",
        }
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    setup: Setup | None = None
    try:
        setup = bench.prepare(base)
        bench.start_perf_gateway(setup)
        bench.warm_up(setup)
        if only & {"sessions", "burst"}:
            bench.calibrate_client(setup)
        log(f"measuring, {bench.rounds} round(s) per side, alternating gateway/direct")
        if "retr" in only:
            n, size = bench.small
            TARGETS["retr_1m"] = (f"RETR {n} x {size // MIB} MiB", *TARGETS["retr_1m"][1:])
            n, size = bench.large
            TARGETS["retr_50m"] = (f"RETR {n} x {size // MIB} MiB", *TARGETS["retr_50m"][1:])
            bench.retr_measure("retr_1m", "retr-small", setup.retr_small)
            bench.retr_measure("retr_50m", "retr-large", setup.retr_large)
            if bench.one_process:
                bench.stalled_reader(setup)
        if "sessions" in only:
            bench.sessions_measure("sessions_seq", setup, 1)
            bench.sessions_measure("sessions_c16", setup, 16)
            bench.sessions_measure("sessions_c64", setup, 64)
        if "burst" in only:
            bench.burst_measure(setup)
        if args.profile:
            py_spy = find_py_spy(args.py_spy)
            if py_spy is None:
                log("--profile: py-spy not found (pip install py-spy, or pass --py-spy)")
            else:
                bench.profile(setup, args.profile, py_spy)
        if bench.gateway is not None:
            bench.results["info"]["gateway_rss_after_perf_runs"] = proc_status(
                bench.gateway_pid, "VmRSS"
            )
            bench.gateway.stop()
        if "memory" in only:
            bench.memory_measure(setup)
    except BaseException:
        for gw in (bench.gateway, bench.memory_gateway):
            if gw is not None:
                print("--- gateway log tail ---\n" + gw.log_text()[-3000:], file=sys.stderr)
        raise
    finally:
        for gw in (bench.gateway, bench.memory_gateway):
            if gw is not None:
                gw.stop()
        if setup is not None:
            setup.dovecot.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)

    elapsed = time.monotonic() - started
    bench.results["info"]["elapsed_s"] = elapsed
    bench.results["info"]["loadavg_after"] = os.getloadavg()
    tls = bench.results["info"].get("tls_gateway"), bench.results["info"].get("tls_direct")
    lines = [
        "",
        f"POP3 gateway vs Dovecot direct, implicit TLS (gateway {tls[0]}, direct {tls[1]}), "
        f"{bench.rounds} round(s) per side alternating, medians; concurrent clients as "
        + ", ".join(f"{n}: {m}" for n, m in bench.client_modes.items()),
        *bench.report(),
        "(direct column of the RSS row: Dovecot's PSS per session, for comparison; "
        '"other" = CPU used by processes outside this benchmark and unattributed kernel work; '
        '"steal" = vCPU time the hypervisor gave to other guests)',
        f"total {elapsed:.0f} s; details in {args.output}",
    ]
    busy_elsewhere = bench.results["info"].get("max_other_plus_steal_cores", 0.0)
    if busy_elsewhere > 0.3:
        lines.append(
            f"WARNING: in some run up to {busy_elsewhere:.2f} of the {os.cpu_count()} cores went "
            "to other work or were stolen by the hypervisor; rerun for trustworthy figures"
        )
    print("\n".join(lines))
    args.output.write_text(json.dumps(bench.results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
