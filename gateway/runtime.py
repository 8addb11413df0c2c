"""What the services of one running gateway share, and how a listener becomes a service.

`Runtime` holds the objects every subsystem uses (device authenticator,
account locks, token source, UIDL store, each listener's TLS settings);
`listener_service` turns one configured listener into a Twisted service with
that listener's TLS policy. The POP3 and SMTP services (`gateway.pop3.service`,
`gateway.smtp.service`) build on both; `gateway.service` composes them.
Listening happens inside services so that twistd binds low ports (110, 995,
25, 465, 587) before it drops privileges with --uid/--gid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import Any

from OpenSSL import SSL
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet.interfaces import IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger

from gateway.devices import DeviceAuthenticator
from gateway.holder import ConfigHolder
from gateway.limits import ConnectionLimits
from gateway.locks import MailboxLocks
from gateway.locks.choose import mailbox_locks
from gateway.maildrop import Maildrop, UpstreamUnavailable
from gateway.maildrop.graph import open_graph_maildrop
from gateway.maildrop.graph_sizes import GraphSizeStore, PostgresSizeStore, SizeMap
from gateway.maildrop.imap import open_imap_maildrop
from gateway.maildrop.imap_keeper import IMAPKeeper
from gateway.maildrop.pop3 import open_pop3_maildrop
from gateway.maildrop.uidl_map import UIDLMap, UIDStore
from gateway.maildrop.uidl_map_pg import PostgresUIDLMap
from gateway.model import Account, Config, Listener
from gateway.proxy_protocol import ProxyProtocolFactory
from gateway.state import StateError
from gateway.state.backend import StateBackend, open_state_backend
from gateway.tls import ReloadableServerTLS, ServerIdentity, TLSSetupError, load_server_identity
from gateway.tls_layer import lean_tls_factory
from gateway.upstream.credentials import TokenSource
from gateway.upstream.graph import GraphTokens, TokenSourceGraphTokens
from gateway.workers.sockets import server_endpoint

log = Logger(namespace="gateway.service")

# Builds a listener's protocol factory from the TLS options for STARTTLS/STLS
# (None on an implicit-TLS listener, which `listener_service` wraps in TLS).
MakeFactory = Callable[[ReloadableServerTLS | None], IProtocolFactory]


@dataclass
class Runtime:
    """What the subsystems of one running gateway share."""

    # The current configuration: SIGHUP renews it through `holder` (gateway.reload).
    config: Config
    reactor: Any
    identity: ServerIdentity | None
    authenticator: DeviceAuthenticator
    tokens: TokenSource | None = None
    services: list[IService] = field(default_factory=list)
    # Every listener's TLS settings, so SIGHUP can give them a renewed certificate.
    listener_tls: list[ReloadableServerTLS] = field(default_factory=list)
    # The UIDL map of IMAP-backed accounts; opened at the first IMAP login,
    # after twistd has dropped privileges, so the file belongs to the gateway.
    # In the state database with the postgresql backend.
    uid_store: UIDLMap | None = None
    # Exact sizes of Graph-backed accounts' messages; opened like `uid_store`.
    graph_sizes: SizeMap | None = None
    # The upstream IMAP connections kept per account between device sessions.
    imap_keeper: IMAPKeeper = field(init=False)
    # What reads the configuration subscribes here, or reads its live mappings.
    holder: ConfigHolder = field(init=False)
    # The connection counts of both protocols' listeners; the limits are read
    # from the current configuration at each connect.
    limits: ConnectionLimits = field(init=False)
    # Where what nodes and workers must agree on lives (gateway.state): given
    # by `make_service`; built from `config.state` when left out.
    state_backend: InitVar[StateBackend | None] = None
    state: StateBackend = field(init=False)
    # [IN-USE] across this host's workers (embedded) or every node (PostgreSQL).
    locks: MailboxLocks = field(init=False)

    def __post_init__(self, state_backend: StateBackend | None) -> None:
        self.state = state_backend or open_state_backend(self.config.state, self.reactor)
        self.locks = mailbox_locks(self.state, self.config.state_dir, self.reactor)
        self.holder = ConfigHolder(self.config)
        self.imap_keeper = IMAPKeeper(self.reactor)
        self.limits = ConnectionLimits(lambda: self.config.limits)
        self.holder.on_reload(self._reconfigure)

    def _reconfigure(self, config: Config) -> None:
        self.config = config

    def reload_tls(self) -> None:
        """Read the certificate and key files again (SIGHUP). New sessions get
        the new certificate; open ones keep theirs. A file that cannot be used
        leaves the old certificate in place, with an error line saying why."""
        files = self.config.tls
        if files is None or not self.listener_tls:
            return
        try:
            identity = load_server_identity(files)
            for tls in self.listener_tls:
                tls.reload(identity)
        except (TLSSetupError, SSL.Error, ValueError) as e:
            log.error(
                "tls certificate reload failed, still serving the previous one: {error}",
                error=str(e) or type(e).__name__,
            )
            return
        self.identity = identity
        log.info(
            "tls certificate reloaded from {certificate} for {count} listeners, "
            "valid until {expiry}",
            certificate=str(files.certificate),
            count=len(self.listener_tls),
            expiry=identity.certificate.to_cryptography().not_valid_after_utc.isoformat(),
        )

    def imap_uid_store(self) -> UIDLMap:
        if self.uid_store is None:
            if self.state.database is not None:
                self.uid_store = PostgresUIDLMap(self.state.database)
                return self.uid_store
            try:
                self.uid_store = UIDStore.in_state_dir(self.config.state_dir)
            except StateError as e:
                raise UpstreamUnavailable(str(e)) from None
        return self.uid_store

    def graph_size_store(self) -> SizeMap:
        if self.graph_sizes is None:
            if self.state.database is not None:
                self.graph_sizes = PostgresSizeStore(self.state.database)
                return self.graph_sizes
            try:
                self.graph_sizes = GraphSizeStore.in_state_dir(self.config.state_dir)
            except StateError as e:
                raise UpstreamUnavailable(str(e)) from None
        return self.graph_sizes

    def graph_tokens(self) -> GraphTokens | None:
        """The token manager's Graph tokens if it has them, else its one token."""
        if self.tokens is None or isinstance(self.tokens, GraphTokens):
            return self.tokens
        return TokenSourceGraphTokens(self.tokens)

    async def open_maildrop(self, account: Account) -> Maildrop:
        provider = self.config.providers[account.provider]
        if account.mailbox == "graph":
            return await open_graph_maildrop(
                account,
                provider,
                reactor=self.reactor,
                tokens=self.graph_tokens(),
                sizes=self.graph_size_store(),
            )
        if account.mailbox == "imap" and account.keep_connection:
            return await self.imap_keeper.open(
                account, provider, uid_store=self.imap_uid_store(), tokens=self.tokens
            )
        if account.mailbox == "imap":
            return await open_imap_maildrop(
                account,
                provider,
                reactor=self.reactor,
                uid_store=self.imap_uid_store(),
                tokens=self.tokens,
            )
        return await open_pop3_maildrop(account, provider, reactor=self.reactor, tokens=self.tokens)


