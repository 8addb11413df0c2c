"""One worker process: `python -m gateway.workers.child`, started by the supervisor.

It runs the gateway's service tree as twistd would (privileged start, then
start, then the reactor; stop before the reactor shuts down), with two
differences: the listeners adopt the sockets the parent bound (named by
`--socket ADDRESS,PORT,FD`), and its log events go to the parent as JSON
lines on standard output instead of to a file. It stops when told (SIGTERM,
from the parent's stop) or when its standard input, a pipe from the parent,
closes: an orphaned worker would otherwise keep serving from a gateway
nobody supervises.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import (
    Logger,
    LogPublisher,
    eventFromJSON,
    globalLogBeginner,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.config import ConfigError, load_config
from gateway.service import make_service
from gateway.tls import TLSSetupError
from gateway.workers.role import WorkerRole
from gateway.workers.sockets import InheritedSocket, inherit
from gateway.workers.supervisor import EX_TEMPFAIL, STARTED_KEY

log = Logger(namespace="gateway.workers")

# A worker that cannot read its configuration (the file, the TLS files)
# exits with EX_TEMPFAIL: at the gateway's start the supervisor stops (with
# EX_CONFIG); at a restart it tries again later, while the other workers
# serve on, as one process keeps its configuration when a reload fails.
EXIT_CANNOT_START = EX_TEMPFAIL


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gateway.workers.child")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--socket", action="append", default=[], type=InheritedSocket.parse)
    return parser.parse_args(argv)


@implementer(IReadDescriptor)
class ParentPipe:
    """Standard input, a pipe from the parent: its end means the parent is gone.

    Worker 0 (the admin listener's) also reads the other workers' log events
    on it, one JSON line each, and publishes them to `events`, which only
    its metrics observe (the parent has logged them already)."""

    def __init__(self, reactor: Any, events: LogPublisher | None = None, fd: int = 0) -> None:
        self._reactor = reactor
        self._events = events
        self._fd = fd
        self._buffer = b""

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "parent-pipe"

    def doRead(self) -> Failure | None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            return Failure(ConnectionDone())
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        if self._events is not None:
            for line in lines:
                self._publish(line)
        return None

    def _publish(self, line: bytes) -> None:
        assert self._events is not None
        try:
            event = eventFromJSON(line.decode("utf-8", "replace"))
        except ValueError:
            return
        self._events(event)

    def connectionLost(self, reason: Failure) -> None:
        self._reactor.removeReader(self)
        if self._reactor.running:
            log.info("worker: the parent process is gone; stopping")
            self._reactor.stop()


def log_to_parent() -> None:
    """Every log event, as one JSON line on standard output (the parent reads it)."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(out, recordSeparator="")])


def main(argv: Sequence[str] | None = None) -> None:
    # Until the service tree listens for it (ReloadOnHangup), a SIGHUP must
    # not end the worker (its default action); the supervisor sends it again
    # once the worker has said it started.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    log_to_parent()
    from twisted.internet import reactor

    role = WorkerRole(args.index, args.workers)
    inherit(args.socket)
    # What the admin listener's metrics count: this worker's events and,
    # in worker 0, the others' (read from the parent pipe).
    events = LogPublisher()
    globalLogPublisher.addObserver(events)
    try:
        # `workers` is read at start only: the supervisor's count stands.
        config = dataclasses.replace(load_config(args.config), workers=role.count)
        service = make_service(config, reactor, worker=role, metrics_events=events)
    except ConfigError as e:
        for problem in e.problems:
            log.critical(
                "worker: configuration {source}: {problem}",
                source=args.config,
                problem=str(problem),
            )
        raise SystemExit(EXIT_CANNOT_START) from None
    except (TLSSetupError, OSError) as e:
        log.critical(
            "worker: cannot start with {source}: {error}", source=args.config, error=str(e)
        )
        raise SystemExit(EXIT_CANNOT_START) from None
    os.set_blocking(0, False)
    reactor.addReader(ParentPipe(reactor, events if role.admin else None))
    service.privilegedStartService()
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)

    def started() -> None:
        log.info(
            "worker {worker} of {workers} started, pid {pid}, serving {parts}",
            worker=role.index,
            workers=role.count,
            pid=os.getpid(),
            parts=role.describe(),
            **{STARTED_KEY: True},
        )

    reactor.callWhenRunning(started)
    reactor.run()


if __name__ == "__main__":
    main()
