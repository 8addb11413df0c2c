"""`gateway check`: walk an account's whole upstream path as the gateway would.

An admin who set up an account wants to know, before a device tries, whether
it works, and if not which step fails and what to change. The check runs the
gateway's own code for each step, so what passes here passes for devices:

- token (OAuth2 accounts): the `TokenSource` the gateway uses (the token
  manager on the same store), refreshing if the token is due;
- for the account's maildrop protocol (POP3, or IMAP for mailbox = "imap"):
  connect (TCP), TLS (implicit or STARTTLS, certificate verified), login
  (the upstream session's own login, with its classified refusals), and
  opening the maildrop (POP3 STAT; IMAP the folder's snapshot, EXAMINE
  read-only), then QUIT/LOGOUT: nothing is changed;
- for mailbox = "graph": the token is Graph's (`graph_token`), then the
  folder lookup and a one-message listing (`$top=1`, no further pages)
  through the Graph client the maildrop uses: nothing is changed;
- for SMTP (when the provider has one): connect, TLS and EHLO, AUTH, QUIT:
  nothing is sent.

A failed step ends its protocol's walk (later steps are "skipped") and
carries a `fix`: the classified refusal's advice (`gateway.upstream.refusals`)
or what to check for a connection or certificate problem. The reactor and
endpoints are injected, so tests run it in-process; `gateway.cli.check` is
the command around it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from gateway.maildrop.graph import graph_http_client
from gateway.maildrop.imap_snapshot import take_snapshot
from gateway.model import Account, Config, Endpoint, Provider
from gateway.oauth.refusal import KINDS_BY_NAME, Refusal
from gateway.upstream import imap as imap_session
from gateway.upstream import pop3 as pop3_session
from gateway.upstream import smtp as smtp_session
from gateway.upstream.connection import EndpointFactory, hostname_endpoint, or_abort
from gateway.upstream.credentials import TokenSource
from gateway.upstream.errors import UpstreamError, UpstreamRejected, describe_error
from gateway.upstream.graph import (
    GraphHTTP,
    GraphMailbox,
    GraphNotFound,
    GraphTokens,
    TokenSourceGraphTokens,
)
from gateway.upstream.refusals import describe
from gateway.upstream.smtp import SMTPUpstreamError

Outcome = Literal["ok", "failed", "skipped"]


@dataclass
class Step:
    """One step of the walk and how it went."""

    protocol: str  # "oauth", "pop3", "imap", "graph", "smtp"
    name: str  # "token", "connect", "tls", "login", "maildrop", "folder", "listing", "quit"
    outcome: Outcome
    detail: str
    fix: str | None = None
    # A classified refusal's code and kind, when the step failed with one.
    code: str | None = None
    kind: str | None = None

    @property
    def title(self) -> str:
        return self.name if self.protocol == "oauth" else f"{self.protocol} {self.name}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "step": self.name,
            "outcome": self.outcome,
            "detail": self.detail,
            "fix": self.fix,
            "code": self.code,
            "kind": self.kind,
        }


@dataclass
class AccountCheck:
    """The walk for one account."""

    account: Account
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(step.outcome != "failed" for step in self.steps)

    @property
    def failed_steps(self) -> list[Step]:
        return [step for step in self.steps if step.outcome == "failed"]

    def as_dict(self) -> dict[str, Any]:
        failed = self.failed_steps
        return {
            "account": self.account.name,
            "provider": self.account.provider,
            "username": self.account.username,
            "auth": self.account.auth,
            "ok": self.ok,
            "failed_step": failed[0].title if failed else None,
            "steps": [step.as_dict() for step in self.steps],
        }


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """An endpoint that notes when its TCP connection is up (before any TLS)."""

    def __init__(self, inner: IStreamClientEndpoint, watch: _ConnectWatch) -> None:
        self._inner = inner
        self._watch = watch

    def connect(self, protocolFactory: Any) -> Deferred[Any]:
        d: Deferred[Any] = self._inner.connect(protocolFactory)

        def connected(protocol: Any) -> Any:
            self._watch.connected = True
            return protocol

        return d.addCallback(connected)


class _ConnectWatch:
    """Tells "could not connect" from "connected, then TLS or the greeting failed"."""

    def __init__(self, inner: EndpointFactory) -> None:
        self._inner = inner
        self.connected = False

    def endpoint(self, reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
        return _WatchedEndpoint(self._inner(reactor, host, port, timeout), self)


def _where(server: Endpoint) -> str:
    return f"{server.host}:{server.port} ({server.tls} TLS)"


class _Walk:
    """The steps of one account, in order; a failure ends the current protocol's walk."""

    def __init__(
        self,
        account: Account,
        provider: Provider,
        *,
        reactor: Any,
        tokens: TokenSource | None,
        helo_name: str,
        endpoint_factory: EndpointFactory,
    ) -> None:
        self.account = account
        self.provider = provider
        self.reactor = reactor
        self.tokens = tokens
        self.helo_name = helo_name
        self.endpoint_factory = endpoint_factory
        self.result = AccountCheck(account)

    def ok(self, protocol: str, name: str, detail: str) -> None:
        self.result.steps.append(Step(protocol, name, "ok", detail))

    def failed(self, protocol: str, name: str, detail: str, fix: str, error: object = None) -> None:
        refusal = getattr(error, "refusal", None)
        code = kind = None
        if isinstance(refusal, Refusal):
            # The log detail ends with the advice; here it is the fix, shown once.
            detail = detail.removesuffix(f"; {describe(refusal)}")
            fix, code, kind = refusal.advice, refusal.code, refusal.kind.value
        self.result.steps.append(Step(protocol, name, "failed", detail, fix, code, kind))

    def skipped(self, protocol: str, names: tuple[str, ...], why: str) -> None:
        for name in names:
            self.result.steps.append(Step(protocol, name, "skipped", why))

    # -- the token ------------------------------------------------------------

    async def token(self) -> bool:
        name = self.account.name
        if self.account.auth != "oauth2":
            self.result.steps.append(
                Step("oauth", "token", "skipped", "password account: no token needed")
            )
            return True
        if self.tokens is None:
            self.failed("oauth", "token", "no token manager", "run the check with a token store")
            return False
        requests = getattr(self.tokens, "refresh_requests", None)
        before = requests(name) if callable(requests) else 0
        graph = self.account.mailbox == "graph"
        get = self.graph_tokens().graph_token if graph else self.tokens.access_token
        try:
            await get(self.account)
            if callable(requests) and requests(name) > before:
                # A refresh was due and started in the background: wait for it
                # (by joining it), so the command never exits before a rotated
                # refresh token is saved.
                await _quietly(Deferred.fromCoroutine(get(self.account, force_refresh=True)))
        except UpstreamError as e:
            if isinstance(e, UpstreamRejected):
                fix = (
                    f"run `gateway oauth authorize {name}`; `gateway oauth status {name}` "
                    "shows the account's state and last error"
                )
            else:
                fix = (
                    "the authorization server could not be asked or is failing: check the "
                    "provider's token_url and the network, then check again"
                )
            self.failed("oauth", "token", e.detail or str(e), fix, e)
            return False
        what = "Microsoft Graph access token" if graph else "access token"
        self.ok("oauth", "token", f"a valid {what} is available")
        return True

    def graph_tokens(self) -> GraphTokens:
        assert self.tokens is not None
        if isinstance(self.tokens, GraphTokens):
            return self.tokens
        return TokenSourceGraphTokens(self.tokens)

    # -- a Graph maildrop -----------------------------------------------------------------

    async def graph(self) -> None:
        folder_name, provider = self.account.folder, self.provider
        if self.tokens is None:
            fix = 'Graph accounts need auth = "oauth2" and the token store'
            self.failed("graph", "folder", "no token for Graph", fix)
            self.skipped("graph", ("listing",), "no token")
            return
        try:
            http, pool = graph_http_client(self.reactor, provider)
        except UpstreamError as e:
            self.failed("graph", "folder", e.detail or str(e), "check the provider's ca_file", e)
            self.skipped("graph", ("listing",), "no Graph client")
            return
        tokens = self.graph_tokens()

        async def token(force: bool) -> str:
            return await tokens.graph_token(self.account, force_refresh=force)

        graph = GraphHTTP(
            base_url=provider.graph_url,
            mailbox=self.account.username,
            token=token,
            http=http,
            clock=self.reactor,
            timeout=provider.timeout,
            retry_budget=provider.timeout,
        )
        try:
            try:
                folder = await GraphMailbox(graph).folder_id(folder_name)
            except UpstreamError as e:
                self.failed("graph", "folder", e.detail or str(e), self._graph_fix(e), e)
                self.skipped("graph", ("listing",), "no folder")
                return
            self.ok("graph", "folder", f"{folder_name!r} found at {provider.graph_url}")
            user = quote(self.account.username, safe="@")
            path = f"/users/{user}/mailFolders/{quote(folder, safe='')}/messages"
            try:
                page = await graph.json("GET", f"{path}?$select=id&$top=1", kind="list")
            except UpstreamError as e:
                self.failed("graph", "listing", e.detail or str(e), self._graph_fix(e), e)
                return
            listed = len(page.get("value") or [])
            more = ", more follow" if page.get("@odata.nextLink") else ""
            self.ok("graph", "listing", f"one-message listing: {listed} listed{more}")
        finally:
            graph.cancel_all()
            pool.closeCachedConnections()

    def _graph_fix(self, error: UpstreamError) -> str:
        if isinstance(error, GraphNotFound):
            return f"check the account's folder ({self.account.folder!r}) and username"
        if isinstance(error, UpstreamRejected):
            return (
                "Graph refused the token: the app needs Mail.ReadWrite (and Mail.Send) on "
                "Graph, consented (app-only: an application permission, limited to the "
                "mailbox), and username must be the mailbox"
            )
        return (
            f"check [providers.{self.provider.name}] graph_url, ca_file and that the "
            "gateway's host can reach it; then check again"
        )

    # -- connect and TLS, whatever the protocol -----------------------------------------

    async def open(
        self,
        protocol: str,
        server: Endpoint,
        connect: Callable[[EndpointFactory], Awaitable[Any]],
        later: tuple[str, ...],
    ) -> Any | None:
        watch = _ConnectWatch(self.endpoint_factory)
        try:
            client = await connect(watch.endpoint)
        except (UpstreamError, SMTPUpstreamError) as e:
            detail = e.detail or str(e)
            if not watch.connected:
                self.failed(
                    protocol,
                    "connect",
                    detail,
                    f"check the host and port of [providers.{self.provider.name}] {protocol} "
                    "and that the gateway's host can reach them (firewall, name resolution)",
                )
                self.skipped(protocol, ("tls", *later), "not connected")
                return None
            self.ok(protocol, "connect", f"connected to {server.host}:{server.port}")
            if "TLS" in detail or "certificate" in detail.lower():
                fix = (
                    f"the server's certificate did not verify as {server.host!r}: set the "
                    f"provider's ca_file to the CA that issued it, or use the host name the "
                    "certificate is for"
                )
            else:
                fix = (
                    f"the server did not set up a {server.tls} TLS session: check the "
                    "provider's port and tls mode (implicit: 995/993/465, starttls: 110/143/587)"
                )
            self.failed(protocol, "tls", detail, fix)
            self.skipped(protocol, later, "no secure session")
            return None
        self.ok(protocol, "connect", f"connected to {server.host}:{server.port}")
        self.ok(protocol, "tls", f"{_where(server)}, certificate verified for {server.host}")
        return client

    # -- the maildrop: POP3 or IMAP -----------------------------------------------------

    async def pop3(self, server: Endpoint) -> None:
        later = ("login", "maildrop")

        def connect(factory: EndpointFactory) -> Awaitable[Any]:
            return pop3_session.connect(
                self.provider, reactor=self.reactor, endpoint_factory=factory
            )

        client = await self.open("pop3", server, connect, later)
        if client is None:
            return
        if not await self.login("pop3", client, pop3_session.login, ("maildrop",)):
            return
        try:
            status = await or_abort(client, client.command(b"STAT"), "STAT failed")
        except pop3_session.ServerError as e:
            client.abort("STAT refused")
            self.failed(
                "pop3",
                "maildrop",
                f"STAT refused: {e.status.describe()}",
                "the server refused to open the mailbox after the login; see its answer",
            )
            return
        except UpstreamError as e:
            self.failed("pop3", "maildrop", e.detail or str(e), "try again; see the detail", e)
            return
        count, _, octets = status.text.decode("ascii", "replace").partition(" ")
        self.ok("pop3", "maildrop", f"STAT: {count} messages ({octets or '?'} octets)")
        await _quietly(client.quit())

    async def imap(self, server: Endpoint) -> None:
        folder = self.account.folder

        def connect(factory: EndpointFactory) -> Awaitable[Any]:
            return imap_session.connect(
                self.provider, reactor=self.reactor, endpoint_factory=factory
            )

        client = await self.open("imap", server, connect, ("login", "maildrop"))
        if client is None:
            return
        if not await self.login("imap", client, imap_session.login, ("maildrop",)):
            return
        try:
            snapshot = await or_abort(client, take_snapshot(client, folder), "EXAMINE failed")
        except UpstreamError as e:
            self.failed(
                "imap",
                "maildrop",
                e.detail or str(e),
                f"check the account's folder ({folder!r}) and the mailbox permissions",
                e,
            )
            return
        self.ok(
            "imap",
            "maildrop",
            f"EXAMINE {folder!r} (read-only): {len(snapshot.uids)} messages, "
            f"UIDVALIDITY {snapshot.uidvalidity}",
        )
        await _quietly(client.logout())

    async def login(
        self,
        protocol: str,
        client: Any,
        login: Callable[..., Awaitable[None]],
        later: tuple[str, ...],
    ) -> bool:
        try:
            await or_abort(
                client,
                login(client, self.account, self.provider, tokens=self.tokens),
                "login failed",
            )
        except UpstreamError as e:
            self.failed(protocol, "login", e.detail or str(e), _login_fix(self.account, e), e)
            self.skipped(protocol, later, "not logged in")
            return False
        how = "bearer token" if self.account.auth == "oauth2" else "password"
        self.ok(protocol, "login", f"logged in as {self.account.username} with its {how}")
        return True

    # -- SMTP ------------------------------------------------------------------------------

    async def smtp(self, server: Endpoint) -> None:
        def connect(factory: EndpointFactory) -> Awaitable[Any]:
            return smtp_session.connect(
                self.provider,
                reactor=self.reactor,
                helo_name=self.helo_name,
                endpoint_factory=factory,
            )

        client = await self.open("smtp", server, connect, ("login", "quit"))
        if client is None:
            return
        try:
            await or_abort(
                client,
                smtp_session.login(client, self.account, self.provider, self.tokens),
                "login failed",
            )
        except SMTPUpstreamError as e:
            self.failed("smtp", "login", e.detail, _login_fix(self.account, e), e)
            self.skipped("smtp", ("quit",), "not logged in")
            return
        how = "bearer token" if self.account.auth == "oauth2" else "password"
        self.ok("smtp", "login", f"EHLO and AUTH as {self.account.username} with its {how}")
        try:
            reply = await client.quit()
        except SMTPUpstreamError as e:
            self.failed("smtp", "quit", e.detail, "the session ended badly; check again")
            return
        self.ok("smtp", "quit", f"nothing sent; QUIT answered {reply.describe()}")


