"""Turns a loaded configuration into running Twisted services (what twistd runs).

`make_service` builds one `Runtime` (gateway.runtime: what every subsystem
shares) and composes the services of each subsystem: the OAuth2 token
manager, the POP3 listeners (gateway.pop3.service), the SMTP spool, relay
and listeners (gateway.smtp.service), the admin listener with metrics and
health (gateway.admin.service), and the SIGHUP handler that reloads the
configuration and the listeners' certificate (gateway.reload).

With `workers` above one, what twistd runs is the supervisor of the worker
processes instead (gateway.workers.supervisor), and each worker builds the
tree here for its `WorkerRole`: POP3, SMTP and the shared spool's relay in
every worker, the admin listener in worker 0 only.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService
from twisted.logger import LogPublisher, globalLogPublisher

from gateway.admin.service import admin_services
from gateway.devices import DeviceAuthenticator
from gateway.model import Config
from gateway.oauth.manager import TokenManager
from gateway.penalties import penalty_book
from gateway.pop3.service import pop3_services
from gateway.reload import Reloader, ReloadOnHangup
from gateway.runtime import Runtime
from gateway.smtp.service import smtp_services
from gateway.state.backend import StateBackend, StateService, open_state_backend
from gateway.tls import load_server_identity
from gateway.workers.role import WorkerRole
from gateway.workers.supervisor import WorkerSupervisor


def token_manager(
    config: Config, reactor: Any, state: StateBackend | None = None
) -> TokenManager | None:
    """The OAuth2 token manager, if any account needs one (none: no key is created)."""
    if not any(account.auth == "oauth2" for account in config.accounts.values()):
        return None
    return TokenManager(config, clock=reactor, reactor=reactor, state=state)


def make_service(
    config: Config,
    reactor: Any,
    worker: WorkerRole | None = None,
    metrics_events: LogPublisher | None = None,
) -> MultiService:
    """The gateway's service tree.

    In a worker process, `worker` says what it serves and `metrics_events`
    carries the log events its admin metrics count (every worker's)."""
    if worker is None and config.workers > 1:
        if config.tls is not None:
            # A certificate that cannot be used stops the start here, with
            # the same message as with one process (each worker reads it too).
            load_server_identity(config.tls)
        return WorkerSupervisor(config, reactor)
    top = MultiService()
    top.setName("gateway")
    state = open_state_backend(config.state, reactor)
    # First: started before, and stopped after, every service that uses it.
    StateService(state, reactor).setServiceParent(top)
    runtime = Runtime(
        config=config,
        reactor=reactor,
        identity=load_server_identity(config.tls) if config.tls else None,
        authenticator=DeviceAuthenticator(
            config.devices,
            penalties=penalty_book(
                config.penalties,
                reactor,
                state,
                # Worker processes count an attacker's guesses once, together.
                shared_dir=config.state_dir if config.workers > 1 else None,
            ),
            clock=reactor,
        ),
        state_backend=state,
    )
    reloader = Reloader(runtime, parent=top, make_tokens=lambda c: token_manager(c, reactor, state))
    tokens = token_manager(config, reactor, state)
    if tokens is not None:
        # Before the listeners: it loads the store when started (after twistd
        # has dropped privileges), ahead of the first device login.
        tokens.setServiceParent(top)
        runtime.tokens = tokens
        reloader.follow_tokens(tokens)
    services = pop3_services(runtime)
    if worker is None or worker.smtp:
        services += smtp_services(runtime)
    # The admin listener (if configured) watches the services built above.
    admin: list[IService] = []
    if worker is None or worker.admin:
        publisher = globalLogPublisher if metrics_events is None else metrics_events
        admin = admin_services(runtime, services, publisher=publisher)
    for service in services + admin:
        service.setServiceParent(top)
    ReloadOnHangup(reactor, reloader.reload).setServiceParent(top)
    return top


__all__ = ["ReloadOnHangup", "make_service", "token_manager"]
