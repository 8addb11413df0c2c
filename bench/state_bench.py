"""State backends and processes: POP3 sessions/s and SMTP intake/s for 1, 2 and 4
gateway processes, embedded vs PostgreSQL, against Dovecot direct, in one run.

    python bench/state_bench.py            # 3 rounds, 3 s windows (a few minutes)
    python bench/state_bench.py --quick    # 1 round, 1 s windows (smoke run, < 2 min)

What "N gateway processes" means depends on what the gateway has:

- with worker processes (`workers = N` in the config, issue 14): one node, N
  workers on the same listeners, for both backends;
- without them: N separate `twistd` nodes on different ports sharing one
  PostgreSQL database behind a real HAProxy (`balance roundrobin`,
  `send-proxy-v2`, the nodes' listeners with `proxy_protocol = true`). The
  embedded backend cannot be shared between nodes, so it runs as 1 process
  only. One PostgreSQL node is measured twice: directly (the like-for-like
  comparison with the embedded backend) and through HAProxy (the base the 2-
  and 4-node figures scale from).

Measured, every configuration once per round, rounds alternating through all
of them (Dovecot direct included), medians shown:

- full POP3 sessions/s with 16 concurrent clients (connect, full TLS
  handshake, USER/PASS, STAT, UIDL, QUIT; bench/pop3_bench.py's client and
  `session_rate`), each client its own device and mailbox, so every session
  takes and releases its mailbox lock (a row in PostgreSQL, a file lock in
  the embedded backend); gateway CPU per session (all its processes);
- SMTP messages/s accepted (`250`: spooled and fsynced) for 10 KiB messages,
  8 client sessions (STARTTLS, AUTH) for an account whose upstream never
  answers, so the relay spends nothing (bench/smtp_bench.py's "intake");
  "direct" is Dovecot's submission service, which answers only after relaying
  to a sink: a bound on the upstream, not the same work;
- the CPU PostgreSQL adds: gateway CPU per POP3 session and per SMTP message,
  PostgreSQL minus embedded, 1 process each, connected directly: the median
  of the differences of neighbouring runs (each round's, then --cpu-pairs
  extra pairs of those two alone); the PostgreSQL server's own CPU per
  session is shown beside it.

Everything (clients, gateways, Dovecot, PostgreSQL, HAProxy) shares the 2-core
machine, and other work may too (the "other" cores column): compare ratios
within one run, not absolute figures across runs. Reported, not asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    DEVICE_PASSWORD,
    device_password_hash,
    discarding_sink,
    log,
    make_message,
    run_info,
)
from bench.pop3_bench import (  # noqa: E402
    CA_FILES,
    CONTEXTS,
    DOVECOT_PROFILES,
    SESSION_MESSAGES,
    BenchDovecot,
    CpuMeter,
    Setup,
    _process_table,
    client_context,
    device_cred,
    direct_cred,
    format_table,
    gateway_config,
    raise_fd_limit,
    session_rate,
    user_password,
)
from bench.smtp_bench import ACCOUNT, process_cpu, submit_batch  # noqa: E402
from gateway.model import Config  # noqa: E402
from tests.harness.certs import make_tls_material  # noqa: E402
from tests.harness.gateway_process import GatewayProcess, free_port  # noqa: E402
from tests.harness.haproxy import Balanced, HAProxy, Server  # noqa: E402
from tests.harness.postgres import PostgresCluster  # noqa: E402
from tests.helpers.state import migrated_database, state_toml  # noqa: E402

KIB = 1024
RESULTS = Path(__file__).resolve().with_name("results-state.json")
POP3_CLIENTS = 16
SMTP_CLIENTS = 8
SMTP_SIZE = 10 * KIB
SMTP_USER = ACCOUNT  # submit_batch sends from it; the gateway checks the sender
INTAKE_DEVICE = "bench-intake"
TARGET_POP3_EXTRA_CPU_MS = 1.0
TARGET_SMTP_PER_S = 200.0
PROCESS_COUNTS = (1, 2, 4)
HAS_WORKERS = "workers" in {f.name for f in dataclasses.fields(Config)}


# -- who uses the CPU ------------------------------------------------------------------


def descendants(roots: Sequence[int]) -> set[int]:
    """The processes of `roots` and all their descendants (a node's workers)."""
    table = _process_table()
    found = {pid for pid in roots if pid in table}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, *_rest) in table.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


