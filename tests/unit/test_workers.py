"""Worker processes without processes: the `workers` key, what each worker
serves, the supervisor's restarts, signals and stop (spawning faked, time on a
test clock), and the endpoints that adopt an inherited socket."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.error import CannotListenError, ProcessDone, ProcessTerminated
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from gateway.config import ConfigError, load_config
from gateway.config.workers import cores
from gateway.model import Config
from gateway.service import make_service
from gateway.smtp.service import SpoolService
from gateway.workers import sockets
from gateway.workers.role import WorkerRole, every_address
from gateway.workers.sockets import InheritedSocket, bind_listening, server_endpoint
from gateway.workers.supervisor import (
    EX_CONFIG,
    EX_TEMPFAIL,
    RESTART_FIRST,
    STABLE_AFTER,
    STOP_TIMEOUT,
    WorkerOutput,
    WorkerSupervisor,
)
from tests.helpers.log_lines import captured_log
from tests.unit.test_service import write_config

# -- the configuration key -----------------------------------------------------------


def with_workers(tmp_path: Path, line: str | None) -> Path:
    path = write_config(tmp_path)
    if line is not None:
        path.write_text(line + "\n" + path.read_text())
    return path


def test_one_worker_by_default_so_nothing_changes(tmp_path: Path) -> None:
    assert load_config(with_workers(tmp_path, None)).workers == 1


@pytest.mark.parametrize(("line", "expected"), [("workers = 3", 3), ('workers = "auto"', None)])
def test_workers_is_a_count_or_auto(tmp_path: Path, line: str, expected: int | None) -> None:
    assert load_config(with_workers(tmp_path, line)).workers == (expected or cores())


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("workers = 0", "workers: must be between 1 and 256 (got 0)"),
        ('workers = "many"', "workers: expected an integer or \"auto\", got 'many'"),
        ("workers = true", "workers: expected an integer, got a boolean"),
    ],
)
def test_a_bad_workers_value_is_a_problem(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(with_workers(tmp_path, line))
    assert [str(p) for p in caught.value.problems] == [message]


# -- what each worker serves --------------------------------------------------------


def test_every_worker_serves_pop3_and_smtp_worker_0_alone_admin(tmp_path: Path) -> None:
    path = with_workers(tmp_path, "workers = 2")
    path.write_text(path.read_text() + "\n[admin]\nport = 9925\n")
    config = load_config(path)
    first, second = WorkerRole(0, 2), WorkerRole(1, 2)
    devices = [("0.0.0.0", 9950), ("0.0.0.0", 5870)]
    assert first.addresses(config) == [*devices, ("127.0.0.1", 9925)]
    assert second.addresses(config) == devices
    assert every_address(config) == first.addresses(config)
    assert (first.describe(), second.describe()) == ("pop3+smtp+spool+admin", "pop3+smtp+spool")


def test_make_service_returns_the_supervisor_only_above_one_worker(tmp_path: Path) -> None:
    config = load_config(with_workers(tmp_path, "workers = 2"))
    reactor = MemoryReactorClock()
    assert isinstance(make_service(config, reactor), WorkerSupervisor)
    single = make_service(dataclasses.replace(config, workers=1), reactor)
    assert not isinstance(single, WorkerSupervisor)
    names = [s.name for s in single]
    assert "pop3-implicit-0.0.0.0-9950" in names and "smtp-spool" in names


def test_worker_1_builds_the_shared_spool_and_no_admin_listener(tmp_path: Path) -> None:
    path = with_workers(tmp_path, "workers = 2")
    path.write_text(path.read_text() + "\n[admin]\nport = 9925\n")
    config = load_config(path)
    tree = make_service(config, MemoryReactorClock(), worker=WorkerRole(1, 2))
    names = [s.name for s in tree]
    assert {"pop3-implicit-0.0.0.0-9950", "smtp-starttls-0.0.0.0-5870", "smtp-spool"} <= set(names)
    assert "admin" not in names
    spool = next(s for s in tree if isinstance(s, SpoolService))
    assert spool.spool.shared  # type: ignore[attr-defined]
    worker_0 = [s.name for s in make_service(config, MemoryReactorClock(), worker=WorkerRole(0, 2))]
    assert "admin" in worker_0


# -- the supervisor -------------------------------------------------------------------


class FakeProcess:
    def __init__(self, pid: int, proto: WorkerOutput, args: list[str], fds: dict[int, Any]) -> None:
        self.pid = pid
        self.proto = proto
        self.args = args
        self.fds = fds
        self.signals: list[str] = []
        self.written = b""

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def write(self, data: bytes) -> None:
        self.written += data

    def end(self, reason: Exception) -> None:
        self.proto.processEnded(Failure(reason))

    def log(self, line: str) -> None:
        self.proto.outReceived(line.encode() + b"\n")


class Harness:
    def __init__(self, config: Config) -> None:
        self.reactor = MemoryReactorClock()
        self.spawned: list[FakeProcess] = []
        self.events: list[dict[str, Any]] = []
        self.exits: list[int] = []
        self.supervisor = WorkerSupervisor(
            config,
            self.reactor,
            spawn=self.spawn,
            publisher=self.events.append,
            exit_failed=self.exit_failed,
        )

    def spawn(self, proto: WorkerOutput, executable: str, args: list[str], **kw: Any) -> Any:
        process = FakeProcess(1000 + len(self.spawned), proto, args, kw["childFDs"])
        self.spawned.append(process)
        proto.makeConnection(process)  # type: ignore[arg-type]
        return process

    def exit_failed(self, status: int) -> None:
        self.exits.append(status)

    def begin(self) -> None:
        """Start the supervisor as twistd does, then run the reactor's start hooks."""
        self.supervisor.privilegedStartService()
        self.supervisor.startService()
        self.reactor.running = True
        for hook, args, kwargs in self.reactor.whenRunningHooks:
            hook(*args, **kwargs)

    def start(self) -> None:
        """Begin, and every worker reports it started."""
        self.begin()
        for process in self.spawned:
            process.log(started_line(process))

    def live(self, index: int) -> FakeProcess:
        process = self.supervisor.workers[index].process
        assert isinstance(process, FakeProcess)
        return process


