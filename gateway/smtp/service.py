"""The SMTP relay as Twisted services: the spool with its relay, and the listeners.

The spool is the state backend's (`runtime.state`): files under
`state_dir/spool` (embedded) or the `gateway_spool` table (PostgreSQL, with
`state_dir/spool-pg/tmp` for large messages being received). It is opened
(directories made, lock taken, crash leftovers cleaned, queue loaded) in
`startService`, which twistd runs after it has dropped privileges, so every
spool file belongs to the user the gateway runs as. The spool service comes
before the listeners in the parent, so it is ready before the first device
connects.

The name the gateway gives itself (greeting, EHLO reply, HELO upstream,
bounces) starts as `socket.gethostname()`, which asks the kernel and never
waits on DNS; `LocalHostname` then looks up the fully qualified name
(`socket.getfqdn()`, which may wait seconds on a slow resolver) in a
reactor pool thread and puts it in place when it is known.
"""

from __future__ import annotations

import functools
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from gateway.model import Account, Config, Listener, Provider, SMTPSettings
from gateway.runtime import Runtime, listener_service
from gateway.smtp.graph_delivery import open_graph_session
from gateway.smtp.policy import NetworkDevices
from gateway.smtp.relay import Relay, RetryPolicy
from gateway.smtp.relay_path import relays_via_graph
from gateway.smtp.relay_session import Session
from gateway.smtp.server import SMTPServerFactory
from gateway.smtp.spool import Spool, SpoolDir
from gateway.smtp.spool_pg import PgSpool
from gateway.smtp.spool_store import SpoolStore
from gateway.state import StateError
from gateway.tls import ReloadableServerTLS
from gateway.upstream.smtp import open_session

log = Logger(namespace="gateway.smtp")


class Named(Protocol):
    hostname: str


class SpoolService(MultiService):
    """Opens the spool, then runs the relay (its child) over it."""

    def __init__(self, spool: SpoolStore, relay: Relay) -> None:
        super().__init__()
        self.setName("smtp-spool")
        self.spool = spool
        self.relay = relay
        relay.setServiceParent(self)

    def startService(self) -> None:
        try:
            found = self.spool.open()
        except (StateError, OSError) as e:
            # Before the reactor runs: refuse to start, as for a bad config.
            log.critical("smtp spool cannot be used: {error}", error=str(e))
            print(f"gateway: cannot start: {e}", file=sys.stderr)
            raise SystemExit(1) from None
        queued = sum(1 for e in found if e.status == "queued")
        log.info(
            "smtp spool {path}: {queued} queued, {dead} dead letter(s)",
            path=self.spool.location,
            queued=queued,
            dead=len(found) - queued,
        )
        super().startService()

    def stopService(self) -> Deferred[None]:
        d: Deferred[Any] = maybeDeferred(super().stopService)
        d.addBoth(lambda _: self.spool.close())
        return d


class LocalHostname(Service):
    """Looks up the host's fully qualified name off the reactor thread and
    gives it to everything that names the gateway (`Named`: the relay and
    the listeners' factories), which until then use `socket.gethostname()`."""

    def __init__(self, lookup: Callable[[], Deferred[str]], named: Sequence[Named]) -> None:
        self.setName("smtp-hostname")
        self._lookup = lookup
        self._named = named

    def startService(self) -> None:
        super().startService()
        self._lookup().addCallbacks(self._found, self._failed)

    def _found(self, name: str) -> None:
        if not name:
            return
        for each in self._named:
            each.hostname = name
        log.info("smtp hostname {hostname}", hostname=name)

    def _failed(self, reason: Any) -> None:
        log.failure("smtp hostname lookup failed", reason)


def fqdn_in_thread(reactor: Any) -> Callable[[], Deferred[str]]:
    """`socket.getfqdn()` in the reactor's thread pool."""
    return lambda: deferToThreadPool(reactor, reactor.getThreadPool(), socket.getfqdn)


def retry_policy(settings: SMTPSettings) -> RetryPolicy:
    return RetryPolicy(
        first=settings.retry_first,
        max_interval=settings.retry_max_interval,
        lifetime=settings.message_lifetime,
    )


