"""POP3 session rate through an OAuth2 account (cached token) vs a password account.

    python bench/oauth_bench.py            # 5 rounds per side, about two minutes
    python bench/oauth_bench.py --quick    # 1 round, short windows (smoke run)

The claim measured: token handling is off the hot path. A device login on an
OAuth2 account costs the gateway one `stat` of the account's token file and a
dictionary lookup; refreshes happen in the background. So full sessions
through an OAuth2 account should run within 10% of the same sessions through a
password account.

Set-up, all on loopback: the real gateway (`twistd -n gateway`), a real
Dovecot whose oauth2 passdb introspects tokens at the test authorization
server, and that server as a child process. Dovecot runs with its auth cache
on (`auth_cache_size`), which caches token validations as it caches password
checks: without it, every token login costs Dovecot an HTTP introspection
that a password login does not, a cost of this test upstream and not of the
gateway (Microsoft and Google validate their tokens locally). Dovecot is also
measured directly, with PLAIN and with XOAUTH2, so the upstream's own
difference shows next to the gateway's.

A session: TCP connect, TLS handshake (no resumption), greeting, login, STAT,
UIDL, QUIT, on a mailbox of 10 messages; each client has its own device,
account and mailbox (the gateway allows one session per account). Sides
alternate within every round, and the table shows medians. The benchmark
also fails loudly if any refresh request reaches the authorization server
while it measures (the tokens must come from the cache), and reports the
in-process cost of one cached `access_token()` call.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from argon2 import PasswordHasher  # noqa: E402

from bench.common import BENCH_LIMITS  # noqa: E402
from gateway.model import OAuthSettings  # noqa: E402
from gateway.oauth.keys import load_key  # noqa: E402
from gateway.oauth.store import TokenRecord, TokenStore  # noqa: E402
from gateway.oauth.tokens import parse_token_response  # noqa: E402
from tests.harness.certs import make_tls_material  # noqa: E402
from tests.harness.dovecot import Dovecot  # noqa: E402
from tests.harness.gateway_process import GatewayProcess, free_port  # noqa: E402
from tests.harness.oauth_server import DEVICE_GRANT, OAuthServerProcess  # noqa: E402

CLIENT_SECRET = "bench-client-secret"
MESSAGES = 10
RESULTS = Path(__file__).resolve().with_name("results-oauth.json")
SIDES = ("gateway-password", "gateway-oauth", "direct-password", "direct-oauth")
TARGET = 0.90  # oauth / password session rate through the gateway


class CachingDovecot(Dovecot):
    """The test harness's Dovecot with its auth cache on (see the module doc)."""

    def render_config(self) -> str:
        return super().render_config() + (
            "auth_cache_size = 10M\nauth_cache_ttl = 1 hour\nauth_cache_negative_ttl = 0\n"
        )


class ProtocolError(Exception):
    pass


