"""What the POP3, IMAP and Graph benchmarks share: the test messages, the memory
probe, the device password, the run's context and the poll timing.

They compare the gateway with Dovecot's own POP3 (or one mailbox back end with
another) on the same messages, so the messages (and their expected RETR wire
form) must be generated the same way; they read the gateway's peak RSS from
/proc, record the machine's state and time a poll the same way, so that their
results files can be read side by side.
"""

from __future__ import annotations

import base64
import contextlib
import os
import platform
import random
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from argon2 import PasswordHasher

KIB = 1024
MB = 1_000_000
MIB = 1024 * 1024
DEVICE_PASSWORD = "device-pw"
# Every benchmark client connects from 127.0.0.1, far past what [limits] lets
# one address hold by default: out of the way, as for devices behind one NAT.
BENCH_LIMITS = (
    "[limits]\nmax_connections = 100000\nmax_connections_per_address = 100000\n"
    "max_sessions_per_device = 100000\nmax_session_lifetime = 86400"
)


# -- messages ------------------------------------------------------------------------------


def make_message(seed: int, wire_size: int) -> bytes:
    """An LF message whose CRLF wire form is about ``wire_size`` bytes; every
    50th body line starts with a dot, so dot-stuffing is exercised."""
    rng = random.Random(seed)
    header = (
        f"From: bench@example.com\nTo: box@example.com\nSubject: bench message {seed}\n"
        f"Message-ID: <{seed}.bench@example.com>\n\n"
    ).encode()
    n_lines = max(1, (wire_size - len(header)) // 78)
    text = base64.b64encode(rng.randbytes(n_lines * 57))
    lines = [text[i : i + 76] for i in range(0, len(text), 76)]
    for i in range(0, len(lines), 50):
        lines[i] = b"." + lines[i][1:]
    return header + b"\n".join(lines) + b"\n"


def wire_form(message_lf: bytes) -> bytes:
    """What RETR sends after its +OK line: CRLF, dot-stuffed, terminated."""
    data = message_lf.replace(b"\n", b"\r\n").replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"


# -- memory -----------------------------------------------------------------------------------


def proc_status(pid: int, key: str) -> int:
    """A /proc/PID/status field in bytes (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * KIB
    raise KeyError(key)


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak RSS of a process from now on: VmHWM after a reset, or sampling."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = proc_status(pid, "VmRSS")
        self._hwm = reset_peak_rss(pid)
        self._peak = self.before
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self._hwm:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            with contextlib.suppress(OSError):
                self._peak = max(self._peak, proc_status(self.pid, "VmRSS"))

    def added(self) -> int:
        """Peak RSS minus RSS at construction, in bytes."""
        if self._hwm:
            return proc_status(self.pid, "VmHWM") - self.before
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        return self._peak - self.before


# -- the run -------------------------------------------------------------------------------


def log(text: str) -> None:
    print(text, flush=True)


def device_password_hash() -> str:
    """DEVICE_PASSWORD hashed cheaply: the benchmarks measure mail, not argon2."""
    return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(DEVICE_PASSWORD)


def run_info(quick: bool, rounds: int) -> dict[str, Any]:
    """What a reader of the results needs to judge them: the machine may be
    shared, so the load average is recorded too (again after the run)."""
    return {
        "mode": "quick" if quick else "full",
        "rounds_per_side": rounds,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_before": os.getloadavg(),
    }


class POP3Session(Protocol):
    def command(self, line: bytes) -> bytes: ...

    def close(self) -> None: ...


def poll_ms(session: Callable[[], POP3Session], samples: int) -> dict[str, Any]:
    """A device's poll, timed `samples` times: connect, TLS, login (in
    `session`), STAT, QUIT; the median in milliseconds, and every sample."""
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        client = session()
        client.command(b"STAT")
        client.command(b"QUIT")
        times.append(time.perf_counter() - t0)
        client.close()
    return {"value": 1000 * statistics.median(times), "samples_ms": times}


# -- the POP3 benchmark client -------------------------------------------------------------

RECV_SIZE = 1 << 18


class ProtocolError(Exception):
    pass


_RETR_BUFFERS = threading.local()


def _retr_buffer(size: int) -> bytearray:
    """A per-thread receive buffer, reused so that RETR does not page-fault
    a fresh 50 MiB allocation in every run."""
    buffer = getattr(_RETR_BUFFERS, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _RETR_BUFFERS.buffer = bytearray(size)
    return buffer


class POP3Client:
    """A POP3S client on a raw ssl socket (TCP_NODELAY, recv_into a buffer),
    so that the client's own cost stays small beside what it measures."""

    def __init__(self, port: int, context: ssl.SSLContext, timeout: float = 120.0) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock = context.wrap_socket(raw, server_hostname="localhost")
        except BaseException:
            raw.close()
            raise
        self.buf = bytearray()
        self._rbuf = bytearray(RECV_SIZE)
        self._rview = memoryview(self._rbuf)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _fill(self) -> None:
        n = self.sock.recv_into(self._rbuf)
        if not n:
            raise ConnectionError("server closed the connection")
        self.buf += self._rview[:n]

    def readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            self._fill()

    def ok(self) -> bytes:
        line = self.readline()
        if not line.startswith(b"+OK"):
            raise ProtocolError(line.decode(errors="replace"))
        return line

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.ok()

    def login(self, user: str, password: str) -> None:
        self.ok()  # greeting
        self.command(b"USER " + user.encode())
        self.command(b"PASS " + password.encode())

    def multi(self, line: bytes) -> bytes:
        """A multi-line command; returns the body with its terminator."""
        self.command(line)
        while not (self.buf.endswith(b"\r\n.\r\n") or self.buf == b".\r\n"):
            self._fill()
        body, self.buf = bytes(self.buf), bytearray()
        return body

    def retr(
        self,
        number: int,
        expected: bytes,
        pause_after: int = 0,
        pause: float = 0.0,
        on_pause: Callable[[], None] | None = None,
    ) -> None:
        """RETR into a preallocated buffer and compare with the expected wire bytes.

        A stuffed body cannot contain CRLF.CRLF before its end and the server
        sends nothing after it, so checking the end of the data is enough.
        """
        self.sock.sendall(b"RETR %d\r\n" % number)
        self.ok()
        capacity = len(expected) + RECV_SIZE
        target = _retr_buffer(capacity)
        view = memoryview(target)[:capacity]
        pos = len(self.buf)
        view[:pos] = self.buf
        self.buf = bytearray()
        paused = pause_after == 0
        while pos < 5 or target[pos - 5 : pos] != b"\r\n.\r\n":
            if pos >= capacity:
                raise ProtocolError(f"RETR {number}: more than {len(expected)} bytes")
            if not paused and pos >= pause_after:
                paused = True
                time.sleep(pause)
                if on_pause is not None:
                    on_pause()
            n = self.sock.recv_into(view[pos:], min(RECV_SIZE, capacity - pos))
            if not n:
                raise ConnectionError(f"RETR {number}: closed after {pos} bytes")
            pos += n
        if pos != len(expected) or not target.startswith(expected):
            raise ProtocolError(
                f"RETR {number}: {pos} bytes differ from the expected {len(expected)}"
            )


