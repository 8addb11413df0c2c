"""The console's account actions: connect a mailbox, forget its tokens, check it.

*Connect mailbox* runs the account's grant with the pieces `gateway oauth
authorize` uses: the authorization code grant builds its URL with
`code_flow.authorization_url` and a fresh `PKCE`, and the provider sends the
browser back to the console's own callback (instead of the command's
loopback listener), where `code_from_redirect` checks `state` before the
code is exchanged at the token endpoint; the device grant runs
`run_device_flow` while the page shows the code and reloads itself. Tokens
are stored as the command stores them (`open_store` + `TokenRecord.authorized`
under the store's lock), so the running gateway and the command see the same
thing; with PostgreSQL the console uses the gateway's own (asynchronous)
store, so no blocking connection is made on the reactor thread. *Forget
tokens* is `gateway oauth revoke`; *Check* is `gateway check`.

The callback needs no console cookie (a `SameSite=Strict` cookie does not
come with the provider's cross-site redirect): its `state`, random, single
use and bound to the admin who started the sign-in, is what authorises it.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from gateway.check import check_account
from gateway.model import Config
from gateway.oauth.admin import (
    CommandFailed,
    forget_tokens,
    oauth_account,
    open_store,
    revoke_at_provider,
)
from gateway.oauth.backend import TokenBackend
from gateway.oauth.code_flow import PKCE, authorization_url, code_from_redirect
from gateway.oauth.device_flow import run_device_flow
from gateway.oauth.endpoint import DeviceAuthorization, TokenEndpoint
from gateway.oauth.errors import OAuthError
from gateway.oauth.http import FormPoster
from gateway.oauth.record import TokenRecord
from gateway.oauth.tokens import Tokens
from gateway.state.database import StateUnavailable
from gateway.upstream.credentials import TokenSource

log = Logger(namespace="gateway.admin.console")

# A code-grant sign-in not finished in this time is dropped.
CODE_FLOW_WAIT = 600.0

FlowStatus = Literal["waiting", "done", "failed"]


@dataclass
class Flow:
    """One sign-in under way (or just finished) for an account."""

    account: str
    admin: str
    grant: str
    started: float
    status: FlowStatus = "waiting"
    message: str = ""
    # Code grant: where the browser goes, and what the callback must match.
    url: str | None = None
    state: str | None = None
    redirect_uri: str | None = None
    pkce: PKCE | None = field(default=None, repr=False)
    # Device grant: what the page shows.
    user_code: str | None = None
    verification_uri: str | None = None
    verification_uri_complete: str | None = None
    expires_at: float | None = None
    running: Deferred[None] | None = field(default=None, repr=False)

    def view(self) -> dict[str, Any]:
        """What a template may show (no PKCE verifier, no device code)."""
        return {
            "grant": self.grant,
            "status": self.status,
            "message": self.message,
            "user_code": self.user_code,
            "verification_uri": self.verification_uri,
            "verification_uri_complete": self.verification_uri_complete,
        }


class AccountActions:
    """Connect, forget and check accounts on behalf of logged-in admins."""

    def __init__(
        self,
        config: Callable[[], Config],
        *,
        reactor: Any,
        clock: IReactorTime,
        poster: FormPoster,
        tokens: Callable[[], TokenSource | None],
        audit: Callable[[str, str, str], None],
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        self._config = config
        self._reactor = reactor
        self._clock = clock
        self._poster = poster
        self._tokens = tokens
        self._audit = audit
        self._environ = environ
        self._flows: dict[str, Flow] = {}
        self.checks: dict[str, dict[str, Any]] = {}

    def flow(self, account: str) -> dict[str, Any] | None:
        flow = self._flows.get(account)
        return flow.view() if flow is not None else None

    def connect(self, name: str, admin: str, callback_uri: str) -> Flow:
        """Start `name`'s grant. Raises `CommandFailed` for a non-OAuth2 account."""
        config = self._config()
        account = oauth_account(config, name)
        provider = config.providers[account.provider]
        grant = account.grant or provider.default_grant
        self._drop(name)
        flow = Flow(account=name, admin=admin, grant=grant, started=self._clock.seconds())
        self._flows[name] = flow
        endpoint = TokenEndpoint(provider, self._poster, self._clock)
        if grant == "authorization_code":
            flow.state = secrets.token_urlsafe(32)
            flow.pkce = PKCE.new()
            flow.redirect_uri = callback_uri
            flow.url = authorization_url(
                endpoint, callback_uri, flow.state, flow.pkce, account.username
            )
            flow.message = f"sign in as {account.username} at the provider"
        elif grant == "device_code":

            def show(auth: DeviceAuthorization) -> None:
                flow.user_code = auth.user_code
                flow.verification_uri = auth.verification_uri
                flow.verification_uri_complete = auth.verification_uri_complete
                flow.expires_at = auth.expires_at
                flow.message = f"sign in as {account.username}; waiting"

            flow.message = "asking the provider for a code"
            self._run(flow, run_device_flow(endpoint, self._clock, show))
        elif grant == "service_account":
            self._run(flow, endpoint.service_account(account.username))
        else:
            self._run(flow, endpoint.client_credentials())
        return flow

    def _run(self, flow: Flow, work: Any) -> None:
        d: Deferred[Tokens] = ensureDeferred(work)
        flow.running = d.addCallback(lambda tokens: self._store(flow, tokens)).addErrback(
            lambda f: self._failed(flow, f)
        )

    def _failed(self, flow: Flow, failure: Failure) -> None:
        if self._flows.get(flow.account) is not flow:
            return
        flow.status = "failed"
        error = failure.value
        flow.message = (
            str(error)
            if isinstance(error, OAuthError | CommandFailed | StateUnavailable)
            else (f"unexpected error: {type(error).__name__}")
        )
        if not isinstance(error, OAuthError | CommandFailed | StateUnavailable):
            log.failure("console: sign-in of {account} failed", failure, account=flow.account)
        self._audit("connect-failed", flow.admin, flow.account)

    def _token_store(self) -> TokenBackend:
        """The gateway's own store if it is shared (PostgreSQL), else the
        command's (the embedded files, which answer at once)."""
        store = getattr(self._tokens(), "store", None)
        if store is not None and store.shared:
            shared: TokenBackend = store
            return shared
        config = self._config()
        if config.state.backend == "postgresql":
            # Never a blocking connection on the reactor thread.
            raise CommandFailed("the gateway's token store is not open yet; try again")
        opened = open_store(config, create_key=True, environ=self._environ)
        assert opened is not None
        return opened

    def _store(self, flow: Flow, tokens: Tokens) -> Deferred[None] | None:
        if self._flows.get(flow.account) is not flow:
            return None  # superseded by a newer sign-in
        store = self._token_store()
        record = TokenRecord.authorized(flow.account, flow.grant, tokens, self._clock.seconds())

        def stored(_: object) -> None:
            flow.status = "done"
            flow.message = "connected: tokens stored"
            self._audit("connected", flow.admin, flow.account)

        d = store.change(flow.account, lambda _current: record, replace_unreadable=True)
        return d.addCallback(stored)

    def code_callback(self, query: str, state: str) -> Deferred[Flow | None]:
        """Finish the code grant the redirect's `state` belongs to; None if none does."""
        flow = next(
            (
                f
                for f in self._flows.values()
                if f.state is not None and f.status == "waiting" and _same(f.state, state)
            ),
            None,
        )
        if flow is None or self._clock.seconds() - flow.started > CODE_FLOW_WAIT:
            return Deferred.fromCoroutine(_none())
        assert flow.pkce is not None and flow.redirect_uri is not None
        flow.state = None  # single use
        config = self._config()
        provider = config.providers[config.accounts[flow.account].provider]
        endpoint = TokenEndpoint(provider, self._poster, self._clock)

        async def finish() -> Tokens:
            assert flow.pkce is not None and flow.redirect_uri is not None
            code = code_from_redirect(query, state)
            return await endpoint.exchange_code(code, flow.pkce.verifier, flow.redirect_uri)

        def stored(tokens: Tokens) -> Deferred[None] | None:
            return self._store(flow, tokens)

        def failed(failure: Failure) -> Flow:
            self._failed(flow, failure)
            return flow

        d: Deferred[Any] = ensureDeferred(finish())
        return d.addCallback(stored).addCallbacks(lambda _: flow, failed)

    def forget(self, name: str, admin: str) -> Deferred[str]:
        """`gateway oauth revoke`: revoke at the provider where it can, then
        mark the tokens revoked in the store (the gateway stops using them)."""
        config = self._config()
        oauth_account(config, name)
        self._drop(name)

        async def forget() -> str:
            store = self._token_store()
            at_provider = await revoke_at_provider(
                config,
                name,
                poster=self._poster,
                clock=self._clock,
                environ=self._environ,
                store=store,
            )
            await forget_tokens(config, name, store, now=self._clock.seconds())
            self._audit("forget-tokens", admin, name)
            return at_provider

        return ensureDeferred(forget())

    def check(self, name: str, admin: str) -> None:
        """`gateway check NAME`, in the background; the page shows the steps."""
        config = self._config()
        account = config.accounts.get(name)
        if account is None:
            raise CommandFailed(f"no account {name!r}")
        if self.checks.get(name, {}).get("running"):
            return
        self.checks[name] = {"running": True, "ok": None, "steps": []}
        self._audit("check", admin, name)
        d = ensureDeferred(
            check_account(
                config,
                account,
                reactor=self._reactor,
                tokens=self._tokens(),
                helo_name=socket.gethostname(),
            )
        )

        def done(result: Any) -> None:
            self.checks[name] = {
                "running": False,
                "ok": result.ok,
                "steps": [step.as_dict() for step in result.steps],
            }

        def failed(failure: Failure) -> None:
            log.failure("console: check of {account} failed", failure, account=name)
            self.checks[name] = {"running": False, "ok": False, "steps": [], "error": "see log"}

        d.addCallbacks(done, failed)

    def _drop(self, name: str) -> None:
        old = self._flows.pop(name, None)
        if old is not None and old.running is not None and not old.running.called:
            old.running.cancel()

    def stop(self) -> None:
        for name in list(self._flows):
            self._drop(name)


def _same(a: str, b: str) -> bool:
    return secrets.compare_digest(a.encode(), b.encode())


async def _none() -> None:
    return None
