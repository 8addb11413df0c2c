"""The POP3 listeners as Twisted services, one per `[[pop3.listen]]`."""

from __future__ import annotations

import functools

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred

from gateway.model import Config, Listener
from gateway.pop3.server import POP3ServerFactory
from gateway.runtime import Runtime, listener_service
from gateway.tls import ReloadableServerTLS


def pop3_services(runtime: Runtime) -> list[IService]:
    config = runtime.config
    factories: list[POP3ServerFactory] = []

    def factory(tls_options: ReloadableServerTLS | None, listener: Listener) -> POP3ServerFactory:
        built = POP3ServerFactory(
            listener=listener,
            tls_options=tls_options,
            authenticator=runtime.authenticator,
            # Read at each login: a reload (gateway.reload) shows there at once.
            accounts=runtime.holder.accounts,
            open_maildrop=runtime.open_maildrop,
            locks=runtime.locks,
            clock=runtime.reactor,
            limits=runtime.limits,
            idle_timeout=config.pop3.idle_timeout,
            stall_timeout=config.pop3.stall_timeout,
            line_timeout=config.pop3.line_timeout,
            auth_failure_delay=config.pop3.auth_failure_delay,
        )
        factories.append(built)
        return built

    def reconfigure(new: Config) -> None:
        for built in factories:
            built.idle_timeout = new.pop3.idle_timeout

    runtime.holder.on_reload(reconfigure)

    # First in the list, so it stops after the listeners: their sessions hand
    # kept IMAP connections back before the keeper logs them out.
    return [KeptConnections(runtime)] + [
        listener_service(runtime, listener, functools.partial(factory, listener=listener))
        for listener in config.pop3.listeners
    ]


class KeptConnections(Service):
    """Logs out the upstream IMAP connections kept between device sessions
    when the gateway stops, rather than leaving the provider a dropped socket."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self.setName("imap-kept-connections")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._runtime.imap_keeper.close_all()