class Postgres(PostgresCluster):
    """The harness's cluster, plus the CPU its server processes used so far."""

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def cpu(self) -> float:
        """CPU seconds of the postmaster, its live backends and its reaped ones."""
        table = _process_table()
        root = self.postmaster_pid()
        total = 0.0
        for pid, (ppid, _pgid, cpu, reaped) in table.items():
            if pid == root:
                total += cpu + reaped
            elif ppid == root:
                total += cpu
        return total


class StateMeter(CpuMeter):
    """pop3_bench's CpuMeter, with PostgreSQL's and HAProxy's cores apart:
    HAProxy is this process's child and would count as "client", PostgreSQL
    as "other"."""

    def __init__(
        self,
        gateway_pids: set[int],
        dovecot_pgid: int,
        postgres: Postgres,
        haproxy_pid: int | None,
    ) -> None:
        self.postgres = postgres
        self.haproxy_pid = haproxy_pid
        super().__init__(gateway_pids, dovecot_pgid, report_gateway=True)

    def _sample(self) -> dict[str, float]:
        sample = super()._sample()
        sample["postgres"] = self.postgres.cpu()
        haproxy = process_cpu(self.haproxy_pid) if self.haproxy_pid else 0.0
        sample["haproxy"] = haproxy
        # Client processes of a finished run die between two samples: count
        # what the processes that reaped them were charged (forkserver, this
        # process), or the client's CPU would shrink and "other" grow.
        table = _process_table()
        me = os.getpid()
        reaped = sum(
            cpu_reaped
            for pid, (_ppid, pgid, _cpu, cpu_reaped) in table.items()
            if pid not in self.gateway_pids
            and pgid != self.dovecot_pgid
            and self._descends_from(pid, me, table)
        )
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        sample["client"] += reaped + children.ru_utime + children.ru_stime - haproxy
        return sample

    def stop(self) -> dict[str, float]:
        busy = super().stop()
        busy["other"] = max(
            0.0,
            busy["machine"]
            - sum(busy[k] for k in ("dovecot", "client", "gateway", "postgres", "haproxy")),
        )
        return busy


# -- the configurations --------------------------------------------------------------------


@dataclass
class Node:
    process: GatewayProcess
    pop3_port: int
    smtp_port: int
    pop3_proxy_port: int | None = None
    smtp_proxy_port: int | None = None

    @property
    def pid(self) -> int:
        assert self.process.process is not None
        return self.process.process.pid

    def behind_haproxy(self, name: str, kind: str) -> Server:
        """This node as HAProxy's server `name` for its `kind` ("pop3", "smtp")
        PROXY-protocol listener."""
        port = self.pop3_proxy_port if kind == "pop3" else self.smtp_proxy_port
        assert port is not None, "the node was started without proxied listeners"
        return Server(name, port)


@dataclass
class Target:
    """One thing measured: Dovecot direct, or the gateway in one configuration."""

    name: str
    backend: str  # "dovecot" | "embedded" | "postgresql"
    processes: int
    route: str  # how clients reach it: "direct" | "haproxy" | "workers"
    pop3_port: int
    smtp_port: int
    nodes: list[Node] = field(default_factory=list)

    @property
    def side(self) -> str:
        return "direct" if self.backend == "dovecot" else "gateway"

    def gateway_pids(self) -> set[int]:
        return descendants([node.pid for node in self.nodes])


def listener(kind: str, port: int, tls: str, proxy: bool) -> str:
    return f'[[{kind}.listen]]\naddress = "127.0.0.1"\nport = {port}\ntls = "{tls}"\n' + (
        "proxy_protocol = true\n" if proxy else ""
    )


