"""IMAP-backed accounts: the gateway serving an IMAP folder as POP3 vs Dovecot's own
POP3, both on implicit TLS, in one harness and one run.

    python bench/imap_bench.py            # full run: 3 rounds A B A B ..., about two minutes
    python bench/imap_bench.py --quick    # smoke run: 1 round, smaller sizes

One throwaway Dovecot serves both sides: "direct" is a device talking POP3S to
Dovecot itself; "gateway" is the same device talking POP3S to the real gateway
(`twistd -n gateway`) whose account is IMAP-backed: the gateway logs in to the
same mailbox over IMAPS and streams `BODY.PEEK[]` literals, dot-stuffing them
on the way. Each measurement alternates gateway, direct, gateway, direct, ...
and the table shows the median of each side and the ratio gateway/direct.

Measured:
- RETR throughput: one session RETRs 20 x 1 MiB, another 2 x 50 MiB; only the
  RETR exchanges are timed (command sent to terminator received); every byte
  is compared with the expected wire form. MB/s = 10^6 wire bytes per second.
  A third side, "via_pop3", is the same gateway with a POP3-backed account on
  the same mailbox: it shows what the IMAP path costs compared with the POP3
  path under the same conditions.
- Memory: the peak RSS (VmHWM, reset before each message) a 50 MiB RETR adds
  to the gateway, also with a device that stalls for 2 s mid-message.
- Session set-up for a 1,000-message folder (and a 10-message one): connect,
  TLS, greeting, USER, PASS (the gateway's +OK comes after its IMAP login and
  snapshot), STAT, QUIT. Also the first UIDL of a folder the UIDL map has
  never seen (one FETCH of Message-IDs), a later UIDL (map lookup only), and
  how many octets of commands Dovecot received from the gateway for a set-up
  (its log's in= figure): a per-message fetch would show as ~30 octets per
  message. Since the kept upstream connection (issue 14) the "gateway" side's
  set-up reuses the kept login; the octet count uses an account with
  `keep_connection = false`.
- Kept connection: 1,000 polls (100 with --quick) of the unchanged
  1,000-message folder (login, STAT, QUIT): upstream logins (Dovecot's log),
  median poll time and the gateway's CPU per poll (/proc/PID/stat).

Figures are reported, not asserted. The machine may be shared with other
work; the load average before and after is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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
    find_py_spy,
    hotspots,
    log,
    make_message,
    poll_ms,
    record_profile,
    run_info,
    wire_form,
)
from bench.common import POP3Client as Client  # noqa: E402
from tests.harness.certs import TLSMaterial, make_tls_material  # noqa: E402
from tests.harness.dovecot import Dovecot  # noqa: E402
from tests.harness.gateway_process import GatewayProcess, free_port  # noqa: E402

RESULTS = Path(__file__).resolve().with_name("results-imap.json")
RETR_TARGET = 0.7
RSS_TARGET_MIB = 5

# Dovecot's documented high-performance mode for login processes and reused
# mail processes, for POP3 and IMAP alike, so neither side pays a fork per
# session.
DOVECOT_FAST = """\
# Added by bench/imap_bench.py
service pop3-login {
  service_count = 0
  process_min_avail = 2
}
service pop3 {
  service_count = 0
  process_min_avail = 2
}
service imap-login {
  service_count = 0
  process_min_avail = 2
}
service imap {
  service_count = 0
  process_min_avail = 2
}
"""


class BenchDovecot(Dovecot):
    """The test harness's Dovecot with settings appended to its dovecot.conf."""

    def render_config(self) -> str:
        return super().render_config() + DOVECOT_FAST


# -- set-up --------------------------------------------------------------------------------------


