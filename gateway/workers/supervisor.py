"""The parent of the worker processes: binds, spawns, restarts, forwards signals.

This is what twistd runs when `workers` is above one. It binds every
listening socket in `privilegedStartService`, which twistd calls before it
drops privileges with `--uid/--gid`, so low ports work as with one process;
the workers are started after that, as the unprivileged user, and adopt the
sockets (`gateway.workers.sockets`). The parent itself serves nothing: a
bug in serving code takes down one worker, which is started again (after a
pause that doubles while it keeps dying young), not the gateway.

A worker writes its log events to the parent as JSON lines on its standard
output; the parent publishes them to its own log observers, marked with the
worker's index and pid, so the gateway keeps one log, in the format `[log]`
asks for, wherever twistd writes it. A worker's standard input is a pipe
from the parent: when the parent dies however it dies (kill -9), the worker
sees the pipe close and stops.

SIGHUP is forwarded to every worker (each re-reads the configuration and
the certificate); stopping the parent (SIGTERM, systemctl stop) sends
SIGTERM to every worker and waits for them to finish, then SIGKILL after
`STOP_TIMEOUT`.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import ILogObserver, Logger, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

import gateway
from gateway.model import Config
from gateway.reload import ReloadOnHangup
from gateway.workers.role import WorkerRole, every_address
from gateway.workers.sockets import InheritedSocket, bind_listening

log = Logger(namespace="gateway.workers")

# A worker that dies is started again after RESTART_FIRST seconds, doubled
# for each death in a row up to RESTART_MAX; one that ran STABLE_AFTER
# seconds counts as healthy again.
RESTART_FIRST = 0.5
RESTART_MAX = 30.0
STABLE_AFTER = 10.0
# How long the workers get to close their sessions at stop before SIGKILL.
STOP_TIMEOUT = 20.0
# Events worker 0's metrics count (gateway.admin.events reads them) come
# from these namespaces; the supervisor's own do not count.
METRICS_NAMESPACES = (
    "gateway.pop3",
    "gateway.smtp",
    "gateway.penalties",
    "gateway.limits",
    "gateway.upstream",
)
# sysexits.h EX_CONFIG: a worker that exits with it (a configuration or
# state schema problem) would fail the same way again: not restarted.
EX_CONFIG = 78
# sysexits.h EX_TEMPFAIL: a worker that could not read the configuration
# file; retried, unless at the gateway's start (then: EX_CONFIG).
EX_TEMPFAIL = 75
# The log event a worker writes when its services have started.
STARTED_KEY = "worker_started"


def worker_command(config: Path, role: WorkerRole, sockets: Sequence[InheritedSocket]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gateway.workers.child",
        "--config",
        str(config),
        "--index",
        str(role.index),
        "--workers",
        str(role.count),
        *[arg for each in sockets for arg in ("--socket", each.describe())],
    ]


def worker_environment() -> dict[str, str]:
    """The parent's environment, with the directory `gateway` was imported
    from first on PYTHONPATH, so the worker runs the same code."""
    env = dict(os.environ)
    root = Path(gateway.__file__).resolve().parents[1]
    if root.name not in ("site-packages", "dist-packages"):
        # A checkout run in place (installed, the interpreter finds it anyway).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    return env


class WorkerOutput(ProcessProtocol):
    """One worker's pipes: JSON log events on stdout, anything else on stderr."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._out = b""
        self._err = b""

    def outReceived(self, data: bytes) -> None:
        self._out += data
        *lines, self._out = self._out.split(b"\n")
        for line in lines:
            self.worker.event_line(line)

    def errReceived(self, data: bytes) -> None:
        self._err += data
        *lines, self._err = self._err.split(b"\n")
        for line in lines:
            self.worker.stderr_line(line)

    def processEnded(self, reason: Failure) -> None:
        for line in (self._out, self._err):
            if line.strip():
                self.worker.stderr_line(line)
        self._out = self._err = b""
        self.worker.ended(reason)