# -- the benchmark -----------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.rounds = 1 if self.quick else args.rounds
        self.window = 1.0 if self.quick else args.window
        self.warmup = 0.3 if self.quick else 0.5
        self.smtp_per_client = 15 if self.quick else args.smtp_messages // SMTP_CLIENTS
        self.base = Path(tempfile.mkdtemp(prefix="state-bench-", dir="/tmp"))
        self.users = [f"u{i:04d}" for i in range(POP3_CLIENTS)]
        self.dovecot: BenchDovecot | None = None
        self.postgres: Postgres | None = None
        self.haproxy: HAProxy | None = None
        self.sink: subprocess.Popen[bytes] | None = None
        self.black_hole = socket.socket()
        self.black_hole.bind(("127.0.0.1", 0))
        self.black_hole.listen(1024)
        self.gateways: list[GatewayProcess] = []
        self.targets: list[Target] = []
        self.pool = ProcessPoolExecutor(max_workers=SMTP_CLIENTS)
        self.results: dict[str, Any] = {"info": run_info(self.quick, self.rounds)}

    # -- set-up --

    def start(self) -> None:
        t0 = time.monotonic()
        upstream_tls = make_tls_material(self.base / "tls-upstream")
        gateway_tls = make_tls_material(self.base / "tls-gateway")
        self.sink, sink_port = discarding_sink(self.base / "sink")
        passwords = {u: user_password(u) for u in self.users}
        passwords[SMTP_USER] = user_password(SMTP_USER)
        self.dovecot = BenchDovecot(
            self.base / "dovecot",
            passwords,
            tls=upstream_tls,
            submission_relay_port=sink_port,
            extra_config=DOVECOT_PROFILES["fast"],
        )
        self.dovecot.start()
        for user in self.users:
            for n in range(SESSION_MESSAGES):
                self.dovecot.deliver(user, make_message(n, 2000 + 300 * n))
        self.setup = Setup(
            self.base, self.dovecot, upstream_tls, gateway_tls, self.users, [], [], []
        )
        CA_FILES.update(direct=upstream_tls.ca_file, gateway=gateway_tls.ca_file)
        for side, ca_file in CA_FILES.items():
            CONTEXTS[side] = client_context(ca_file)
        self.postgres = Postgres()
        self.postgres.start()
        dsn = migrated_database(self.postgres)
        log(f"setup: Dovecot and PostgreSQL up in {time.monotonic() - t0:.1f} s")

        assert self.dovecot.pop3s_port is not None and self.dovecot.submission_port is not None
        self.targets.append(
            Target(
                "dovecot direct",
                "dovecot",
                1,
                "direct",
                self.dovecot.pop3s_port,
                self.dovecot.submission_port,
            )
        )
        if HAS_WORKERS:
            for backend in ("embedded", "postgresql"):
                for n in PROCESS_COUNTS:
                    node = self.start_node(f"{backend}-w{n}", backend, dsn, workers=n)
                    self.targets.append(
                        Target(
                            f"{backend}, {n} worker(s)",
                            backend,
                            n,
                            "workers",
                            node.pop3_port,
                            node.smtp_port,
                            [node],
                        )
                    )
        else:
            node = self.start_node("embedded", "embedded", dsn)
            self.targets.append(
                Target(
                    "embedded, 1 process",
                    "embedded",
                    1,
                    "direct",
                    node.pop3_port,
                    node.smtp_port,
                    [node],
                )
            )
            nodes = [
                self.start_node(f"node{i}", "postgresql", dsn, proxied=True)
                for i in range(1, max(PROCESS_COUNTS) + 1)
            ]
            # Round robin over the first n nodes, no health checks (no node
            # fails here): HAProxy's cores are counted apart (StateMeter).
            balanced = [
                Balanced(
                    f"{kind}_{n}",
                    [each.behind_haproxy(f"node{i}", kind) for i, each in enumerate(nodes[:n], 1)],
                )
                for n in PROCESS_COUNTS
                for kind in ("pop3", "smtp")
            ]
            self.haproxy = HAProxy(self.base / "haproxy", [], balanced=balanced, maxconn=2000)
            self.haproxy.start()
            self.targets.append(
                Target(
                    "postgresql, 1 node",
                    "postgresql",
                    1,
                    "direct",
                    nodes[0].pop3_port,
                    nodes[0].smtp_port,
                    nodes[:1],
                )
            )
            for n in PROCESS_COUNTS:
                self.targets.append(
                    Target(
                        f"postgresql, {n} node(s) via HAProxy",
                        "postgresql",
                        n,
                        "haproxy",
                        self.haproxy.port(f"pop3_{n}"),
                        self.haproxy.port(f"smtp_{n}"),
                        nodes[:n],
                    )
                )
        log(f"setup: {len(self.gateways)} gateway process(es) up in {time.monotonic() - t0:.1f} s")

    def start_node(
        self, name: str, backend: str, dsn: str, *, workers: int = 1, proxied: bool = False
    ) -> Node:
        pop3_port, smtp_port = free_port(), free_port()
        text = gateway_config(
            self.setup, self.base / name / "state", pop3_port, self.users, device_password_hash()
        )
        if HAS_WORKERS:
            text = f"workers = {workers}\n" + text
        node = Node(
            GatewayProcess(self.base / name, "", [pop3_port, smtp_port]), pop3_port, smtp_port
        )
        parts = [text, "[smtp]\nmax_message_size = 10000000\n"]
        parts.append(listener("smtp", smtp_port, "starttls", False))
        if proxied:
            node.pop3_proxy_port, node.smtp_proxy_port = free_port(), free_port()
            parts.append(listener("pop3", node.pop3_proxy_port, "implicit", True))
            parts.append(listener("smtp", node.smtp_proxy_port, "starttls", True))
            parts.append('[proxy]\ntrusted = ["127.0.0.1/32"]\n')
            node.process.ports += [node.pop3_proxy_port, node.smtp_proxy_port]
        assert self.dovecot is not None
        parts.append(
            "\n".join(
                [
                    "[providers.black-hole]",
                    f'smtp = {{ host = "localhost", port = {self.black_hole.getsockname()[1]}, '
                    'tls = "implicit" }',
                    f'ca_file = "{self.setup.upstream_tls.ca_file}"',
                    "timeout = 3600",
                    "[accounts.intake]",
                    f'provider = "black-hole"\nusername = "{ACCOUNT}"\npassword = "x"',
                    f"[devices.{INTAKE_DEVICE}]",
                    f'password_hash = "{device_password_hash()}"',
                    'account = "intake"\nprotocols = ["smtp"]\nallow_from = ["127.0.0.0/8"]',
                    "",
                ]
            )
        )
        if backend == "postgresql":
            parts.append(state_toml(dsn, node=name))
        node.process.config_text = "\n".join(parts)
        self.gateways.append(node.process)
        node.process.start(timeout=90)
        return node

    def stop(self) -> None:
        self.pool.shutdown()
        for gateway in self.gateways:
            gateway.stop()
        if self.haproxy is not None:
            self.haproxy.stop()
        if self.dovecot is not None:
            self.dovecot.stop()
        if self.postgres is not None:
            self.postgres.close()
        if self.sink is not None:
            self.sink.terminate()
            self.sink.wait()
        self.black_hole.close()
        if not self.args.keep:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- measurements --

    @property
    def dovecot_pgid(self) -> int:
        assert self.dovecot is not None and self.dovecot._process is not None
        return os.getpgid(self.dovecot._process.pid)

    def meter(self, target: Target) -> StateMeter:
        assert self.postgres is not None
        haproxy = self.haproxy.pid if self.haproxy is not None else None
        return StateMeter(target.gateway_pids(), self.dovecot_pgid, self.postgres, haproxy)

    def creds(self, target: Target) -> list[tuple[str, str]]:
        cred = direct_cred if target.side == "direct" else device_cred
        return [cred(u) for u in self.users]

    def pop3(self, target: Target, warmup: float, window: float) -> dict[str, Any]:
        r = session_rate(
            target.pop3_port,
            target.side,
            self.creds(target),
            "hybrid",
            warmup,
            window,
            meter=lambda: self.meter(target),
        )
        busy = r["cores_busy"]
        sessions = max(r["sessions"], 1)
        r["gateway_cpu_ms_per_session"] = 1000 * busy["gateway"] * window / sessions
        r["postgres_cpu_ms_per_session"] = 1000 * busy["postgres"] * window / sessions
        if r["errors"]:
            log(f"    {target.name}: {r['errors']} failed sessions, first: {r['first_error']}")
        return r

    def smtp(self, target: Target, per_client: int) -> dict[str, Any]:
        user, password = (
            (SMTP_USER, user_password(SMTP_USER))
            if target.side == "direct"
            else (INTAKE_DEVICE, DEVICE_PASSWORD)
        )
        ca = CA_FILES[target.side]
        jobs = [
            (target.smtp_port, str(ca), user, password, SMTP_SIZE, per_client, i)
            for i in range(SMTP_CLIENTS)
        ]
        pids = target.gateway_pids()
        assert self.postgres is not None
        cpu0 = sum(process_cpu(p) for p in pids)
        pg0 = self.postgres.cpu()
        started = time.perf_counter()
        list(self.pool.map(submit_batch, jobs))
        seconds = time.perf_counter() - started
        total = SMTP_CLIENTS * per_client
        cpu = sum(process_cpu(p) for p in pids) - cpu0
        return {
            "value": total / seconds,
            "messages": total,
            "gateway_cpu_ms_per_message": 1000 * cpu / total,
            "postgres_cpu_ms_per_message": 1000 * (self.postgres.cpu() - pg0) / total,
        }

    def warm_up(self) -> None:
        """Every configuration briefly: Dovecot's indexes, each process's
        verified device passwords, PostgreSQL connections, TLS, page cache."""
        t0 = time.monotonic()
        for target in self.targets:
            self.pop3(target, 0.0, 0.5 if self.quick else 1.5)
            self.smtp(target, 2 if self.quick else 4)
        log(f"warm-up: {time.monotonic() - t0:.1f} s")

    def run(self) -> None:
        rounds: dict[str, dict[str, list[dict[str, Any]]]] = {
            t.name: {"pop3": [], "smtp": []} for t in self.targets
        }
        for number in range(1, self.rounds + 1):
            for target in self.targets:
                p = self.pop3(target, self.warmup, self.window)
                s = self.smtp(target, self.smtp_per_client)
                rounds[target.name]["pop3"].append(p)
                rounds[target.name]["smtp"].append(s)
                log(
                    f"round {number}: {target.name:<36} POP3 {p['rate']:6.1f}/s "
                    f"({p['gateway_cpu_ms_per_session']:.2f} ms gateway CPU/session)  "
                    f"SMTP {s['value']:6.1f}/s ({s['gateway_cpu_ms_per_message']:.2f} ms/msg)  "
                    f"load {os.getloadavg()[0]:.1f}"
                )
        self.results["rounds"] = rounds
        self.results["cpu_pairs"] = self.cpu_pairs(rounds)

    def one_process(self) -> tuple[Target, Target]:
        """The embedded and the PostgreSQL gateway with 1 process, reached directly."""
        embedded = next(t for t in self.targets if t.backend == "embedded")
        postgres = next(t for t in self.targets if t.backend == "postgresql" and t.processes == 1)
        return embedded, postgres

    def cpu_pairs(self, rounds: dict[str, dict[str, list[dict[str, Any]]]]) -> list[Any]:
        """What PostgreSQL adds is a difference of two noisy figures on a
        shared machine: taken per pair of neighbouring runs (the main rounds,
        then extra pairs of the two 1-process gateways alone, the order
        swapped every pair so a drift in the machine's load cancels), and the
        median of those differences reported."""
        embedded, postgres = self.one_process()
        pairs = [
            {
                "pop3_ms": [
                    rounds[t.name]["pop3"][i]["gateway_cpu_ms_per_session"]
                    for t in (embedded, postgres)
                ],
                "smtp_ms": [
                    rounds[t.name]["smtp"][i]["gateway_cpu_ms_per_message"]
                    for t in (embedded, postgres)
                ],
            }
            for i in range(self.rounds)
        ]
        for number in range(self.args.cpu_pairs if not self.quick else 1):
            order = (embedded, postgres) if number % 2 == 0 else (postgres, embedded)
            found: dict[str, tuple[float, float]] = {}
            for target in order:
                p = self.pop3(target, self.warmup, self.window)
                s = self.smtp(target, self.smtp_per_client)
                found[target.backend] = (
                    p["gateway_cpu_ms_per_session"],
                    s["gateway_cpu_ms_per_message"],
                )
            pairs.append(
                {
                    "pop3_ms": [found["embedded"][0], found["postgresql"][0]],
                    "smtp_ms": [found["embedded"][1], found["postgresql"][1]],
                }
            )
            log(
                f"CPU pair {number + 1}: gateway CPU per POP3 session embedded "
                f"{found['embedded'][0]:.2f} / PostgreSQL {found['postgresql'][0]:.2f} ms; "
                f"per SMTP message {found['embedded'][1]:.2f} / {found['postgresql'][1]:.2f} ms"
            )
        return pairs

    # -- report --

    def summary(self) -> dict[str, Any]:
        rounds = self.results["rounds"]

        def med(name: str, kind: str, key: str) -> float:
            return float(statistics.median(r[key] for r in rounds[name][kind]))

        direct = self.targets[0].name
        d_pop3, d_smtp = med(direct, "pop3", "rate"), med(direct, "smtp", "value")
        rows: dict[str, Any] = {}
        for t in self.targets:
            pop3, smtp = med(t.name, "pop3", "rate"), med(t.name, "smtp", "value")
            rows[t.name] = {
                "backend": t.backend,
                "processes": t.processes,
                "route": t.route,
                "pop3_sessions_per_s": pop3,
                "pop3_vs_direct": pop3 / d_pop3,
                "pop3_failed_sessions": sum(r["errors"] for r in rounds[t.name]["pop3"]),
                "smtp_accepted_per_s": smtp,
                "smtp_vs_direct": smtp / d_smtp,
                "gateway_cpu_ms_per_session": med(t.name, "pop3", "gateway_cpu_ms_per_session"),
                "postgres_cpu_ms_per_session": med(t.name, "pop3", "postgres_cpu_ms_per_session"),
                "gateway_cpu_ms_per_message": med(t.name, "smtp", "gateway_cpu_ms_per_message"),
                "postgres_cpu_ms_per_message": med(t.name, "smtp", "postgres_cpu_ms_per_message"),
                "cores_busy_pop3": {
                    k: statistics.median(r["cores_busy"][k] for r in rounds[t.name]["pop3"])
                    for k in (
                        "gateway",
                        "dovecot",
                        "postgres",
                        "haproxy",
                        "client",
                        "other",
                        "steal",
                    )
                },
            }
        embedded, postgres = (t.name for t in self.one_process())
        p = rows[postgres]
        pairs = self.results["cpu_pairs"]
        extra_session = statistics.median(b - a for a, b in (x["pop3_ms"] for x in pairs))
        extra_message = statistics.median(b - a for a, b in (x["smtp_ms"] for x in pairs))
        slowest_pg_smtp = min(
            r["smtp_accepted_per_s"] for r in rows.values() if r["backend"] == "postgresql"
        )
        return {
            "rows": rows,
            "postgresql_adds": {
                "compared": [embedded, postgres],
                "pairs": len(pairs),
                "gateway_cpu_ms_per_pop3_session": extra_session,
                "gateway_cpu_ms_per_smtp_message": extra_message,
                "postgres_server_cpu_ms_per_pop3_session": p["postgres_cpu_ms_per_session"],
                "target_pop3_ms": TARGET_POP3_EXTRA_CPU_MS,
                "pop3_pass": extra_session <= TARGET_POP3_EXTRA_CPU_MS,
                "lowest_postgresql_smtp_per_s": slowest_pg_smtp,
                "target_smtp_per_s": TARGET_SMTP_PER_S,
                "smtp_pass": slowest_pg_smtp >= TARGET_SMTP_PER_S,
            },
        }

    def report(self, summary: dict[str, Any]) -> list[str]:
        rows: list[tuple[str, ...]] = []
        for name, r in summary["rows"].items():
            rows.append(
                (
                    name,
                    f"{r['pop3_sessions_per_s']:.1f}",
                    f"{r['pop3_vs_direct']:.2f}",
                    str(r["pop3_failed_sessions"]),
                    f"{r['gateway_cpu_ms_per_session']:.2f}",
                    f"{r['postgres_cpu_ms_per_session']:.2f}",
                    f"{r['smtp_accepted_per_s']:.1f}",
                    f"{r['smtp_vs_direct']:.2f}",
                    f"{r['gateway_cpu_ms_per_message']:.2f}",
                )
            )
        lines = format_table(
            (
                "configuration",
                "POP3/s",
                "vs direct",
                "failed",
                "gw CPU ms/sess",
                "PG CPU ms/sess",
                "SMTP/s",
                "vs direct",
                "gw CPU ms/msg",
            ),
            rows,
        )
        lines += ["", "cores busy during the POP3 runs (median; 2 cores):"]
        lines += format_table(
            (
                "configuration",
                "gateway",
                "dovecot",
                "postgres",
                "haproxy",
                "client",
                "other",
                "steal",
            ),
            [
                (name, *(f"{v:.2f}" for v in r["cores_busy_pop3"].values()))
                for name, r in summary["rows"].items()
            ],
        )
        adds = summary["postgresql_adds"]
        lines += [
            "",
            f"PostgreSQL adds ({adds['compared'][1]} vs {adds['compared'][0]}; median of "
            f"{adds['pairs']} paired differences): "
            f"{adds['gateway_cpu_ms_per_pop3_session']:+.2f} ms gateway CPU per POP3 session "
            f"(target <= {TARGET_POP3_EXTRA_CPU_MS:.1f} ms: "
            f"{'met' if adds['pop3_pass'] else 'NOT met'}), "
            f"{adds['gateway_cpu_ms_per_smtp_message']:+.2f} ms per SMTP message; "
            f"the PostgreSQL server itself {adds['postgres_server_cpu_ms_per_pop3_session']:.2f}"
            " ms per POP3 session",
            f"SMTP intake on PostgreSQL nodes: lowest {adds['lowest_postgresql_smtp_per_s']:.0f}"
            f" messages/s (target >= {TARGET_SMTP_PER_S:.0f}: "
            f"{'met' if adds['smtp_pass'] else 'NOT met'})",
        ]
        return lines


