"""Spools of both backends for the spool interface suite: each "process" is a
spool (and, for PostgreSQL, a state backend with its own process lease) in
this test process; `kill` does what the kernel and the lease do to one that
dies with -9."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater

from gateway.model import Account, Endpoint, Provider, Secret
from gateway.smtp.relay import Relay, RetryPolicy
from gateway.smtp.relay_session import Session
from gateway.smtp.spool import Spool, SpoolDir
from gateway.smtp.spool_pg import PgSpool
from gateway.smtp.spool_records import Envelope, QueueEntry
from gateway.smtp.spool_store import SpoolStore
from gateway.state.backend import StateBackend
from gateway.upstream.smtp import Reply, SMTPUpstreamError
from tests.harness.postgres import PostgresCluster
from tests.helpers.state import backend_for, postgres_settings

ACCOUNT = Account("scanner", "corp", "scanner@example.com", password=Secret("account-pw"))
PROVIDERS = {"corp": Provider("corp", smtp=Endpoint("smtp.example.com", 587))}
LEASE = 2.0


def body(n: int, size: int = 200) -> bytes:
    head = b"Subject: message %d\r\n\r\n" % n
    return head + b"x" * max(0, size - len(head) - 2) + b"\r\n"


async def accept(spool: SpoolStore, data: bytes) -> QueueEntry:
    """What the SMTP server does with a message: stream it in, commit."""
    incoming = spool.incoming(reactor.seconds())
    incoming.write(data)
    envelope = Envelope(
        id=incoming.id,
        account="scanner",
        device="printer",
        peer="10.0.0.1",
        identified_by="password",
        original_sender="dev@scan.example.com",
        sender="dev@scan.example.com",
        recipients=("a@example.org",),
        received=reactor.seconds(),
        size=incoming.size,
        eight_bit=False,
    )
    return await spool.commit(incoming, envelope)


async def eventually(condition: Any, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll a condition on the running reactor (the relays work meanwhile);
    `condition` may be a coroutine function."""
    deadline = reactor.seconds() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await deferLater(reactor, 0.05, lambda: None)


async def pause(seconds: float) -> None:
    """Let the relays run for a while (to show that something does NOT happen)."""
    await deferLater(reactor, seconds, lambda: None)


class Upstream:
    """Records what each relay delivered; down, up, or holding attempts."""

    def __init__(self) -> None:
        self.arrived: list[tuple[str, bytes]] = []
        self.down = False

    def session_for(self, process: str) -> Any:
        async def open_session(account: Account, provider: Provider) -> Session:
            if self.down:
                raise SMTPUpstreamError("cannot connect to fake upstream: connection refused")
            return FakeSession(self, process)

        return open_session


class FakeSession:
    def __init__(self, upstream: Upstream, process: str) -> None:
        self.upstream = upstream
        self.process = process
        self.ended = False
        self.peer = "fake upstream"

    def abort(self, reason: str) -> None:
        self.ended = True

    def quit(self) -> Deferred[Any]:
        self.ended = True
        return succeed(None)

    async def relay(
        self, *, sender: str, recipients: list[str], source: BinaryIO, size: int, eight_bit: bool
    ) -> Mapping[str, Reply]:
        if self.upstream.down:
            raise SMTPUpstreamError("fake upstream went away")
        await deferLater(reactor, 0.01, lambda: None)  # a round trip
        self.upstream.arrived.append((self.process, source.read(size)))
        return {r: Reply(250, (b"2.0.0 ok",)) for r in recipients}


class Processes:
    """Spool "processes" of one backend on one spool (directory or database)."""

    def __init__(self, kind: str, tmp_path: Path, dsn: str | None) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.dsn = dsn
        self.spools: list[SpoolStore] = []
        self.backends: dict[int, StateBackend] = {}
        self.relays: list[Relay] = []

    async def spool(self) -> SpoolStore:
        n = len(self.spools)
        store: SpoolStore
        if self.dsn is None:
            store = Spool(SpoolDir(self.tmp_path / "spool"), shared=True)
        else:
            backend = backend_for(postgres_settings(self.dsn, lease_time=LEASE), reactor)
            assert backend.lease is not None
            await backend.lease.start()
            self.backends[id(backend)] = backend
            store = PgSpool(backend, SpoolDir(self.tmp_path / f"pg-{n}"), clock=reactor)
        store.open()
        self.spools.append(store)
        return store

    def relay(self, spool: SpoolStore, upstream: Upstream, name: str) -> Relay:
        relay = Relay(
            spool=spool,
            accounts={"scanner": ACCOUNT},
            providers=PROVIDERS,
            open_session=upstream.session_for(name),
            clock=reactor,
            hostname="gw.test",
            retry=RetryPolicy(first=0.3, max_interval=0.3, lifetime=3600),
            control_interval=0.2,
            keepalive=0.5,
            stop_grace=1.0,
            connections=2,
        )
        relay.startService()
        self.relays.append(relay)
        return relay

    def kill(self, spool: SpoolStore, cluster: PostgresCluster | None = None) -> None:
        """Dies with -9: its flocks go (kernel), its process lease passes."""
        if isinstance(spool, Spool):
            for claim in spool._held.values():
                os.close(claim.fd)
                claim.fd = -1
            spool._held = {}
            return
        assert isinstance(spool, PgSpool) and cluster is not None and self.dsn is not None
        backend = next(b for b in self.backends.values() if b.identity.name == spool.me)
        assert backend.lease is not None
        loop = backend.lease._loop
        if loop.running:
            loop.stop()
        lapse = backend.lease._lapse_call
        if lapse is not None and lapse.active():
            lapse.cancel()
        cluster.query(
            self.dsn,
            "UPDATE gateway_processes SET lease_until = now() - interval '1 second'"
            " WHERE process = %s",
            spool.me,
        )

    async def close(self) -> None:
        for relay in self.relays:
            if relay.running:
                await relay.stopService()
        for spool in self.spools:
            spool.close()
        for backend in self.backends.values():
            if backend.lease is not None and backend.lease._loop.running:
                await backend.lease.stop()
            if backend.database is not None:
                await backend.database.stop()
