"""Turns a loaded configuration into running Twisted services (what twistd runs).

`make_service` builds one `Runtime` (gateway.runtime: what every subsystem
shares) and composes the services of each subsystem: the OAuth2 token
manager, the POP3 listeners (gateway.pop3.service), the SMTP spool, relay
and listeners (gateway.smtp.service), the admin listener with metrics and
health (gateway.admin.service), and the SIGHUP handler that renews the
listeners' certificate.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import MultiService, Service

from gateway.admin.service import admin_services
from gateway.devices import DeviceAuthenticator
from gateway.model import Config
from gateway.oauth.manager import TokenManager
from gateway.pop3.service import pop3_services
from gateway.runtime import Runtime
from gateway.smtp.service import smtp_services
from gateway.tls import load_server_identity


def token_manager(config: Config, reactor: Any) -> TokenManager | None:
    """The OAuth2 token manager, if any account needs one (none: no key is created)."""
    if not any(account.auth == "oauth2" for account in config.accounts.values()):
        return None
    return TokenManager(config, clock=reactor, reactor=reactor)


def make_service(config: Config, reactor: Any) -> MultiService:
    top = MultiService()
    top.setName("gateway")
    runtime = Runtime(
        config=config,
        reactor=reactor,
        identity=load_server_identity(config.tls) if config.tls else None,
        authenticator=DeviceAuthenticator(config.devices),
    )
    tokens = token_manager(config, reactor)
    if tokens is not None:
        # Before the listeners: it loads the store when started (after twistd
        # has dropped privileges), ahead of the first device login.
        tokens.setServiceParent(top)
        runtime.tokens = tokens
    services = pop3_services(runtime) + smtp_services(runtime)
    # The admin listener (if configured) watches the services built above.
    for service in services + admin_services(runtime, services):
        service.setServiceParent(top)
    ReloadOnHangup(runtime).setServiceParent(top)
    return top


class ReloadOnHangup(Service):
    """`kill -HUP` (systemctl reload) re-reads the TLS certificate and key,
    e.g. after a renewal, without dropping any device session."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> Any:
        signal.signal(signal.SIGHUP, self._previous or signal.SIG_DFL)
        return super().stopService()

    def _hangup(self, signum: int, frame: Any) -> None:
        # Signal handlers run between bytecodes; do the work in the reactor.
        self._runtime.reactor.callFromThread(self._runtime.reload_tls)