def notes() -> list[str]:
    spool = (REPO_ROOT / "gateway" / "state" / "migrations").glob("0007_*.sql")
    lines = []
    if not HAS_WORKERS:
        lines.append(
            "processes are separate twistd nodes (worker processes have not landed); the "
            "embedded backend cannot be shared between nodes, so it runs as 1 process only"
        )
    if not any(spool):
        lines.append(
            "the PostgreSQL spool has not landed: SMTP intake spools to each node's embedded "
            "spool on every configuration"
        )
    lines.append(
        "SMTP direct = Dovecot submission, which relays to a sink before its 250: "
        "an upstream bound, not the same work"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 1 s windows (smoke run)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (full mode)")
    parser.add_argument("--window", type=float, default=3.0, help="POP3 window in s (full mode)")
    parser.add_argument(
        "--smtp-messages", type=int, default=480, help="messages per SMTP run (full mode)"
    )
    parser.add_argument(
        "--cpu-pairs", type=int, default=6, help="extra embedded/PostgreSQL pairs (full mode)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    raise_fd_limit()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    bench = Bench(args)
    try:
        bench.start()
        bench.warm_up()
        log(f"measuring, {bench.rounds} round(s), all configurations alternating")
        bench.run()
    except BaseException:
        for gateway in bench.gateways:
            print(
                f"--- {gateway.base_dir.name} log tail ---\n" + gateway.log_text()[-2000:],
                file=sys.stderr,
            )
        raise
    finally:
        bench.stop()
    summary = bench.summary()
    info = bench.results["info"]
    info.update(
        {
            "processes_are": "workers" if HAS_WORKERS else "twistd nodes behind HAProxy",
            "pop3_clients": POP3_CLIENTS,
            "smtp_clients": SMTP_CLIENTS,
            "smtp_message_bytes": SMTP_SIZE,
            "pop3_window_s": bench.window,
            "notes": notes(),
            "loadavg_after": os.getloadavg(),
            "elapsed_s": time.monotonic() - started,
        }
    )
    bench.results["summary"] = summary
    lines = [
        "",
        f"State backends and processes, {bench.rounds} round(s), all configurations "
        f"alternating, medians; POP3: {POP3_CLIENTS} clients, full TLS sessions; SMTP: "
        f"{SMTP_CLIENTS} sessions of 10 KiB messages, accepted (spooled) only",
        *bench.report(summary),
        *(f"note: {n}" for n in notes()),
        f"load average before {info['loadavg_before'][0]:.1f}, after "
        f"{info['loadavg_after'][0]:.1f}; total {info['elapsed_s']:.0f} s; details in "
        f"{args.output}",
    ]
    print("\n".join(lines))
    args.output.write_text(json.dumps(bench.results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