def listen_endpoint(reactor: Any, listener: Listener) -> IStreamServerEndpoint:
    # A worker process adopts the socket its parent bound (gateway.workers).
    return server_endpoint(reactor, listener.address, listener.port)


def listener_service(runtime: Runtime, listener: Listener, make_factory: MakeFactory) -> IService:
    """A listening service with the listener's TLS policy.

    `make_factory(tls_options)` builds the protocol factory; it gets the
    options for STARTTLS/STLS on a "starttls" listener and None on an
    "implicit" one, which is wrapped in TLS here. A `proxy_protocol`
    listener is wrapped once more, outside TLS, to read the PROXY header first.
    """
    assert runtime.identity is not None, "config validation requires [tls] for listeners"
    tls_options = ReloadableServerTLS(runtime.identity, listener)
    runtime.listener_tls.append(tls_options)
    factory = make_factory(tls_options if listener.tls == "starttls" else None)
    if listener.tls == "implicit":
        factory = lean_tls_factory(tls_options, False, factory)
    if listener.proxy_protocol:
        # Outside TLS: the proxy writes its header before the device's
        # ClientHello, and before any greeting on a STARTTLS listener.
        factory = ProxyProtocolFactory(
            factory,
            trusted=runtime.config.proxy.trusted,
            clock=runtime.reactor,
            header_timeout=runtime.config.proxy.header_timeout,
            name=f"{listener.protocol} {listener.address}:{listener.port}",
        )
    service = StreamServerEndpointService(listen_endpoint(runtime.reactor, listener), factory)
    service.setName(f"{listener.protocol}-{listener.tls}-{listener.address}-{listener.port}")
    log.info(
        "{protocol} listener on {address}:{port} tls={tls} min_tls={min_tls}"
        " proxy_protocol={proxy_protocol}",
        protocol=listener.protocol,
        address=listener.address,
        port=listener.port,
        tls=listener.tls,
        min_tls=listener.min_tls,
        proxy_protocol="required" if listener.proxy_protocol else "no",
    )
    return service