# -- profiles (py-spy) ----------------------------------------------------------------------


_IDLE_LEAVES = ("Condition.wait", "_worker (concurrent", "Thread._bootstrap")


def hotspots(collapsed: Path, top: int = 15) -> list[str]:
    """Self and inclusive hotspots of a py-spy "raw" (collapsed stacks) profile,
    as shares of the samples where the gateway was not idle; idle = thread-pool
    workers waiting and the reactor in epoll_wait (doPoll as the leaf frame)."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    busy = idle = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [f.rsplit(":", 1)[0] + ")" if ":" in f else f for f in stack.split(";")]
        leaf = frames[-1]
        if leaf.startswith("untilConcludes") and len(frames) > 1:
            # Twisted wraps its socket calls: name the syscall, not the wrapper.
            caller = frames[-2].split(" ", 1)[0]
            leaf = frames[-1] = f"syscall in {caller} (send/recv)"
        if leaf.startswith(_IDLE_LEAVES) or leaf.startswith("EPollReactor.doPoll"):
            idle += n
            continue
        busy += n
        own[leaf] = own.get(leaf, 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    if not busy:
        return ["no busy samples"]
    lines = [f"{busy} busy samples ({idle} idle); self time:"]
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * n / busy:5.1f}%  {frame}")
    lines.append("inclusive time of gateway code and a few Twisted/pyOpenSSL entry points:")
    watch = (
        "gateway/",
        "do_handshake",
        "Logger.emit",
        "_makeContext",
        "HostnameEndpoint.connect",
        "writeSomeData",
        "_flushReceiveBIO",
        "_flushSendBIO",
    )
    picked = [kv for kv in inclusive.items() if any(w in kv[0] for w in watch)]
    for frame, n in sorted(picked, key=lambda kv: -kv[1])[: top * 2]:
        lines.append(f"  {100 * n / busy:5.1f}%  {frame}")
    return lines


def find_py_spy(explicit: str | None) -> str | None:
    candidates = [explicit, shutil.which("py-spy"), str(Path(sys.executable).with_name("py-spy"))]
    return next((c for c in candidates if c and Path(c).exists()), None)


def record_profile(
    py_spy: str, pid: int, target: Path, action: Callable[[], object], *, subprocesses: bool
) -> str | None:
    """py-spy samples process `pid` (and its worker processes) while `action()`
    runs; the collapsed stacks go to `target`. None, or what py-spy said when
    it failed. py-spy slows the process down: profiled runs are not measured."""
    spy = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(target),
            *(["--subprocesses"] if subprocesses else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)  # attach
    action()
    spy.send_signal(signal.SIGINT)
    _, err = spy.communicate(timeout=60)
    if not target.exists():
        return err.decode(errors="replace")[-500:]
    return None


def discarding_sink(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The suite's aiosmtpd sink (`tests.harness.smtp_sink --discard`) in a child
    process, as the upstream Dovecot's submission service relays to; returns
    the process and its port once it listens."""
    from tests.harness.gateway_process import free_port

    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.harness.smtp_sink",
            "--dir",
            str(directory),
            "--port",
            str(port),
            "--discard",
        ],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    process.stdout.readline()  # it says when it listens
    return process, port
