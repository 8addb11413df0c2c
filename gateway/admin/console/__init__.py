"""The web console on the admin listener: `/console/` (see `app` for the pages).

`console_resource` builds it from the running gateway's own objects (the
metrics the admin log observer counts into, the listener watches, the spool,
the token manager), so the console shows what the metrics show and acts
through the same code as the `gateway` command. Without `[admin.users.*]`
there is no console.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.web.resource import IResource

from gateway.admin.console.app import Console, ConsoleState, audit
from gateway.admin.console.auth import AdminLogins
from gateway.admin.console.connect import AccountActions
from gateway.admin.console.sessions import session_store
from gateway.admin.listeners import ListenerWatch
from gateway.admin.metrics import GatewayMetrics
from gateway.devices import DeviceAuthenticator
from gateway.model import AdminSettings, Config
from gateway.oauth.http import TreqPoster
from gateway.penalties import penalty_book
from gateway.runtime import Runtime
from gateway.smtp.spool_store import SpoolStore as Spool

__all__ = ["Console", "console_resource"]


def console_resource(
    runtime: Runtime,
    settings: AdminSettings,
    metrics: GatewayMetrics,
    watches: Callable[[], list[ListenerWatch]],
    spool: Spool | None,
) -> IResource:
    reactor = runtime.reactor

    def config() -> Config:
        return runtime.config

    penalties = penalty_book(runtime.config.penalties, reactor, runtime.state, book="console")
    logins = AdminLogins(
        settings.users,
        DeviceAuthenticator({}, penalties=penalties, clock=reactor),
        reactor,
    )
    sessions = session_store(runtime.state.database, reactor, settings.session_idle)

    def reconfigure(new: Config) -> None:
        if new.admin is not None:
            logins.reconfigure(new.admin.users)
            sessions.idle = new.admin.session_idle

    runtime.holder.on_reload(reconfigure)
    actions = AccountActions(
        config,
        reactor=reactor,
        clock=reactor,
        poster=TreqPoster(reactor),
        tokens=lambda: runtime.tokens,
        audit=audit,
    )
    state = ConsoleState(
        config=config,
        clock=reactor,
        metrics=metrics,
        watches=watches,
        spool=spool,
        uses_tls=settings.uses_tls,
    )
    resource: IResource = Console(state, logins, sessions, actions).app.resource()
    return resource