def started_line(process: FakeProcess) -> str:
    from twisted.logger import Logger, eventAsJSON

    captured: list[dict[str, Any]] = []
    Logger(namespace="gateway.workers", observer=captured.append).info(
        "worker started, pid {pid}", pid=process.pid, worker_started=True
    )
    return eventAsJSON(captured[0])


@pytest.fixture
def config(tmp_path: Path) -> Config:
    loaded = load_config(with_workers(tmp_path, "workers = 2"))
    # Free ports on loopback: the supervisor really binds them.
    ports = [free_port(), free_port()]
    pop3 = dataclasses.replace(loaded.pop3.listeners[0], address="127.0.0.1", port=ports[0])
    smtp = dataclasses.replace(loaded.smtp.listeners[0], address="127.0.0.1", port=ports[1])
    return dataclasses.replace(
        loaded,
        pop3=dataclasses.replace(loaded.pop3, listeners=(pop3,)),
        smtp=dataclasses.replace(loaded.smtp, listeners=(smtp,)),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def harness(config: Config) -> Any:
    h = Harness(config)
    yield h
    h.supervisor._close_sockets()


def test_workers_get_their_sockets_as_file_descriptors(harness: Harness) -> None:
    harness.start()
    first, second = harness.spawned
    assert "--index" in first.args and first.args[first.args.index("--index") + 1] == "0"
    socket_args = [first.args[i + 1] for i, a in enumerate(first.args) if a == "--socket"]
    assert len(socket_args) == 2 and second.args.count("--socket") == 2
    for text in socket_args:
        inherited = InheritedSocket.parse(text)
        assert first.fds[inherited.fd] == inherited.fd
        # A listening socket, really bound where the configuration says.
        with socket.socket(fileno=inherited.fd) as sock:
            try:
                assert sock.getsockname() == ("127.0.0.1", inherited.port)
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            finally:
                sock.detach()
    assert {0: "w", 1: "r", 2: "r"}.items() <= first.fds.items()


def test_a_dead_worker_is_restarted_with_a_growing_pause(harness: Harness) -> None:
    harness.start()
    victim = harness.live(1)
    with captured_log() as lines:
        victim.end(ProcessTerminated(signal=9))
    assert any(
        f"worker 1 pid {victim.pid} died after 0.0s (signal 9); restarting in {RESTART_FIRST}s"
        in line
        for line in lines
    ), lines
    assert harness.supervisor.workers[1].process is None
    harness.reactor.advance(RESTART_FIRST)
    again = harness.live(1)
    assert again is not victim and again.pid != victim.pid
    again.log(started_line(again))
    again.end(ProcessTerminated(exitCode=1))
    harness.reactor.advance(RESTART_FIRST)
    assert harness.supervisor.workers[1].process is None
    harness.reactor.advance(RESTART_FIRST)
    third = harness.live(1)
    # Having run long enough, it counts as healthy: the next pause is the first again.
    third.log(started_line(third))
    harness.reactor.advance(STABLE_AFTER)
    third.end(ProcessTerminated(signal=9))
    harness.reactor.advance(RESTART_FIRST)
    assert harness.live(1) is not third
    assert harness.exits == [] and harness.live(0) is harness.spawned[0]


def test_a_worker_failing_its_first_start_stops_the_gateway(harness: Harness) -> None:
    harness.begin()
    harness.spawned[0].end(ProcessTerminated(exitCode=1))
    assert harness.exits == [1]
    harness.reactor.advance(RESTART_FIRST * 10)
    assert len(harness.spawned) == 2


def test_a_worker_that_cannot_be_spawned_stops_the_gateway_or_is_retried(
    harness: Harness,
) -> None:
    def refuse(*args: Any, **kw: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    spawn, harness.supervisor.spawn = harness.supervisor.spawn, refuse
    harness.begin()
    assert harness.exits == [1]
    # Later (a restart): retried after the pause, not given up.
    harness.exits.clear()
    harness.supervisor.failed = False
    harness.supervisor.spawn = spawn
    harness.supervisor.workers[1].spawn()
    harness.supervisor.spawn = refuse
    harness.live(1).end(ProcessTerminated(signal=9))
    harness.reactor.advance(RESTART_FIRST)
    harness.supervisor.spawn = spawn
    harness.reactor.advance(RESTART_FIRST * 2)
    assert harness.exits == [] and harness.supervisor.workers[1].running


def test_a_line_that_is_not_an_event_is_logged_as_output(harness: Harness) -> None:
    harness.start()
    with captured_log() as lines:
        harness.spawned[1].proto.outReceived(b"123\nnot json\n")
    assert [line.split("] ", 1)[1] for line in lines] == [
        f"worker 1 pid {harness.spawned[1].pid}: 123\n",
        f"worker 1 pid {harness.spawned[1].pid}: not json\n",
    ]


def test_a_configuration_file_unreadable_at_a_restart_is_retried(harness: Harness) -> None:
    """EX_TEMPFAIL: the file got a typo since the start; the worker retries
    (the others serve on); at the gateway's first start it stops it (78)."""
    harness.start()
    harness.live(1).end(ProcessTerminated(signal=9))
    harness.reactor.advance(RESTART_FIRST)
    harness.live(1).end(ProcessTerminated(exitCode=EX_TEMPFAIL))
    assert harness.exits == []
    harness.reactor.advance(RESTART_FIRST * 2)
    assert harness.supervisor.workers[1].running and len(harness.spawned) == 4


def test_a_configuration_file_unreadable_at_start_stops_with_78(harness: Harness) -> None:
    harness.begin()
    harness.spawned[0].end(ProcessTerminated(exitCode=EX_TEMPFAIL))
    assert harness.exits == [EX_CONFIG]


def test_a_worker_with_a_configuration_problem_is_not_restarted(harness: Harness) -> None:
    """EX_CONFIG (78): a wrong state schema found after start, say."""
    harness.start()
    harness.reactor.advance(STABLE_AFTER)
    harness.spawned[1].end(ProcessTerminated(exitCode=EX_CONFIG))
    assert harness.exits == [EX_CONFIG]
    harness.reactor.advance(RESTART_FIRST * 10)
    assert len(harness.spawned) == 2


def test_sighup_goes_to_every_worker_and_stop_waits_for_all(harness: Harness) -> None:
    harness.start()
    harness.supervisor.reload()
    assert [p.signals for p in harness.spawned] == [["HUP"], ["HUP"]]
    stopped = harness.supervisor.stopService()
    assert [p.signals[-1] for p in harness.spawned] == ["TERM", "TERM"]
    results: list[object] = []
    stopped.addCallback(results.append)
    harness.spawned[0].end(ProcessDone(0))
    assert results == []
    harness.spawned[1].end(ProcessTerminated(exitCode=0))
    assert results == [None]
    # Stopping: nothing is restarted, the sockets are closed.
    harness.reactor.advance(RESTART_FIRST * 10)
    assert len(harness.spawned) == 2 and not harness.supervisor._sockets


def test_a_worker_still_starting_gets_its_sighup_once_started(harness: Harness) -> None:
    harness.begin()
    first, second = harness.spawned
    first.log(started_line(first))
    harness.supervisor.reload()
    assert (first.signals, second.signals) == (["HUP"], [])
    second.log(started_line(second))
    assert second.signals == ["HUP"]


def test_workers_that_do_not_stop_in_time_are_killed(harness: Harness) -> None:
    harness.start()
    harness.supervisor.stopService()
    harness.reactor.advance(STOP_TIMEOUT)
    assert [p.signals[-1] for p in harness.spawned] == ["KILL", "KILL"]


def test_worker_events_are_logged_marked_and_counted_by_worker_0(
    config: Config, tmp_path: Path
) -> None:
    from gateway.model import AdminSettings

    h = Harness(dataclasses.replace(config, admin=AdminSettings(port=free_port())))
    try:
        h.start()
        first, second = h.spawned
        line = '{"log_namespace": "gateway.pop3", "log_format": "pop3 session", "outcome": "quit"}'
        second.log(line)
        event = h.events[-1]
        assert (event["worker"], event["worker_pid"]) == (1, second.pid)
        assert event["log_system"].endswith(f"worker 1 pid {second.pid}")
        # Worker 0's metrics get it (worker 0's own events it counts itself).
        assert first.written == line.encode() + b"\n"
        first.log(line)
        assert first.written == line.encode() + b"\n"
        with captured_log() as lines:
            second.proto.errReceived(b"Traceback (most recent call last):\n")
        assert "Traceback (most recent call last):" in lines[-1]
    finally:
        h.supervisor._close_sockets()


# -- adopting the inherited socket ----------------------------------------------------


def test_server_endpoint_adopts_an_inherited_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.internet import reactor

    # One process (nothing inherited): plain TCP endpoints, as before workers.
    assert type(server_endpoint(reactor, "127.0.0.1", 995)).__name__ == "TCP4ServerEndpoint"
    assert type(server_endpoint(reactor, "::1", 995)).__name__ == "TCP6ServerEndpoint"
    monkeypatch.setattr(sockets, "_inherited", {})
    monkeypatch.setattr(sockets, "_in_worker", False)
    port = free_port()
    listening = bind_listening("127.0.0.1", port)
    try:
        sockets.inherit([InheritedSocket("127.0.0.1", port, listening.fileno())])
        assert sockets.inherited() == [InheritedSocket("127.0.0.1", port, listening.fileno())]
        endpoint = server_endpoint(reactor, "127.0.0.1", port)
        service = StreamServerEndpointService(endpoint, Factory.forProtocol(Protocol))
        service.privilegedStartService()
        adopted = service._waitingForPort.result  # type: ignore[attr-defined]
        assert adopted.getHost().port == port
        adopted.stopListening()
        # The inherited socket stays open: a service started again adopts it again.
        assert listening.getsockname() == ("127.0.0.1", port)
    finally:
        listening.close()
    # A listener the parent did not bind is not bound by a worker either.
    failed: list[Failure] = []
    server_endpoint(reactor, "127.0.0.1", free_port()).listen(
        Factory.forProtocol(Protocol)
    ).addErrback(failed.append)
    assert failed and failed[0].check(CannotListenError)
    assert "restart the gateway" in str(failed[0].value)


def test_inherited_socket_names_round_trip() -> None:
    each = InheritedSocket("::1", 995, 7)
    assert InheritedSocket.parse(each.describe()) == each
    assert each.family == socket.AF_INET6