def gateway_config(
    base: Path,
    port: int,
    dovecot: Dovecot,
    upstream: TLSMaterial,
    own: TLSMaterial,
    users: Sequence[str],
    password_hash: str,
) -> str:
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
    ]
    lines += [
        "[providers.dovecot-pop3]",
        f'pop3 = {{ host = "localhost", port = {dovecot.pop3s_port}, tls = "implicit" }}',
        f'ca_file = "{upstream.ca_file}"',
        "timeout = 60",
    ]
    for user in users:
        lines += [
            f"[accounts.acct-{user}]",
            f'provider = "dovecot"\nusername = "{user}"\npassword = "pw-{user}"',
            'mailbox = "imap"',
            f"[devices.dev-{user}]",
            f'password_hash = "{password_hash}"\naccount = "acct-{user}"',
            'allow_from = ["127.0.0.0/8"]',
            # The same IMAP account without the kept connection: a login per session.
            f"[accounts.once-{user}]",
            f'provider = "dovecot"\nusername = "{user}"\npassword = "pw-{user}"',
            'mailbox = "imap"\nkeep_connection = false',
            f"[devices.once-{user}]",
            f'password_hash = "{password_hash}"\naccount = "once-{user}"',
            'allow_from = ["127.0.0.0/8"]',
            # The same mailbox through the POP3 path, for comparison.
            f"[accounts.pop-{user}]",
            f'provider = "dovecot-pop3"\nusername = "{user}"\npassword = "pw-{user}"',
            f"[devices.pop-{user}]",
            f'password_hash = "{password_hash}"\naccount = "pop-{user}"',
            'allow_from = ["127.0.0.0/8"]',
        ]
    return "\n".join(lines) + "\n"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick: bool = args.quick
        self.rounds = 1 if self.quick else args.rounds
        self.big = (8 if self.quick else 50) * MIB
        self.folder_size = 1000
        self.profile: Path | None = args.profile
        self.py_spy: str | None = args.py_spy
        self.results: dict[str, Any] = {"rounds": {}, "info": {}}

    def run(self, base: Path) -> dict[str, Any]:
        started = time.monotonic()
        info = self.results["info"]
        info.update(run_info(self.quick, self.rounds), openssl=ssl.OPENSSL_VERSION)
        upstream = make_tls_material(base / "tls-upstream")
        own = make_tls_material(base / "tls-gateway")
        users = {u: f"pw-{u}" for u in ("onemib", "fifty", "folder", "small", "cold")}
        dovecot = BenchDovecot(base / "dovecot", users, tls=upstream)
        log("filling mailboxes ...")
        self.one_mib = [make_message(i, MIB) for i in range(20)]
        self.fifty = [make_message(100 + i, self.big) for i in range(2)]
        with dovecot:
            for m in self.one_mib:
                dovecot.deliver("onemib", m)
            for m in self.fifty:
                dovecot.deliver("fifty", m)
            for user, count in (
                ("folder", self.folder_size),
                ("cold", self.folder_size),
                ("small", 10),
            ):
                for i in range(count):
                    dovecot.deliver(user, make_message(1000 + i, 2000))
            self.dovecot = dovecot
            port = free_port()
            hashed = device_password_hash()
            text = gateway_config(base / "gw", port, dovecot, upstream, own, list(users), hashed)
            gateway = GatewayProcess(base / "gw", text, [port])
            with gateway:
                assert gateway.process is not None
                self.gateway_pid = gateway.process.pid
                self.ports = {
                    "gateway": port,
                    "via_pop3": port,
                    "once": port,
                    "direct": dovecot.pop3s_port,
                }
                gateway_ca = ssl.create_default_context(cafile=str(own.ca_file))
                self.contexts = {
                    "gateway": gateway_ca,
                    "via_pop3": gateway_ca,
                    "once": gateway_ca,
                    "direct": ssl.create_default_context(cafile=str(upstream.ca_file)),
                }
                self.warm_up()
                self.retr("retr_1m", "onemib", [wire_form(m) for m in self.one_mib])
                self.retr("retr_50m", "fifty", [wire_form(m) for m in self.fifty])
                self.stalled()
                self.setup_time("setup_1000", "folder")
                self.setup_time("setup_10", "small")
                self.uidl_times()
                self.commands_sent()
                self.kept_polls()
        info["loadavg_after"] = os.getloadavg()
        info["elapsed_s"] = time.monotonic() - started
        self.summarise()
        return self.results

    def cred(self, side: str, user: str) -> tuple[str, str]:
        if side == "gateway":
            return f"dev-{user}", DEVICE_PASSWORD
        if side == "via_pop3":
            return f"pop-{user}", DEVICE_PASSWORD
        if side == "once":
            return f"once-{user}", DEVICE_PASSWORD
        return user, f"pw-{user}"

    def session(self, side: str, user: str) -> Client:
        client = Client(self.ports[side], self.contexts[side])
        client.login(*self.cred(side, user))
        return client

    def warm_up(self) -> None:
        """Let Dovecot index every mailbox through both protocols before timing."""
        for user in ("onemib", "fifty", "folder", "small"):
            for side in ("gateway", "direct", "via_pop3"):
                client = self.session(side, user)
                client.multi(b"UIDL")
                client.command(b"QUIT")
                client.close()

    def alternate(
        self,
        key: str,
        measure: Callable[[str], dict[str, Any]],
        sides: Sequence[str] = ("gateway", "direct"),
    ) -> None:
        rounds: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for _ in range(self.rounds):
            for side in sides:
                rounds[side].append(measure(side))
        self.results["rounds"][key] = rounds
        m = {side: statistics.median(x["value"] for x in rounds[side]) for side in sides}
        extra = f"  via_pop3 {m['via_pop3']:9.2f}" if "via_pop3" in m else ""
        log(
            f"  {key:<12} gateway {m['gateway']:9.2f}  direct {m['direct']:9.2f}{extra}  "
            f"ratio {m['gateway'] / m['direct']:.2f}"
        )

    def retr(self, key: str, user: str, expected: list[bytes]) -> None:
        def measure(side: str) -> dict[str, Any]:
            client = self.session(side, user)
            seconds = 0.0
            added: list[int] = []
            for i, exp in enumerate(expected, 1):
                probe = PeakRSS(self.gateway_pid) if side != "direct" else None
                t0 = time.perf_counter()
                client.retr(i, exp)
                seconds += time.perf_counter() - t0
                if probe is not None:
                    added.append(probe.added())
            client.command(b"QUIT")
            client.close()
            size = sum(map(len, expected))
            return {"value": size / seconds / MB, "seconds": seconds, "peak_rss_added": added}

        log(f"{key}: RETR of {len(expected)} messages, {self.rounds} round(s) per side")
        self.alternate(key, measure, ("gateway", "direct", "via_pop3"))

    def stalled(self) -> None:
        """A device that stops reading for 2 s after 1 MiB: back-pressure must hold."""
        client = self.session("gateway", "fifty")
        probe = PeakRSS(self.gateway_pid)
        during: list[int] = []
        client.retr(
            1,
            wire_form(self.fifty[0]),
            pause_after=MIB,
            pause=2.0,
            on_pause=lambda: during.append(probe.added()),
        )
        self.results["stalled_reader"] = {
            "peak_rss_added": probe.added(),
            "rss_added_while_stalled": during[0],
        }
        client.command(b"QUIT")
        client.close()
        log(f"stalled reader: peak RSS added {probe.added() / MIB:.2f} MiB")

    def setup_time(self, key: str, user: str) -> None:
        def measure(side: str) -> dict[str, Any]:
            return poll_ms(lambda: self.session(side, user), 3 if self.quick else 10)

        log(f"{key}: connect + TLS + login + STAT + QUIT, milliseconds (lower is better)")
        self.alternate(key, measure)

    def uidl_times(self) -> None:
        """First UIDL of a never-seen 1,000-message folder, then a later one."""
        out = {}
        for label in ("first", "later"):
            client = self.session("gateway", "cold")
            t0 = time.perf_counter()
            listing = client.multi(b"UIDL")
            out[f"{label}_ms"] = 1000 * (time.perf_counter() - t0)
            assert listing.count(b"\r\n") == self.folder_size + 1
            client.command(b"QUIT")
            client.close()
        self.results["uidl_1000"] = out
        log(f"uidl_1000: first UIDL {out['first_ms']:.1f} ms, later {out['later_ms']:.1f} ms")

    def commands_sent(self) -> None:
        """Octets Dovecot received from the gateway for one set-up of the 1,000 folder."""
        client = self.session("once", "folder")
        client.command(b"STAT")
        client.command(b"QUIT")
        client.close()
        pattern = re.compile(r"imap\(folder\).*Disconnected: Logged out in=(\d+) out=(\d+)")
        deadline = time.monotonic() + 5
        found = None
        while found is None and time.monotonic() < deadline:
            matches = pattern.findall(self.dovecot.log_text())
            found = matches[-1] if matches else None
            time.sleep(0.05)
        if found:
            self.results["setup_1000_imap_octets"] = {"in": int(found[0]), "out": int(found[1])}
            log(f"setup_1000: Dovecot received {found[0]} octets of IMAP commands, sent {found[1]}")

    def kept_polls(self) -> None:
        """Polls of the unchanged 1,000-message folder on the kept connection."""
        polls = 100 if self.quick else 1000

        def logins() -> int:
            text = self.dovecot.log_text()
            return text.count("imap-login: Info: Login: user=<folder>")

        def cpu_seconds() -> float:
            with open(f"/proc/{self.gateway_pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        first = self.session("gateway", "folder")  # the kept login, made before counting
        first.command(b"QUIT")
        first.close()
        before, cpu0 = logins(), cpu_seconds()
        samples = []

        def poll() -> None:
            t0 = time.perf_counter()
            client = self.session("gateway", "folder")
            client.command(b"STAT")
            client.command(b"QUIT")
            samples.append(time.perf_counter() - t0)
            client.close()

        for _ in range(polls):
            poll()
        cpu = cpu_seconds() - cpu0
        out = {
            "polls": polls,
            "upstream_logins_per_1000_polls": (logins() - before) * 1000 / polls,
            "poll_ms_median": 1000 * statistics.median(samples),
            "gateway_cpu_ms_per_poll": 1000 * cpu / polls,
        }
        self.results["kept_polls_1000"] = out
        if self.profile is not None:
            self.profile_polls(poll, polls)
        log(
            f"kept_polls_1000: {out['upstream_logins_per_1000_polls']:.0f} upstream logins "
            f"per 1,000 polls, poll {out['poll_ms_median']:.1f} ms, gateway CPU "
            f"{out['gateway_cpu_ms_per_poll']:.2f} ms per poll (incl. the device's TLS)"
        )

    def profile_polls(self, poll: Callable[[], None], polls: int) -> None:
        """py-spy on the gateway during more polls, not measured (py-spy slows it)."""
        assert self.profile is not None
        py_spy = find_py_spy(self.py_spy)
        if py_spy is None:
            log("--profile: py-spy not found (pip install py-spy, or pass --py-spy)")
            return
        self.profile.mkdir(parents=True, exist_ok=True)
        target = self.profile / "gateway-kept-polls.collapsed.txt"

        def polling() -> None:
            for _ in range(polls):
                poll()

        error = record_profile(py_spy, self.gateway_pid, target, polling, subprocesses=False)
        if error:
            log(f"  py-spy failed: {error}")
            return
        self.results["profile_kept_polls"] = hotspots(target)
        log(f"profile of the gateway during kept polls ({target}):")
        for line in self.results["profile_kept_polls"]:
            log("  " + line)

    def summarise(self) -> None:
        summary: dict[str, Any] = {}
        for key, rounds in self.results["rounds"].items():
            g = statistics.median(x["value"] for x in rounds["gateway"])
            d = statistics.median(x["value"] for x in rounds["direct"])
            entry: dict[str, Any] = {"gateway": g, "direct": d, "ratio": g / d}
            if key.startswith("retr"):
                entry.update(target=RETR_TARGET, passed=g / d >= RETR_TARGET)
                p = statistics.median(x["value"] for x in rounds["via_pop3"])
                entry.update(via_pop3=p, ratio_to_pop3_path=g / p)
            summary[key] = entry
        peaks = [
            p for r in self.results["rounds"]["retr_50m"]["gateway"] for p in r["peak_rss_added"]
        ]
        peaks.append(self.results["stalled_reader"]["peak_rss_added"])
        summary["retr_50m_rss"] = {
            "peak_added_mib": max(peaks) / MIB,
            "target_mib": RSS_TARGET_MIB,
            "passed": max(peaks) / MIB < RSS_TARGET_MIB,
        }
        self.results["summary"] = summary
        log("\nsummary:")
        for key, entry in summary.items():
            log(
                f"  {key:<14} "
                + "  ".join(
                    f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()
                )
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, 8 MiB instead of 50")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after measuring, profile the gateway with py-spy during more kept polls",
    )
    parser.add_argument("--py-spy", help="path of the py-spy binary (default: on PATH)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="imap-bench-"))
    try:
        results = Bench(args).run(base)
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    log(f"results written to {args.output}")


if __name__ == "__main__":
    main()