class Session:
    """One POP3S session on a raw ssl socket, TCP_NODELAY, like the POP3 benchmark."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.buf = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ProtocolError("connection closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def ok(self, command: bytes | None = None) -> bytes:
        if command is not None:
            self.sock.sendall(command + b"\r\n")
        line = self.line()
        if not line.startswith(b"+"):
            raise ProtocolError(line.decode(errors="replace"))
        return line

    def multi(self, command: bytes) -> bytes:
        self.ok(command)
        while not self.buf.endswith(b"\r\n.\r\n"):
            self.buf += self.sock.recv(65536)
        body, self.buf = self.buf, b""
        return body

    def close(self) -> None:
        self.sock.close()


Login = Callable[[Session], None]


def user_pass(user: str, password: str) -> Login:
    def login(s: Session) -> None:
        s.ok(b"USER " + user.encode())
        s.ok(b"PASS " + password.encode())

    return login


def xoauth2(user: str, token: str) -> Login:
    response = base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())

    def login(s: Session) -> None:
        s.ok(b"AUTH XOAUTH2")  # two-step: a real token does not fit on the line
        s.ok(response)

    return login


def full_session(port: int, context: ssl.SSLContext, login: Login) -> None:
    s = Session(port, context)
    try:
        s.ok()
        login(s)
        if int(s.ok(b"STAT").split()[1]) != MESSAGES:
            raise ProtocolError("wrong message count")
        if s.multi(b"UIDL").count(b"\r\n") != MESSAGES + 1:
            raise ProtocolError("wrong UIDL listing")
        s.ok(b"QUIT")
    finally:
        s.close()


def rate(
    port: int, context: ssl.SSLContext, logins: list[Login], warmup: float, window: float
) -> tuple[float, float]:
    """Sessions per second by len(logins) closed-loop clients; and median latency (ms)."""
    start = time.monotonic() + 0.05
    opens, ends = start + warmup, start + warmup + window
    done: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(login: Login) -> None:
        while time.monotonic() < start:
            time.sleep(0.001)
        while (began := time.monotonic()) < ends:
            try:
                full_session(port, context, login)
            except (OSError, ProtocolError) as e:
                errors.append(str(e))
                return
            finished = time.monotonic()
            if opens <= finished < ends:
                with lock:
                    done.append(finished - began)

    threads = [threading.Thread(target=client, args=(login,)) for login in logins]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise ProtocolError(f"{len(errors)} failed sessions, first: {errors[0]}")
    return len(done) / window, 1000 * statistics.median(done)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def interleaved(
    port: int, context: ssl.SSLContext, logins: dict[str, Login], pid: int, rounds: int, block: int
) -> dict[str, dict[str, float]]:
    """Gateway CPU and wall time per session, sides alternating block by block.

    CPU time of the gateway process is the least noisy measure on a shared
    machine: other load stretches wall time, not the gateway's own work.
    """
    cpu: dict[str, list[float]] = {side: [] for side in logins}
    wall: dict[str, list[float]] = {side: [] for side in logins}
    sides = list(logins)
    for r in range(rounds):
        for side in sides if r % 2 == 0 else reversed(sides):
            before = process_cpu(pid)
            for _ in range(block):
                began = time.perf_counter()
                full_session(port, context, logins[side])
                wall[side].append(time.perf_counter() - began)
            cpu[side].append((process_cpu(pid) - before) / block)
    return {
        side: {
            "gateway_cpu_ms_per_session": 1000 * statistics.median(cpu[side]),
            "median_wall_ms": 1000 * statistics.median(wall[side]),
        }
        for side in sides
    }


def post_form(url: str, fields: dict[str, str]) -> dict[str, Any]:
    data = urllib.parse.urlencode(fields).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=10) as r:
        answer: dict[str, Any] = json.loads(r.read())
        return answer


def onboard(idp: OAuthServerProcess, username: str) -> dict[str, Any]:
    """What `gateway oauth authorize` obtains with the device grant."""
    client = {"client_id": "gateway", "client_secret": CLIENT_SECRET}
    start = post_form(f"{idp.url}/device", {**client, "scope": "mail offline_access"})
    idp.control("approve", user_code=start["user_code"], username=username)
    return post_form(
        f"{idp.url}/token",
        {**client, "grant_type": DEVICE_GRANT, "device_code": start["device_code"]},
    )


def gateway_config(
    base: Path,
    port: int,
    dovecot: Dovecot,
    tls_up: Any,
    tls_gw: Any,
    idp: OAuthServerProcess,
    clients: int,
) -> str:
    secret = base / "client-secret"
    secret.write_text(CLIENT_SECRET)
    secret.chmod(0o600)
    hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    lines = [
        f'state_dir = "{base / "state"}"',
        f'[tls]\ncertificate = "{tls_gw.certificate}"\nprivate_key = "{tls_gw.private_key}"',
        f'[[pop3.listen]]\naddress = "127.0.0.1"\nport = {port}\ntls = "implicit"',
        BENCH_LIMITS,
        "[providers.dovecot]",
        f'pop3 = {{ host = "localhost", port = {dovecot.pop3s_port}, tls = "implicit" }}',
        f'ca_file = "{tls_up.ca_file}"',
        'sasl = "xoauth2"',
        f'oauth = {{ token_url = "{idp.url}/token", device_authorization_url = '
        f'"{idp.url}/device", client_id = "gateway", client_secret_file = "{secret}", '
        'scopes = ["mail", "offline_access"] }',
    ]
    for n in range(clients):
        lines += [
            f'[accounts.pw{n}]\nprovider = "dovecot"\nusername = "pw{n}"\npassword = "pw{n}-pw"',
            f'[accounts.tk{n}]\nprovider = "dovecot"\nusername = "tk{n}"\nauth = "oauth2"',
        ]
        for account in (f"pw{n}", f"tk{n}"):
            lines.append(
                f'[devices.{account}-dev]\npassword_hash = "{hasher.hash("device-pw")}"\n'
                f'account = "{account}"\nallow_from = ["127.0.0.0/8"]'
            )
    return "\n".join(lines) + "\n"


def cached_access_token_cost(state: Path, config_path: Path) -> float:
    """Microseconds per cached `access_token()` call, in-process, file stat included."""
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import Clock

    from gateway.config import load_config
    from gateway.oauth.manager import TokenManager

    config = load_config(config_path)
    clock = Clock()
    clock.advance(time.time())
    store = TokenStore.open(state, load_key(OAuthSettings(), state, environ={}))
    manager = TokenManager(config, clock=clock, store=store)
    account = config.accounts["tk0"]
    calls = 20000
    began = time.perf_counter()
    for _ in range(calls):
        d = ensureDeferred(manager.access_token(account))
        assert d.called
    return 1e6 * (time.perf_counter() - began) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, short windows")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=float, default=3.0, help="seconds counted per run")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    rounds, window, warmup = (1, 1.5, 0.3) if args.quick else (args.rounds, args.window, 0.5)
    most = max(args.clients)

    work = Path(tempfile.mkdtemp(prefix="oauth-bench-"))
    tls_up, tls_gw = make_tls_material(work / "tls-up"), make_tls_material(work / "tls-gw")
    users = {f"{kind}{n}": f"{kind}{n}-pw" for n in range(most) for kind in ("pw", "tk")}
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
        "python": platform.python_version(),
        "rounds": rounds,
        "window_s": window,
        "note": "shared machine: other work may run at the same time",
        "runs": {},
    }
    idp = OAuthServerProcess(work / "idp", client_secret=CLIENT_SECRET)
    idp.start()
    dovecot = CachingDovecot(
        work / "dovecot", users, tls=tls_up, oauth2_introspection_url=f"{idp.url}/introspect"
    )
    gateway: GatewayProcess | None = None
    try:
        dovecot.start()
        for user in users:
            for i in range(MESSAGES):
                dovecot.deliver(user, f"Subject: {i}\n\n{'x' * 2000}\n".encode())
        port = free_port()
        (work / "gateway").mkdir()
        gateway = GatewayProcess(
            work / "gateway",
            gateway_config(work / "gateway", port, dovecot, tls_up, tls_gw, idp, most),
            [port],
        )
        gateway.start()
        state = work / "gateway" / "state"
        store = TokenStore.open(state, load_key(OAuthSettings(), state, environ={}))
        tokens: dict[str, str] = {}
        for n in range(most):
            answer = onboard(idp, f"tk{n}")
            tokens[f"tk{n}"] = answer["access_token"]
            record = TokenRecord.authorized(
                f"tk{n}", "device_code", parse_token_response(answer, time.time()), time.time()
            )
            store.update(f"tk{n}", lambda _, record=record: record)
        ctx_gw = ssl.create_default_context(cafile=str(tls_gw.ca_file))
        ctx_up = ssl.create_default_context(cafile=str(tls_up.ca_file))

        def side_logins(side: str, clients: int) -> tuple[int, ssl.SSLContext, list[Login]]:
            kind = "pw" if side.endswith("password") else "tk"
            names = [f"{kind}{n}" for n in range(clients)]
            if side.startswith("gateway"):
                return port, ctx_gw, [user_pass(f"{u}-dev", "device-pw") for u in names]
            assert dovecot.pop3s_port is not None
            if kind == "pw":
                return dovecot.pop3s_port, ctx_up, [user_pass(u, f"{u}-pw") for u in names]
            return dovecot.pop3s_port, ctx_up, [xoauth2(u, tokens[u]) for u in names]

        # Warm every path once: device password check, Dovecot's auth cache.
        for side in SIDES:
            p, c, logins = side_logins(side, most)
            for login in logins:
                full_session(p, c, login)
        refreshes_before = idp.count("token:refresh_token")
        introspections_before = idp.count("introspect")

        for clients in args.clients:
            samples: dict[str, list[tuple[float, float]]] = {s: [] for s in SIDES}
            for r in range(rounds):
                order = SIDES if r % 2 == 0 else tuple(reversed(SIDES))
                for side in order:
                    p, c, logins = side_logins(side, clients)
                    samples[side].append(rate(p, c, logins, warmup, window))
                    print(
                        f"  clients={clients} round={r + 1} {side}: {samples[side][-1][0]:.1f}/s",
                        file=sys.stderr,
                        flush=True,
                    )
            run = {
                side: {
                    "rate": statistics.median(x for x, _ in values),
                    "median_latency_ms": statistics.median(y for _, y in values),
                    "rates": [round(x, 1) for x, _ in values],
                }
                for side, values in samples.items()
            }
            gw_pw, gw_tk = run["gateway-password"], run["gateway-oauth"]
            d_pw, d_tk = run["direct-password"], run["direct-oauth"]
            run["ratio_gateway_oauth_vs_password"] = gw_tk["rate"] / gw_pw["rate"]
            run["ratio_direct_oauth_vs_password"] = d_tk["rate"] / d_pw["rate"]
            run["gateway_added_ms_password"] = (
                gw_pw["median_latency_ms"] - d_pw["median_latency_ms"]
            )
            run["gateway_added_ms_oauth"] = gw_tk["median_latency_ms"] - d_tk["median_latency_ms"]
            results["runs"][str(clients)] = run

        assert gateway.process is not None
        blocks = (2, 20) if args.quick else (10, 50)
        cpu = interleaved(
            port,
            ctx_gw,
            {
                "gateway-password": user_pass("pw0-dev", "device-pw"),
                "gateway-oauth": user_pass("tk0-dev", "device-pw"),
            },
            gateway.process.pid,
            *blocks,
        )
        results["interleaved"] = {
            **cpu,
            "ratio_cpu_oauth_vs_password": cpu["gateway-oauth"]["gateway_cpu_ms_per_session"]
            / cpu["gateway-password"]["gateway_cpu_ms_per_session"],
            "ratio_wall_oauth_vs_password": cpu["gateway-oauth"]["median_wall_ms"]
            / cpu["gateway-password"]["median_wall_ms"],
        }
        results["refresh_requests_while_measuring"] = (
            idp.count("token:refresh_token") - refreshes_before
        )
        results["introspections_while_measuring"] = idp.count("introspect") - introspections_before
        results["cached_access_token_us"] = cached_access_token_cost(
            state, work / "gateway" / "gateway.toml"
        )
    finally:
        if gateway is not None:
            gateway.stop()
        dovecot.stop()
        idp.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'clients':>7} {'side':<18} {'sessions/s':>10} {'median ms':>9}")
    for clients, run in results["runs"].items():
        for side in SIDES:
            print(
                f"{clients:>7} {side:<18} {run[side]['rate']:>10.1f} "
                f"{run[side]['median_latency_ms']:>9.1f}"
            )
        ratio = run["ratio_gateway_oauth_vs_password"]
        verdict = "ok" if ratio >= TARGET else "BELOW TARGET"
        print(
            f"{clients:>7} gateway oauth/password = {ratio:.3f} (target >= {TARGET}): "
            f"{verdict}; direct oauth/password = {run['ratio_direct_oauth_vs_password']:.3f}; "
            f"gateway adds {run['gateway_added_ms_password']:.1f} ms (password), "
            f"{run['gateway_added_ms_oauth']:.1f} ms (oauth)"
        )
    inter = results["interleaved"]
    for side in ("gateway-password", "gateway-oauth"):
        print(
            f"interleaved {side:<17} gateway CPU "
            f"{inter[side]['gateway_cpu_ms_per_session']:.2f} ms/session, "
            f"median wall {inter[side]['median_wall_ms']:.1f} ms"
        )
    print(
        f"interleaved oauth/password: gateway CPU {inter['ratio_cpu_oauth_vs_password']:.3f},"
        f" wall {inter['ratio_wall_oauth_vs_password']:.3f}"
    )
    print(
        f"refresh requests while measuring: {results['refresh_requests_while_measuring']}; "
        f"introspections: {results['introspections_while_measuring']}; "
        f"cached access_token(): {results['cached_access_token_us']:.1f} us"
    )
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.output}")
    return 0 if results["refresh_requests_while_measuring"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
