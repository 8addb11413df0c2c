"""The POP3 listeners as Twisted services, one per `[[pop3.listen]]`."""

from __future__ import annotations

import functools

from twisted.application.service import IService

from gateway.model import Listener
from gateway.pop3.server import POP3ServerFactory
from gateway.runtime import Runtime, listener_service
from gateway.tls import ReloadableServerTLS


def pop3_services(runtime: Runtime) -> list[IService]:
    config = runtime.config

    def factory(tls_options: ReloadableServerTLS | None, listener: Listener) -> POP3ServerFactory:
        return POP3ServerFactory(
            listener=listener,
            tls_options=tls_options,
            authenticator=runtime.authenticator,
            accounts=config.accounts,
            open_maildrop=runtime.open_maildrop,
            locks=runtime.locks,
            clock=runtime.reactor,
            idle_timeout=config.pop3.idle_timeout,
        )

    return [
        listener_service(runtime, listener, functools.partial(factory, listener=listener))
        for listener in config.pop3.listeners
    ]
