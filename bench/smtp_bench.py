"""SMTP relay: messages per second accepted and relayed, gateway vs upstream direct.

    python bench/smtp_bench.py            # 3 rounds per side, 10 KiB and 1 MiB
    python bench/smtp_bench.py --quick    # 1 round, fewer messages (smoke run)
    python bench/smtp_bench.py --rounds 5

The upstream is a throwaway Dovecot submission service (STARTTLS, AUTH PLAIN)
relaying to an aiosmtpd sink in its own process. Client processes submit over
STARTTLS + AUTH PLAIN, one session per client, many messages per session:

- "intake": messages/s the devices get `250` for from the real `twistd`
  gateway, which means spooled and fsynced (file and directory), for an
  account whose upstream accepts TCP connections and never answers, so the
  relay spends nothing: the spool's own rate;
- "gateway accepted": the same while the relay delivers to Dovecot at the
  same time, in the same process, as in production;
- "gateway relayed": messages/s from the first submission until the spool is
  empty again, i.e. every message accepted by the upstream (Dovecot answers
  `250` only after its own relay to the sink did);
- "direct": the same clients submitting to Dovecot itself: the upstream's own
  rate, which bounds what relaying through the gateway can reach.

Sides alternate (gateway, direct, gateway, ...); the table shows medians.
Everything (clients, gateway, Dovecot, sink) shares this machine, so figures
depend on what else runs on it. Reported, not asserted: benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from argon2 import PasswordHasher  # noqa: E402

from bench.common import BENCH_LIMITS, discarding_sink  # noqa: E402
from tests.harness.certs import TLSMaterial, make_tls_material  # noqa: E402
from tests.harness.dovecot import Dovecot  # noqa: E402
from tests.harness.gateway_process import GatewayProcess, free_port  # noqa: E402

KIB = 1024
MIB = 1024 * 1024
RESULTS = Path(__file__).resolve().with_name("results-smtp.json")
ACCOUNT = "bench@example.com"
ACCOUNT_PW = "bench-pw"
DEVICE = "bench-device"
DEVICE_PW = "bench-device-pw"
INTAKE_DEVICE = "bench-intake"
TARGET_ACCEPTED_10K = 200.0


@dataclass(frozen=True)
class Workload:
    name: str
    size: int
    clients: int
    per_client: int


def process_cpu(pid: int) -> float:
    """CPU seconds a process used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_message(size: int, seed: int) -> bytes:
    """A plausible scan: headers, then base64-like 76-character lines."""
    head = (
        f"From: {ACCOUNT}\r\nTo: r@example.org\r\nSubject: bench {seed}\r\n"
        f"Message-ID: <bench-{seed}-{os.getpid()}@example.com>\r\n\r\n"
    ).encode()
    line = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/" * 2)[:76]
    body_lines = max(1, (size - len(head)) // 78)
    return head + (line + b"\r\n") * body_lines


def submit_batch(args: tuple[int, str, str, str, int, int, int]) -> float:
    """One client process: one session, `count` messages; returns seconds spent."""
    port, ca_file, user, password, size, count, seed = args
    ctx = ssl.create_default_context(cafile=ca_file)
    message = make_message(size, seed)
    started = time.perf_counter()
    with smtplib.SMTP("localhost", port, timeout=120) as client:
        client.starttls(context=ctx)
        client.login(user, password)
        for _ in range(count):
            client.sendmail(ACCOUNT, ["r@example.org"], message)
    return time.perf_counter() - started


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="smtp-bench-"))
        self.tls_upstream: TLSMaterial = make_tls_material(self.work / "tls-upstream")
        self.tls_gateway: TLSMaterial = make_tls_material(self.work / "tls-gateway")
        self.sink_process: subprocess.Popen[bytes] | None = None
        # An upstream that takes connections and never greets: the relay for
        # the intake account waits on it (timeout 3600 s) and costs nothing.
        self.black_hole = socket.socket()
        self.black_hole.bind(("127.0.0.1", 0))
        self.black_hole.listen(16)
        self.dovecot: Dovecot | None = None
        self.gateway: GatewayProcess | None = None
        self.pool = ProcessPoolExecutor(max_workers=8)
        self.intake_total = 0

    # -- set-up --------------------------------------------------------------------

    def start(self) -> None:
        self.sink_process, sink_port = discarding_sink(self.work / "sink")
        self.dovecot = Dovecot(
            self.work / "dovecot",
            {ACCOUNT: ACCOUNT_PW},
            tls=self.tls_upstream,
            submission_relay_port=sink_port,
        ).start()
        self.gateway_port = free_port()
        hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
        assert self.dovecot.submission_port is not None
        config = "\n".join(
            [
                f'state_dir = "{self.work / "state"}"',
                "[tls]",
                f'certificate = "{self.tls_gateway.certificate}"',
                f'private_key = "{self.tls_gateway.private_key}"',
                "[smtp]",
                "max_message_size = 10000000",
                "[[smtp.listen]]",
                f'address = "127.0.0.1"\nport = {self.gateway_port}\ntls = "starttls"',
                BENCH_LIMITS,
                "[providers.upstream]",
                f'smtp = {{ host = "localhost", port = {self.dovecot.submission_port}, '
                'tls = "starttls" }',
                f'ca_file = "{self.tls_upstream.ca_file}"',
                "[accounts.bench]",
                f'provider = "upstream"\nusername = "{ACCOUNT}"\npassword = "{ACCOUNT_PW}"',
                f"[devices.{DEVICE}]",
                f'password_hash = "{hasher.hash(DEVICE_PW)}"',
                'account = "bench"\nprotocols = ["smtp"]\nallow_from = ["127.0.0.0/8"]',
                "[providers.black-hole]",
                f'smtp = {{ host = "localhost", port = {self.black_hole.getsockname()[1]}, '
                'tls = "implicit" }',
                f'ca_file = "{self.tls_upstream.ca_file}"',
                "timeout = 3600",
                "[accounts.intake]",
                f'provider = "black-hole"\nusername = "{ACCOUNT}"\npassword = "{ACCOUNT_PW}"',
                f"[devices.{INTAKE_DEVICE}]",
                f'password_hash = "{hasher.hash(DEVICE_PW)}"',
                'account = "intake"\nprotocols = ["smtp"]\nallow_from = ["127.0.0.0/8"]',
            ]
        )
        self.gateway = GatewayProcess(self.work / "gateway", config, [self.gateway_port])
        self.gateway.start()
        self.spool_queue = self.work / "state" / "spool" / "queue"

    def stop(self) -> None:
        self.pool.shutdown()
        self.black_hole.close()
        if self.gateway is not None:
            self.gateway.stop()
        if self.dovecot is not None:
            self.dovecot.stop()
        if self.sink_process is not None:
            self.sink_process.terminate()
            self.sink_process.wait()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- one measurement ----------------------------------------------------------------

    def run_clients(self, port: int, user: str, password: str, load: Workload) -> float:
        jobs = [
            (port, str(self.ca_for(port)), user, password, load.size, load.per_client, i)
            for i in range(load.clients)
        ]
        started = time.perf_counter()
        list(self.pool.map(submit_batch, jobs))
        return time.perf_counter() - started

    def ca_for(self, port: int) -> Path:
        return self.tls_gateway.ca_file if port == self.gateway_port else self.tls_upstream.ca_file

    def spooled(self) -> int:
        """Messages of the bench account in the spool; the intake account's
        stay there (their upstream never answers) and are not counted."""
        return sum(1 for _ in self.spool_queue.glob("*.msg")) - self.intake_total

    def intake_round(self, load: Workload) -> float:
        """accepted/s for the account whose relay never gets anywhere."""
        total = load.clients * load.per_client
        rate = total / self.run_clients(self.gateway_port, INTAKE_DEVICE, DEVICE_PW, load)
        self.intake_total += total
        return rate

    def gateway_round(self, load: Workload) -> tuple[float, float, float]:
        """(accepted/s, relayed/s, gateway CPU ms per message)."""
        total = load.clients * load.per_client
        assert self.gateway is not None and self.gateway.process is not None
        pid = self.gateway.process.pid
        cpu = process_cpu(pid)
        started = time.perf_counter()
        accepted = self.run_clients(self.gateway_port, DEVICE, DEVICE_PW, load)
        deadline = time.monotonic() + 600
        while self.spooled() and time.monotonic() < deadline:
            time.sleep(0.005)
        relayed = time.perf_counter() - started
        if self.spooled():
            raise RuntimeError("the spool did not empty within 10 minutes")
        return total / accepted, total / relayed, (process_cpu(pid) - cpu) * 1000 / total

    def direct_round(self, load: Workload) -> float:
        assert self.dovecot is not None and self.dovecot.submission_port is not None
        total = load.clients * load.per_client
        return total / self.run_clients(self.dovecot.submission_port, ACCOUNT, ACCOUNT_PW, load)

    def run(self) -> dict[str, Any]:
        quick = self.args.quick
        rounds = 1 if quick else self.args.rounds
        loads = [
            Workload("10 KiB", 10 * KIB, clients=4, per_client=50 if quick else 150),
            Workload("1 MiB", MIB, clients=4, per_client=3 if quick else 10),
        ]
        # Warm-up: TLS, argon2 cache, Dovecot processes, page cache.
        self.gateway_round(Workload("warm-up", 10 * KIB, 2, 10))
        self.direct_round(Workload("warm-up", 10 * KIB, 2, 10))
        results: dict[str, Any] = {}
        for load in loads:
            accepted: list[float] = []
            relayed: list[float] = []
            direct: list[float] = []
            cpu: list[float] = []
            intake: list[float] = []
            for _ in range(rounds):
                intake.append(self.intake_round(load))
                a, r, c = self.gateway_round(load)
                accepted.append(a)
                relayed.append(r)
                cpu.append(c)
                direct.append(self.direct_round(load))
                log(
                    f"{load.name}: intake {intake[-1]:.0f}/s; gateway accepted {a:.0f}/s "
                    f"relayed {r:.0f}/s "
                    f"({c:.1f} ms CPU/message), direct {direct[-1]:.0f}/s "
                    f"(load average {os.getloadavg()[0]:.1f})"
                )
            results[load.name] = {
                "messages_per_round": load.clients * load.per_client,
                "clients": load.clients,
                "intake_per_s": statistics.median(intake),
                "gateway_accepted_per_s": statistics.median(accepted),
                "gateway_relayed_per_s": statistics.median(relayed),
                "direct_per_s": statistics.median(direct),
                "gateway_cpu_ms_per_message": statistics.median(cpu),
                "rounds": {
                    "intake": intake,
                    "accepted": accepted,
                    "relayed": relayed,
                    "direct": direct,
                    "gateway_cpu_ms": cpu,
                },
            }
        return results


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def table(results: dict[str, Any]) -> str:
    rows = [
        (
            "size",
            "intake/s",
            "accepted while relaying/s",
            "gateway relayed/s",
            "direct/s",
            "relayed/direct",
            "gateway CPU ms/msg",
        )
    ]
    for name, r in results.items():
        rows.append(
            (
                name,
                f"{r['intake_per_s']:.0f}",
                f"{r['gateway_accepted_per_s']:.0f}",
                f"{r['gateway_relayed_per_s']:.0f}",
                f"{r['direct_per_s']:.0f}",
                f"{r['gateway_relayed_per_s'] / r['direct_per_s']:.2f}",
                f"{r['gateway_cpu_ms_per_message']:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    for key, label in (("intake_per_s", "intake"), ("gateway_accepted_per_s", "while relaying")):
        rate = results["10 KiB"][key]
        verdict = "met" if rate >= TARGET_ACCEPTED_10K else "NOT met"
        lines.append(
            f"target >= {TARGET_ACCEPTED_10K:.0f} msg/s accepted for 10 KiB ({label}): {verdict}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, fewer messages")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per side")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    bench = Bench(args)
    try:
        bench.start()
        results = bench.run()
    finally:
        bench.stop()
    document = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_after": os.getloadavg(),
        },
        "quick": args.quick,
        "results": results,
    }
    args.output.write_text(json.dumps(document, indent=2) + "\n")
    print(table(results))
    print(f"(written to {args.output})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
