"""The admin listener as a Twisted service, wired to the running gateway.

`admin_services` is called by `gateway.service.make_service` with the
services it built: it watches the device listeners among them, finds the
spool, reads the token manager from the runtime, and returns the service
that serves the admin site and feeds log events to the metrics. Without an
`[admin]` section it returns nothing and changes nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from pathlib import Path

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import ILogObserver, Logger, LogPublisher, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory

from gateway.admin.collectors import ListenerCollector, SpoolCollector, TokenCollector
from gateway.admin.events import MetricsObserver
from gateway.admin.health import (
    Check,
    Readiness,
    directory_writable,
    listeners_bound,
    spool_open,
    state_database_reachable,
    token_store_usable,
)
from gateway.admin.listeners import ListenerWatch
from gateway.admin.metrics import GatewayMetrics
from gateway.admin.site import AdminSite
from gateway.model import AdminSettings, Listener, listener_name
from gateway.oauth.manager import TokenManager
from gateway.runtime import Runtime
from gateway.smtp.service import SpoolService
from gateway.state import StateError, ensure_dir
from gateway.tls import ReloadableServerTLS

log = Logger(namespace="gateway.admin")


class AdminService(MultiService):
    """Serves the admin site (its child) and counts log events while running."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        observer: ILogObserver,
        publisher: LogPublisher,
        state_dir: Path,
    ) -> None:
        super().__init__()
        self.setName("admin")
        self.metrics = metrics
        self._observer = observer
        self._publisher = publisher
        self._state_dir = state_dir

    def startService(self) -> None:
        self._publisher.addObserver(self._observer)
        # A gateway with only password POP3 accounts has not needed its state
        # directory yet; readiness checks it, so make it now (after twistd
        # dropped privileges, like the spool and the token store do).
        try:
            ensure_dir(self._state_dir)
        except StateError as e:
            log.error("admin: {error}; /readyz reports it", error=str(e))
        super().startService()

    def stopService(self) -> object:
        self._publisher.removeObserver(self._observer)
        return super().stopService()


def admin_services(
    runtime: Runtime,
    services: Sequence[IService],
    *,
    publisher: LogPublisher = globalLogPublisher,
) -> list[IService]:
    settings = runtime.config.admin
    if settings is None:
        return []
    config = runtime.config
    listeners = {
        listener_name(each): each for each in config.pop3.listeners + config.smtp.listeners
    }
    watches = [
        ListenerWatch(service, listeners[service.name].protocol)
        for service in services
        if isinstance(service, StreamServerEndpointService) and service.name in listeners
    ]
    names = frozenset(w.name for w in watches)
    metrics = GatewayMetrics(
        # Read at every scrape: a configuration reloaded in place is what counts.
        devices=lambda: runtime.config.devices,
        listeners=lambda: names,
    )
    now = runtime.reactor.seconds
    metrics.registry.register(ListenerCollector(lambda: watches))
    checks: dict[str, Check] = {
        "listeners": listeners_bound(lambda: watches),
        "state_dir": directory_writable(config.state_dir),
    }
    if runtime.state.shared:
        checks["state_database"] = state_database_reachable(runtime.state)
    spool = next((s for s in services if isinstance(s, SpoolService)), None)
    if spool is not None:
        metrics.registry.register(SpoolCollector(spool.spool, now))
        checks["spool"] = spool_open(spool.spool.dir)
    if isinstance(runtime.tokens, TokenManager):
        metrics.registry.register(TokenCollector(runtime.tokens, now))
        checks["token_store"] = token_store_usable(runtime.tokens)
    site = AdminSite(metrics.registry, Readiness(checks))
    if settings.users:
        from gateway.admin.console import console_resource

        site.add_console(
            console_resource(
                runtime, settings, metrics, lambda: watches, spool.spool if spool else None
            )
        )
    top = AdminService(metrics, MetricsObserver(metrics), publisher, config.state_dir)
    http = StreamServerEndpointService(
        _endpoint(runtime, settings), _with_tls(runtime, settings, site)
    )
    http.setName("admin-http")
    http.setServiceParent(top)
    log.info(
        "admin listener on {address}:{port} ({scheme}): /metrics /healthz /readyz{console}",
        address=settings.address,
        port=settings.port,
        scheme="https" if settings.uses_tls else "http",
        console=f" /console/ ({len(settings.users)} admin users)" if settings.users else "",
    )
    return [top]


def _endpoint(runtime: Runtime, settings: AdminSettings) -> object:
    version = ipaddress.ip_address(settings.address).version
    endpoint = TCP6ServerEndpoint if version == 6 else TCP4ServerEndpoint
    return endpoint(runtime.reactor, settings.port, interface=settings.address)


def _with_tls(runtime: Runtime, settings: AdminSettings, site: AdminSite) -> IProtocolFactory:
    """HTTPS with the gateway's certificate (renewed on SIGHUP like the
    device listeners'), or the site itself for plain HTTP."""
    if not settings.uses_tls:
        return site
    assert runtime.identity is not None, "config validation requires [tls] for HTTPS"
    # The TLS policy of a listener at TLS 1.2 or later; `protocol` is not read there.
    policy = Listener(protocol="smtp", port=settings.port, tls="implicit", address=settings.address)
    tls = ReloadableServerTLS(runtime.identity, policy)
    runtime.listener_tls.append(tls)
    return TLSMemoryBIOFactory(tls, False, site)