def _login_fix(account: Account, error: Exception) -> str:
    """What to do about a login that failed without a classified refusal."""
    if account.auth != "oauth2":
        return "check the account's username and password"
    if "gateway oauth authorize" in getattr(error, "detail", ""):
        # The token manager refused: the grant is gone (the one forced
        # refresh after the server's refusal was refused too).
        return (
            f"the provider no longer accepts the account's authorisation: run `gateway "
            f"oauth authorize {account.name}` (`gateway oauth status {account.name}` "
            "shows the provider's answer)"
        )
    return "check the provider's scopes and that username is the mailbox the token was issued for"


async def _quietly(d: Deferred[Any]) -> None:
    """QUIT/LOGOUT after a good walk: how it ends changes nothing."""
    try:
        await d
    except Exception:
        pass


async def check_account(
    config: Config,
    account: Account,
    *,
    reactor: Any,
    tokens: TokenSource | None,
    helo_name: str,
    endpoint_factory: EndpointFactory = hostname_endpoint,
) -> AccountCheck:
    """Walk `account`'s path: token, then its maildrop protocol, then SMTP."""
    provider = config.providers[account.provider]
    walk = _Walk(
        account,
        provider,
        reactor=reactor,
        tokens=tokens,
        helo_name=helo_name,
        endpoint_factory=endpoint_factory,
    )
    have_token = await walk.token()
    protocols: list[tuple[str, Endpoint | None]] = []
    maildrop = provider.imap if account.mailbox == "imap" else provider.pop3
    if account.mailbox == "graph":
        protocols.append(("graph", None))
    elif maildrop is not None:
        protocols.append((account.mailbox, maildrop))
    if provider.smtp is not None:
        protocols.append(("smtp", provider.smtp))
    for protocol, server in protocols:
        if not have_token:
            last = "quit" if protocol == "smtp" else "maildrop"
            later = ("folder", "listing") if server is None else ("connect", "tls", "login", last)
            walk.skipped(protocol, later, "no access token")
            continue
        try:
            if server is None:
                await walk.graph()
            elif protocol == "pop3":
                await walk.pop3(server)
            elif protocol == "imap":
                await walk.imap(server)
            else:
                await walk.smtp(server)
        except Exception as e:  # a bug must show as a failed step, not a traceback
            walk.failed(protocol, "unexpected", describe_error(e), "report this as a bug")
    return walk.result


def format_check(result: AccountCheck) -> list[str]:
    """The walk as text lines: one per step, the fix under each failure, then the verdict."""
    account = result.account
    lines = [
        f"account {account.name} ({account.username} at provider {account.provider}, "
        f"{account.auth})"
    ]
    width = max((len(step.title) for step in result.steps), default=0)
    for step in result.steps:
        mark = {"ok": "ok", "failed": "FAILED", "skipped": "skipped"}[step.outcome]
        kind = KINDS_BY_NAME.get(step.kind or "")
        code = f" [{step.code}: {kind.label}]" if step.code and kind else ""
        lines.append(f"  {mark:<8}{step.title:<{width}}  {step.detail}{code}")
        if step.fix:
            lines.append(f"  {'':<8}{'':<{width}}  fix: {step.fix}")
    failed = result.failed_steps
    lines.append(
        f"account {account.name}: "
        + ("ok" if not failed else "FAILED at " + ", ".join(step.title for step in failed))
    )
    return lines


__all__ = ["AccountCheck", "Step", "check_account", "format_check"]
