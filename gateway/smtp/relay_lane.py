"""One upstream connection of an account's relay worker (`gateway.smtp.relay`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure as TwistedFailure

from gateway.model import Account, Provider
from gateway.smtp.relay_session import Session
from gateway.smtp.relay_trouble import UpstreamTrouble
from gateway.smtp.spool_records import QueueEntry
from gateway.upstream.smtp import SMTPClient, SMTPUpstreamError

log = Logger(namespace="gateway.smtp.relay")


class RelayView(Protocol):
    """What a lane reads from the relay."""

    _stopping: bool
    accounts: Mapping[str, Account]
    providers: Mapping[str, Provider]
    clock: IReactorTime
    keepalive: float
    stop_grace: float
    open_session: Callable[[Account, Provider], Awaitable[Session]]


class Worker(Protocol):
    """What a lane needs from its account's worker (`relay.AccountWorker`)."""

    account: str
    trouble: UpstreamTrouble

    @property
    def relay(self) -> RelayView: ...

    def due(self, limit: int | None = None) -> list[QueueEntry]: ...

    async def connection_failed(self, error: SMTPUpstreamError) -> None: ...

    async def deliver(self, lane: Lane, client: Session, entry: QueueEntry) -> None: ...

    def lane_finished(self) -> None: ...


def cancel_call(call: IDelayedCall | None) -> None:
    if call is not None and call.active():
        call.cancel()


class Lane:
    """One upstream connection of an account, reused while messages keep coming
    and closed with QUIT after `keepalive` idle seconds."""

    def __init__(self, worker: Worker, number: int) -> None:
        self.worker = worker
        self.number = number
        self.client: Session | None = None
        self.running: Deferred[None] | None = None
        self._idle: IDelayedCall | None = None

    def start(self) -> None:
        cancel_call(self._idle)
        self._idle = None
        self.running = Deferred.fromCoroutine(self._run())
        self.running.addErrback(self._crashed)
        self.running.addBoth(self._finished)

    async def _run(self) -> None:
        worker, relay = self.worker, self.worker.relay
        while not relay._stopping:
            if not worker.due(limit=1):
                return
            try:
                client = await self._session()
            except SMTPUpstreamError as e:
                await worker.connection_failed(e)
                continue
            due = worker.due(limit=1)  # others may have taken it meanwhile
            if due:
                await worker.deliver(self, client, due[0])

    async def _session(self) -> Session:
        if self.client is not None and not self.client.ended:
            return self.client
        self.client = None
        relay = self.worker.relay
        account = relay.accounts[self.worker.account]
        self.client = await relay.open_session(account, relay.providers[account.provider])
        if isinstance(self.client, SMTPClient):
            # Logged in; a Graph session proves nothing before its first send.
            self.worker.trouble.logged_in()
        return self.client

    def _crashed(self, failure: TwistedFailure) -> None:
        log.failure(
            "smtp relay worker for account {account} failed", failure, account=self.worker.account
        )

    def _finished(self, _: object) -> None:
        self.running = None
        if self.worker.relay._stopping:
            return
        if self.client is not None and self._idle is None:
            self._idle = self.worker.relay.clock.callLater(
                self.worker.relay.keepalive, self._close_idle
            )
        self.worker.lane_finished()

    def _close_idle(self) -> None:
        self._idle = None
        client, self.client = self.client, None
        if client is not None and not client.ended:
            client.quit().addErrback(lambda _: None)

    def stop(self) -> Deferred[None]:
        cancel_call(self._idle)
        self._idle = None
        running = self.running
        if running is None:
            self._close_idle()
            return succeed(None)
        done: Deferred[None] = Deferred()
        grace = self.worker.relay.clock.callLater(self.worker.relay.stop_grace, self._abort)

        def finished(_: object) -> None:
            cancel_call(grace)
            self._close_idle()
            done.callback(None)

        running.addBoth(finished)
        return done

    def _abort(self) -> None:
        if self.client is not None:
            self.client.abort("the gateway is stopping")