def log_ignored(network: NetworkDevices) -> None:
    for name in network.ignored:
        log.error(
            "device {device} has relay_without_auth but allow_from includes every address; "
            "it is not trusted without AUTH",
            device=name,
        )


def spool_shared(config: Config) -> bool:
    """Whether worker processes share the embedded spool (issue 14's
    `workers`): then each takes the spool's lock shared and delivers
    through per-message claims."""
    return config.workers > 1


def open_spool(runtime: Runtime) -> SpoolStore:
    """The spool of the state backend this process uses."""
    config, state = runtime.config, runtime.state
    if state.database is None:
        return Spool(SpoolDir(config.state_dir / "spool"), shared=spool_shared(config))
    spool = PgSpool(
        state,
        SpoolDir(config.state_dir / "spool-pg"),
        clock=runtime.reactor,
        accounts=runtime.holder.accounts,
    )
    if state.lease is not None:
        state.lease.on_lapse(spool.lapsed)
    return spool


def smtp_services(runtime: Runtime) -> list[IService]:
    """The spool service and one service per `[[smtp.listen]]`; none without listeners."""
    config = runtime.config
    settings = config.smtp
    if not settings.listeners:
        return []
    hostname = socket.gethostname()
    reactor = runtime.reactor
    spool = open_spool(runtime)

    async def connect_as(account: Account, provider: Provider) -> Session:
        if relays_via_graph(account, provider):
            return await open_graph_session(
                account, provider, reactor=reactor, tokens=runtime.graph_tokens()
            )
        # The relay's name, read at each connection: LocalHostname may have renewed it.
        return await open_session(
            account, provider, reactor=reactor, helo_name=relay.hostname, tokens=runtime.tokens
        )

    holder = runtime.holder
    relay = Relay(
        spool=spool,
        accounts=holder.accounts,
        providers=holder.providers,
        open_session=connect_as,
        clock=reactor,
        hostname=hostname,
        retry=retry_policy(settings),
        connections=settings.relay_connections,
        keepalive=settings.relay_keepalive,
        control_interval=settings.control_interval,
    )
    log_ignored(NetworkDevices.from_devices(config.devices.values()))

    named: list[Named] = [relay]
    factories: list[SMTPServerFactory] = []

    def factory(tls_options: ReloadableServerTLS | None, listener: Listener) -> SMTPServerFactory:
        built = SMTPServerFactory(
            listener=listener,
            tls_options=tls_options,
            authenticator=runtime.authenticator,
            devices=config.devices,
            accounts=holder.accounts,
            providers=holder.providers,
            spool=spool,
            on_queued=relay.submitted,
            clock=reactor,
            hostname=hostname,
            idle_timeout=settings.idle_timeout,
            stall_timeout=settings.stall_timeout,
            line_timeout=settings.line_timeout,
            auth_failure_delay=settings.auth_failure_delay,
            max_message_size=settings.max_message_size,
            max_recipients=settings.max_recipients,
            long_lines=settings.long_lines,
            limits=runtime.limits,
        )
        named.append(built)
        factories.append(built)
        return built

    previous = config

    def reconfigure(new: Config) -> None:
        # Sessions already open keep what they looked up when they began.
        nonlocal previous
        network = NetworkDevices.from_devices(new.devices.values())
        log_ignored(network)
        for built in factories:
            built.network_devices = network
            built.idle_timeout = new.smtp.idle_timeout
            built.max_message_size = new.smtp.max_message_size
            built.max_recipients = new.smtp.max_recipients
            built.long_lines = new.smtp.long_lines
        relay.retry = retry_policy(new.smtp)
        before, previous = previous, new
        relay.accounts_changed(
            removed=set(before.accounts) - set(new.accounts),
            added=[n for n in new.accounts if before.accounts.get(n) != new.accounts[n]],
        )

    holder.on_reload(reconfigure)

    services: list[IService] = [
        LocalHostname(fqdn_in_thread(reactor), named),
        SpoolService(spool, relay),
    ]
    services += [
        listener_service(runtime, listener, functools.partial(factory, listener=listener))
        for listener in settings.listeners
    ]
    return services