class Worker:
    """One worker slot: the process in it now, and when to start the next."""

    def __init__(self, supervisor: WorkerSupervisor, role: WorkerRole) -> None:
        self.supervisor = supervisor
        self.role = role
        self.process: IProcessTransport | None = None
        self.pid: int | None = None
        self.started_at = 0.0
        self.started = False
        self.reload_pending = False
        self.launches = 0
        self.deaths = 0
        self.restart: IDelayedCall | None = None
        self._waiting: list[Deferred[None]] = []

    @property
    def running(self) -> bool:
        return self.process is not None

    def spawn(self) -> None:
        self.restart = None
        supervisor = self.supervisor
        sockets = supervisor.sockets_for(self.role)
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        child_fds.update({each.fd: each.fd for each in sockets})
        self.started = False
        # A new process reads the file as it is now.
        self.reload_pending = False
        self.launches += 1
        self.started_at = supervisor.reactor.seconds()
        try:
            self.process = supervisor.spawn(
                WorkerOutput(self),
                sys.executable,
                worker_command(supervisor.config_path, self.role, sockets),
                env=worker_environment(),
                childFDs=child_fds,
            )
        except OSError as e:
            # The interpreter cannot be run as the user twistd switched to, say.
            log.critical(
                "worker {worker} cannot be started ({executable}): {error}",
                worker=self.role.index,
                executable=sys.executable,
                error=str(e),
            )
            self._failed_start()
            return
        self.pid = self.process.pid
        log.info(
            "worker {worker} of {workers} starting, pid {pid}",
            worker=self.role.index,
            workers=self.role.count,
            pid=self.pid,
        )

    def reload(self) -> bool:
        """SIGHUP now if the worker has started, else once it has."""
        if self.process is None:
            return False
        if not self.started:
            self.reload_pending = True
            return False
        return self.signal("HUP")

    def signal(self, name: str) -> bool:
        if self.process is None:
            return False
        try:
            self.process.signalProcess(name)
        except (ProcessExitedAlready, OSError):
            return False
        return True

    def when_ended(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.process is None:
            d.callback(None)
        else:
            self._waiting.append(d)
        return d

    def event_line(self, line: bytes) -> None:
        try:
            event = eventFromJSON(line.decode("utf-8", "replace"))
        except ValueError:
            event = None
        if not isinstance(event, dict):
            self.stderr_line(line)
            return
        event["worker"] = self.role.index
        event["worker_pid"] = self.pid
        level = event.get("log_level")
        event["log_system"] = "{namespace}#{level} worker {worker} pid {pid}".format(
            namespace=event.get("log_namespace", "-"),
            level=getattr(level, "name", "-"),
            worker=self.role.index,
            pid=self.pid,
        )
        self.supervisor.publish(event)
        if event.get(STARTED_KEY):
            self.started = True
            if self.reload_pending:
                self.reload_pending = False
                self.signal("HUP")
        if self.role.index != 0:
            self.supervisor.to_metrics(line, event)

    def stderr_line(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip()
        if text:
            log.error(
                "worker {worker} pid {pid}: {output}",
                worker=self.role.index,
                pid=self.pid,
                output=text,
            )

    def ended(self, reason: Failure) -> None:
        pid, self.process = self.pid, None
        supervisor = self.supervisor
        lived = supervisor.reactor.seconds() - self.started_at
        how = _exit_description(reason)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        if supervisor.stopping:
            log.info(
                "worker {worker} pid {pid} stopped: {how}", worker=self.role.index, pid=pid, how=how
            )
            return
        status = getattr(reason.value, "exitCode", None)
        if status == EX_TEMPFAIL and self.launches == 1:
            status = EX_CONFIG
        if status == EX_CONFIG or (not self.started and self.launches == 1):
            log.critical(
                "worker {worker} pid {pid} could not start ({how}); stopping the gateway",
                worker=self.role.index,
                pid=pid,
                how=how,
            )
            supervisor.give_up(status if isinstance(status, int) and status > 0 else 1)
            return
        self.deaths = 0 if lived >= STABLE_AFTER else self.deaths + 1
        delay = self._restart_later()
        log.error(
            "worker {worker} pid {pid} died after {lived:.1f}s ({how}); restarting in {delay}s",
            worker=self.role.index,
            pid=pid,
            lived=lived,
            how=how,
            delay=delay,
        )

    def _restart_later(self) -> float:
        delay: float = min(RESTART_MAX, RESTART_FIRST * 2.0 ** max(0, self.deaths - 1))
        self.restart = self.supervisor.reactor.callLater(delay, self.spawn)
        return delay

    def _failed_start(self) -> None:
        if self.launches == 1:
            self.supervisor.give_up(1)
        elif not self.supervisor.stopping:
            self.deaths += 1
            self._restart_later()


def leave(status: int) -> None:
    """End the supervisor with `status` (twistd itself exits 0 whenever its
    reactor stopped), after writing out what its log still holds."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def _exit_description(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exit 0"
    signal_number = getattr(value, "signal", None)
    if signal_number is not None:
        return f"signal {signal_number}"
    return f"exit {getattr(value, 'exitCode', '?')}"


class WorkerSupervisor(MultiService):
    """Holds the listening sockets and keeps `config.workers` workers running."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        *,
        spawn: Callable[..., IProcessTransport] | None = None,
        publisher: ILogObserver = globalLogPublisher,
        exit_failed: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        self.setName("workers")
        assert config.source is not None, "workers read the configuration from its file"
        self.config = config
        self.config_path = config.source
        self.reactor = reactor
        self.spawn = spawn or (lambda *args, **kw: reactor.spawnProcess(*args, **kw))
        self.publish = publisher
        self._exit_failed = exit_failed or self._exit_after_shutdown
        self.failed = False
        self.stopping = False
        self._sockets: dict[tuple[str, int], socket.socket] = {}
        self.workers = [Worker(self, WorkerRole(i, config.workers)) for i in range(config.workers)]
        ReloadOnHangup(reactor, self.reload).setServiceParent(self)

    def privilegedStartService(self) -> None:
        for address, port in every_address(self.config):
            try:
                self._sockets[(address, port)] = bind_listening(address, port)
            except OSError as e:
                self._close_sockets()
                log.critical(
                    "cannot listen on {address}:{port}: {error}",
                    address=address,
                    port=port,
                    error=str(e),
                )
                print(f"gateway: cannot listen on {address}:{port}: {e}", file=sys.stderr)
                raise SystemExit(1) from None
        super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        log.info(
            "{count} worker processes on {sockets} listening sockets",
            count=len(self.workers),
            sockets=len(self._sockets),
        )
        # Once the reactor runs: it reaps the children it spawned from then on.
        self.reactor.callWhenRunning(self._spawn_all)

    def _spawn_all(self) -> None:
        for worker in self.workers:
            if not self.stopping and not worker.running:
                worker.spawn()

    def sockets_for(self, role: WorkerRole) -> list[InheritedSocket]:
        return [
            InheritedSocket(address, port, self._sockets[(address, port)].fileno())
            for address, port in role.addresses(self.config)
        ]

    def to_metrics(self, line: bytes, event: dict[str, Any]) -> None:
        """Give worker 0, which serves the admin listener, another worker's
        event for its metrics (on its standard input). While worker 0 is
        being restarted, events are not counted."""
        if self.config.admin is None:
            return
        namespace = event.get("log_namespace") or ""
        if not namespace.startswith(METRICS_NAMESPACES):
            return
        sink = self.workers[0].process
        if sink is not None:
            sink.write(line + b"\n")

    def reload(self) -> None:
        """SIGHUP: every worker re-reads the configuration and the certificate.

        A worker still starting may have read the file before the change and
        not yet listen for SIGHUP: it gets its SIGHUP once it has started."""
        sent = [w.pid for w in self.workers if w.reload()]
        log.info("reload: SIGHUP sent to {count} workers (pids {pids})", count=len(sent), pids=sent)

    def give_up(self, status: int) -> None:
        """A worker failed at its first start, or found a problem restarting
        cannot fix (its log says which): stop the gateway, which exits with
        the worker's status as one process would have (1, or 78 for a
        configuration problem, which systemd's RestartPreventExitStatus=78
        keeps from restarting)."""
        if self.failed:
            return
        self.failed = True
        self._exit_failed(status)
        if not self.stopping and self.reactor.running:
            self.reactor.stop()

    def _exit_after_shutdown(self, status: int) -> None:
        self.reactor.addSystemEventTrigger("after", "shutdown", leave, status)

    def stopService(self) -> Deferred[Any]:
        self.stopping = True
        for worker in self.workers:
            if worker.restart is not None and worker.restart.active():
                worker.restart.cancel()
            worker.restart = None
            worker.signal("TERM")
        ended = DeferredList([w.when_ended() for w in self.workers])
        kill = self.reactor.callLater(STOP_TIMEOUT, self._kill_all)
        d: Deferred[Any] = Deferred()

        def done(_: object) -> None:
            if kill.active():
                kill.cancel()
            self._close_sockets()
            super(WorkerSupervisor, self).stopService()
            d.callback(None)

        ended.addBoth(done)
        return d

    def _kill_all(self) -> None:
        for worker in self.workers:
            if worker.signal("KILL"):
                log.warn(
                    "worker {worker} pid {pid} did not stop in time: killed",
                    worker=worker.role.index,
                    pid=worker.pid,
                )

    def _close_sockets(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()
