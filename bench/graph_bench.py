"""Graph-backed accounts: the gateway serving a Microsoft Graph folder (the test
suite's Graph emulator) vs the gateway serving the same messages from an IMAP
folder (Dovecot), both to a POP3S device, in one harness and one run.

    python bench/graph_bench.py            # full run: 3 rounds A B A B ...
    python bench/graph_bench.py --quick    # smoke run: 1 round, smaller sizes

Sides: "graph" is a device whose account has mailbox = "graph" at the emulator
(a child process, tests/harness/graph_emulator.py, Python's threaded HTTP
server: it is part of what is measured, and slower than Exchange's front end
would be on loopback); "imap" a device whose account has mailbox = "imap" on a
Dovecot holding the same messages. Tokens come from the suite's authorization
server; the emulator checks each by introspection (cached).

Measured (medians; reported, not asserted):
- RETR throughput: 20 x 1 MiB and 2 x 50 MiB (quick: 5 x 1 MiB, 1 x 8 MiB),
  every byte compared with the expected wire form. Target: graph >= 0.7 x imap.
- Poll of an unchanged 1,000-message folder: connect + TLS + login + STAT +
  QUIT, after the Graph sizes are known. Target: graph <= 2 x imap.
- Full sessions per second: login, UIDL, RETR of 10 small messages, QUIT.
- Graph requests per poll (unchanged folder, and one with RETR of 10).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


from bench.common import (  # noqa: E402
    BENCH_LIMITS,
    DEVICE_PASSWORD,
    MB,
    MIB,
    PeakRSS,
    device_password_hash,
    log,
    make_message,
    poll_ms,
    run_info,
    wire_form,
)
from bench.imap_bench import BenchDovecot, Client  # noqa: E402
from tests.harness.certs import make_tls_material  # noqa: E402
from tests.harness.gateway_process import GatewayProcess, free_port  # noqa: E402
from tests.harness.oauth_server import OAuthServerProcess  # noqa: E402
from tests.integration.test_graph_gateway import CLIENT_SECRET, authorize  # noqa: E402

RESULTS = Path(__file__).resolve().with_name("results-graph.json")
RETR_TARGET = 0.7
POLL_TARGET = 2.0


# -- the emulator in a child process, so it does not share the benchmark's GIL -------------


def _emulator_main(conn: Connection, introspect: str, boxes: dict[str, list[bytes]]) -> None:
    from tests.harness.graph_emulator import GraphEmulator, IntrospectedTokens

    emulator = GraphEmulator(
        IntrospectedTokens(
            # The gateway's Graph token: Graph's scopes on the host of graph_url.
            introspect,
            scope="https://127.0.0.1/Mail.ReadWrite",
            cache_seconds=3600,
        )
    )
    for user, messages in boxes.items():
        box = emulator.mailbox(user)
        for m in messages:
            box.add(m)
    emulator.start()
    conn.send(emulator.url)
    while True:
        command = conn.recv()
        if command == "counts":
            with emulator.lock:
                conn.send(dict(emulator.counts))
        elif command == "reset":
            emulator.reset_counts()
            conn.send(None)
        else:
            emulator.stop()
            conn.send(None)
            return


class EmulatorProcess:
    def __init__(self, introspect: str, boxes: dict[str, list[bytes]]) -> None:
        self.conn, child = multiprocessing.get_context("fork").Pipe()
        self.process = multiprocessing.get_context("fork").Process(
            target=_emulator_main, args=(child, introspect, boxes), daemon=True
        )
        self.process.start()
        self.url: str = self.conn.recv()

    def ask(self, command: str) -> Any:
        self.conn.send(command)
        return self.conn.recv()

    def stop(self) -> None:
        self.ask("stop")
        self.process.join(5)


# -- set-up ------------------------------------------------------------------------------------


def config(
    base: Path,
    port: int,
    dovecot: Any,
    upstream: Any,
    own: Any,
    graph_url: str,
    idp_url: str,
    users: Sequence[str],
    password_hash: str,
) -> str:
    secret = base / "client-secret"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text(CLIENT_SECRET + "\n")
    secret.chmod(0o600)
    lines = [
        f'state_dir = "{base / "state"}"',
        "[tls]",
        f'certificate = "{own.certificate}"',
        f'private_key = "{own.private_key}"',
        "[[pop3.listen]]",
        f'address = "127.0.0.1"\nport = {port}\ntls = "implicit"',
        BENCH_LIMITS,
        "[providers.dovecot]",
        f'imap = {{ host = "localhost", port = {dovecot.imaps_port}, tls = "implicit" }}',
        f'ca_file = "{upstream.ca_file}"',
        "timeout = 60",
        "[providers.m365]",
        f'graph_url = "{graph_url}"',
        "timeout = 60",
        f'oauth = {{ token_url = "{idp_url}/token", device_authorization_url = '
        f'"{idp_url}/device", client_id = "gateway", client_secret_file = "{secret}", '
        'scopes = ["mail", "offline_access"] }',
    ]
    for user in users:
        lines += [
            f"[accounts.imap-{user}]",
            f'provider = "dovecot"\nusername = "{user}"\npassword = "pw-{user}"\nmailbox = "imap"',
            f"[devices.imap-{user}]",
            f'password_hash = "{password_hash}"\naccount = "imap-{user}"',
            'allow_from = ["127.0.0.0/8"]\nprotocols = ["pop3"]',
            f"[accounts.graph-{user}]",
            f'provider = "m365"\nusername = "{user}"\nauth = "oauth2"\nmailbox = "graph"',
            f"[devices.graph-{user}]",
            f'password_hash = "{password_hash}"\naccount = "graph-{user}"',
            'allow_from = ["127.0.0.0/8"]\nprotocols = ["pop3"]',
        ]
    return "\n".join(lines) + "\n"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick: bool = args.quick
        self.rounds = 1 if self.quick else args.rounds
        self.results: dict[str, Any] = {"rounds": {}, "info": {}}

    def run(self, base: Path) -> dict[str, Any]:
        started = time.monotonic()
        self.results["info"].update(run_info(self.quick, self.rounds))
        upstream = make_tls_material(base / "tls-upstream")
        own = make_tls_material(base / "tls-gateway")
        n1, big, nbig = (5, 8 * MIB, 1) if self.quick else (20, 50 * MIB, 2)
        self.boxes = {
            "onemib": [make_message(i, MIB) for i in range(n1)],
            "fifty": [make_message(100 + i, big) for i in range(nbig)],
            "folder": [make_message(1000 + i, 2000) for i in range(1000)],
            "small": [make_message(5000 + i, 2000) for i in range(10)],
        }
        users = list(self.boxes)
        log("filling mailboxes ...")
        with (
            BenchDovecot(base / "dovecot", {u: f"pw-{u}" for u in users}, tls=upstream) as dovecot,
            OAuthServerProcess(base / "idp", client_secret=CLIENT_SECRET) as idp,
        ):
            for user, messages in self.boxes.items():
                for m in messages:
                    dovecot.deliver(user, m)
            crlf = {u: [m.replace(b"\n", b"\r\n") for m in ms] for u, ms in self.boxes.items()}
            self.graph = EmulatorProcess(f"{idp.url}/introspect", crlf)
            try:
                port = free_port()
                hashed = device_password_hash()
                gw_base = base / "gw"
                text = config(
                    gw_base, port, dovecot, upstream, own, self.graph.url, idp.url, users, hashed
                )
                for user in users:
                    authorize(gw_base / "state", idp, f"graph-{user}", user)
                with GatewayProcess(gw_base, text, [port]) as gateway:
                    assert gateway.process is not None
                    self.pid = gateway.process.pid
                    self.port = port
                    self.ctx = ssl.create_default_context(cafile=str(own.ca_file))
                    self.warm_up()
                    self.retr("retr_1m", "onemib")
                    self.retr("retr_50m", "fifty")
                    self.poll("poll_1000", "folder")
                    self.sessions("full_session", "small")
                    self.requests_per_poll()
            finally:
                self.graph.stop()
        self.results["info"]["loadavg_after"] = os.getloadavg()
        self.results["info"]["elapsed_s"] = time.monotonic() - started
        self.summarise()
        return self.results

    def session(self, side: str, user: str) -> Client:
        client = Client(self.port, self.ctx)
        client.login(f"{side}-{user}", DEVICE_PASSWORD)
        return client

    def warm_up(self) -> None:
        """Index Dovecot's mailboxes; let the gateway measure every Graph message
        (at most 200 per login) so that the timed logins are steady-state polls."""
        t0 = time.perf_counter()
        for user, messages in self.boxes.items():
            while True:
                client = self.session("graph", user)
                count = int(client.command(b"STAT").split()[1])
                client.command(b"QUIT")
                client.close()
                if count == len(messages):
                    break
            client = self.session("imap", user)
            client.multi(b"UIDL")
            client.command(b"QUIT")
            client.close()
        self.results["first_measurement_s"] = time.perf_counter() - t0
        log(f"warm-up (Graph sizes measured once): {time.perf_counter() - t0:.1f} s")

    def alternate(self, key: str, measure: Callable[[str], dict[str, Any]]) -> None:
        rounds: dict[str, list[dict[str, Any]]] = {"graph": [], "imap": []}
        for _ in range(self.rounds):
            for side in ("graph", "imap"):
                rounds[side].append(measure(side))
        self.results["rounds"][key] = rounds
        m = {side: statistics.median(x["value"] for x in rounds[side]) for side in rounds}
        log(
            f"  {key:<13} graph {m['graph']:9.2f}  imap {m['imap']:9.2f}  "
            f"ratio {m['graph'] / m['imap']:.2f}"
        )

    def retr(self, key: str, user: str) -> None:
        expected = [wire_form(m) for m in self.boxes[user]]

        def measure(side: str) -> dict[str, Any]:
            client = self.session(side, user)
            seconds, added = 0.0, []
            for i, exp in enumerate(expected, 1):
                probe = PeakRSS(self.pid)
                t0 = time.perf_counter()
                client.retr(i, exp)
                seconds += time.perf_counter() - t0
                added.append(probe.added())
            client.command(b"QUIT")
            client.close()
            return {"value": sum(map(len, expected)) / seconds / MB, "peak_rss_added": added}

        log(f"{key}: RETR MB/s of {len(expected)} messages (higher is better)")
        self.alternate(key, measure)

    def poll(self, key: str, user: str) -> None:
        def measure(side: str) -> dict[str, Any]:
            return poll_ms(lambda: self.session(side, user), 3 if self.quick else 10)

        log(f"{key}: poll of an unchanged 1,000-message folder, ms (lower is better)")
        self.alternate(key, measure)

    def sessions(self, key: str, user: str) -> None:
        expected = [wire_form(m) for m in self.boxes[user]]

        def measure(side: str) -> dict[str, Any]:
            count = 5 if self.quick else 20
            t0 = time.perf_counter()
            for _ in range(count):
                client = self.session(side, user)
                client.multi(b"UIDL")
                for i, exp in enumerate(expected, 1):
                    client.retr(i, exp)
                client.command(b"QUIT")
                client.close()
            return {"value": count / (time.perf_counter() - t0)}

        log(f"{key}: sessions/s of login + UIDL + RETR x10 + QUIT (higher is better)")
        self.alternate(key, measure)

    def requests_per_poll(self) -> None:
        out: dict[str, Any] = {}
        for label, user, retrieve in (("unchanged_1000", "folder", 0), ("retr_10", "small", 10)):
            self.graph.ask("reset")
            client = self.session("graph", user)
            client.command(b"STAT")
            for i in range(1, retrieve + 1):
                client.retr(i, wire_form(self.boxes[user][i - 1]))
            client.command(b"QUIT")
            client.close()
            counts = self.graph.ask("counts")
            out[label] = counts.get("total", 0)
        self.results["graph_requests_per_poll"] = out
        log(f"Graph requests per poll: {out} (limit 10,000 per 10 minutes per app and mailbox)")

    def summarise(self) -> None:
        summary: dict[str, Any] = {}
        for key, rounds in self.results["rounds"].items():
            g = statistics.median(x["value"] for x in rounds["graph"])
            i = statistics.median(x["value"] for x in rounds["imap"])
            entry: dict[str, Any] = {"graph": g, "imap": i, "ratio": g / i}
            if key.startswith("retr"):
                entry.update(target=RETR_TARGET, passed=g / i >= RETR_TARGET)
            if key.startswith("poll"):
                entry.update(target=POLL_TARGET, passed=g / i <= POLL_TARGET)
            summary[key] = entry
        peaks = [
            p for r in self.results["rounds"]["retr_50m"]["graph"] for p in r["peak_rss_added"]
        ]
        summary["retr_big_rss_added_mib"] = max(peaks) / MIB
        self.results["summary"] = summary
        log("\nsummary:")
        for key, entry in summary.items():
            log(f"  {key:<22} {entry}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="graph-bench-"))
    try:
        results = Bench(args).run(base)
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    log(f"results written to {args.output}")


if __name__ == "__main__":
    main()
