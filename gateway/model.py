"""The configuration model: providers, accounts, devices and listeners.

These frozen objects are what the rest of the gateway sees; `gateway.config`
builds them from the operator's TOML file and reports every problem it finds.
Keeping the model apart from the loader lets tests and the demo build a
configuration in code without writing a file.

Defaults and choices are written here once: the dataclass defaults and the
`Literal` types. The loader reads both from here (`field_default`, the
`*_CHOICES` tuples derived with `typing.get_args`), so a default changed here
is the default of the config file too.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args

from gateway.net import parse_peer_address

TLSMode = Literal["implicit", "starttls"]
TLSVersionName = Literal["1.0", "1.1", "1.2", "1.3"]
# What a device may speak to the gateway, and what a provider may offer.
DeviceProtocol = Literal["pop3", "smtp"]
UpstreamProtocol = Literal["pop3", "imap", "smtp"]
POP3Auth = Literal["auto", "user", "plain"]
AccountAuth = Literal["password", "oauth2"]
MailboxKind = Literal["pop3", "imap", "graph"]
# How an account's spooled mail leaves: the provider's SMTP service, or
# Microsoft Graph's sendMail (`gateway.smtp.graph_delivery`).
RelayKind = Literal["smtp", "graph"]
SASLChoice = Literal["auto", "xoauth2", "oauthbearer"]
Grant = Literal["device_code", "authorization_code", "client_credentials", "service_account"]
# Whether the app registration may hold its secret (RFC 6749 2.1). "auto": the
# preset decides (Microsoft: public; Google's installed-app clients send
# theirs); without a preset, a configured secret is sent.
ClientType = Literal["auto", "public", "confidential"]
# Microsoft's cloud instances (gateway.oauth.clouds has their hosts).
Cloud = Literal["global", "usgov", "dod", "china"]
DeletePolicy = Literal["expunge", "move", "keep"]
LogFormat = Literal["text", "json"]
# [smtp] long_lines: fold lines over 998 octets like Postfix, or refuse with 554.
LongLines = Literal["fold", "refuse"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

TLS_MODES: Final[tuple[TLSMode, ...]] = get_args(TLSMode)
TLS_VERSIONS: Final[tuple[TLSVersionName, ...]] = get_args(TLSVersionName)
DEVICE_PROTOCOLS: Final[tuple[DeviceProtocol, ...]] = get_args(DeviceProtocol)
UPSTREAM_PROTOCOLS: Final[tuple[UpstreamProtocol, ...]] = get_args(UpstreamProtocol)
POP3_AUTH_CHOICES: Final[tuple[POP3Auth, ...]] = get_args(POP3Auth)
ACCOUNT_AUTH_CHOICES: Final[tuple[AccountAuth, ...]] = get_args(AccountAuth)
MAILBOX_CHOICES: Final[tuple[MailboxKind, ...]] = get_args(MailboxKind)
RELAY_CHOICES: Final[tuple[RelayKind, ...]] = get_args(RelayKind)
SASL_CHOICES: Final[tuple[SASLChoice, ...]] = get_args(SASLChoice)
GRANTS: Final[tuple[Grant, ...]] = get_args(Grant)
CLIENT_TYPES: Final[tuple[ClientType, ...]] = get_args(ClientType)
CLOUDS: Final[tuple[Cloud, ...]] = get_args(Cloud)
# Grants the gateway runs by itself, with no admin at a browser: it fetches
# their tokens at first use and before expiry.
APP_ONLY_GRANTS: Final[frozenset[Grant]] = frozenset({"client_credentials", "service_account"})
DELETE_POLICIES: Final[tuple[DeletePolicy, ...]] = get_args(DeletePolicy)
LOG_FORMATS: Final[tuple[LogFormat, ...]] = get_args(LogFormat)
LONG_LINES_CHOICES: Final[tuple[LongLines, ...]] = get_args(LongLines)
StateBackendName = Literal["embedded", "postgresql"]
STATE_BACKENDS: Final[tuple[StateBackendName, ...]] = get_args(StateBackendName)

# An OAuth2 account without `grant` gets its preset's default grant, or this
# one: the device-code grant needs nothing but a browser somewhere.
DEFAULT_GRANT: Final[Grant] = "device_code"
# Microsoft Graph, global service (national clouds have their own host).
DEFAULT_GRAPH_URL: Final = "https://graph.microsoft.com/v1.0"
DEFAULT_STATE_DIR: Final = Path("/var/lib/gateway")

ANY_ADDRESS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("0.0.0.0/0"),
    ipaddress.ip_network("::/0"),
)


class Secret:
    """A string that never shows itself in a repr, a log line or a traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Endpoint:
    """One upstream server: where it listens and how TLS starts there."""

    host: str
    port: int
    tls: TLSMode = "implicit"


@dataclass(frozen=True)
class ServiceAccountKey:
    """A Google service account's JSON key file, as far as the JWT bearer grant
    (RFC 7523) needs it: who signs, with which RSA key, for which token URL."""

    client_email: str
    private_key: Secret
    token_uri: str
    private_key_id: str | None = None


@dataclass(frozen=True)
class OAuthClient:
    """The gateway's registration at a provider's OAuth2 authorization server.

    URLs are https (plain http only on loopback, for tests). `scopes` are the
    delegated scopes asked for with the device-code and authorization-code
    grants; `app_scopes` those of the client-credentials grant (Microsoft 365
    app-only access wants the resource's `.default` scope instead).
    """

    token_url: str
    client_id: str
    device_authorization_url: str | None = None
    authorization_url: str | None = None
    client_secret: Secret | None = None
    scopes: tuple[str, ...] = ()
    app_scopes: tuple[str, ...] = ()
    client_type: ClientType = "auto"
    # RFC 7009 token revocation (Google has one; Microsoft has none for
    # refresh tokens).
    revocation_url: str | None = None
    # The host of the code grant's loopback redirect, in the form the
    # provider documents: Microsoft registers http://localhost (any port),
    # Google's desktop clients http://127.0.0.1:PORT.
    loopback_host: str = "localhost"
    # Google Workspace: the service account that signs JWT bearer grants.
    service_account: ServiceAccountKey | None = None


@dataclass(frozen=True)
class Provider:
    """Where an upstream lives. `ca_file` None means the system trust store."""

    name: str
    pop3: Endpoint | None = None
    imap: Endpoint | None = None
    smtp: Endpoint | None = None
    ca_file: Path | None = None
    # Seconds for connecting and for each upstream command (login, LIST, ...).
    timeout: float = 30.0
    # How to log in to POP3 with a password: "user" (USER/PASS) or "plain"
    # (AUTH PLAIN). "auto" picks AUTH PLAIN when CAPA offers it.
    pop3_auth: POP3Auth = "auto"
    # "microsoft365", "outlook", "gmail" or None; a preset fills endpoints,
    # `oauth`, `sasl` and the default grant.
    preset: str | None = None
    oauth: OAuthClient | None = None
    # Bearer-token SASL mechanism; "auto" picks from what the server offers.
    sasl: SASLChoice = "auto"
    # Microsoft presets: the tenant and cloud instance the URLs were built for.
    tenant: str | None = None
    cloud: Cloud | None = None
    # The grant of an account that names none (the preset's, else DEFAULT_GRANT).
    default_grant: Grant = DEFAULT_GRANT
    # Microsoft Graph's base URL, for accounts with mailbox = "graph".
    graph_url: str = DEFAULT_GRAPH_URL

    @property
    def graph(self) -> str | None:
        """The Graph "endpoint", named like `pop3`/`imap` so that
        `getattr(provider, account.mailbox)` works for Graph accounts too."""
        return self.graph_url


@dataclass(frozen=True)
class Account:
    """One upstream mailbox identity at a provider."""

    name: str
    provider: str
    username: str
    password: Secret | None = None
    auth: AccountAuth = "password"
    # OAuth2 accounts only: how the tokens are obtained (the loader fills in
    # the provider's default grant when the file names none).
    grant: Grant | None = None
    # Where a device's POP3 maildrop comes from: the upstream's POP3 service,
    # one folder of its IMAP service, or one folder through Microsoft Graph.
    mailbox: MailboxKind = "pop3"
    folder: str = "INBOX"
    on_delete: DeletePolicy = "expunge"
    move_to: str | None = None
    # IMAP-backed: set \Seen on messages a device retrieved.
    mark_seen: bool = False
    # IMAP-backed: keep one logged-in upstream connection open between device
    # sessions (`gateway.maildrop.imap_keeper`), closed `keep_idle` seconds
    # after the last session ended.
    keep_connection: bool = True
    keep_idle: float = 300.0
    # SMTP: envelope senders a device may use (exact addresses or "*@domain");
    # empty means only the account's own address (`username`).
    allowed_senders: tuple[str, ...] = ()
    rewrite_sender: bool = False
    rewrite_from_header: bool = False
    # SMTP relay path; None: Graph when the provider has no smtp endpoint and
    # the account's maildrop is Graph, else SMTP (`gateway.smtp.relay_path`).
    relay: RelayKind | None = None
    # Graph relay: a copy in Sent Items. Graph's MIME send always keeps one
    # (api/user-sendmail), so only true is accepted.
    save_to_sent: bool = True


@dataclass(frozen=True)
class Device:
    """One local client identity; it logs in with its own password."""

    name: str
    password_hash: Secret
    account: str
    allow_from: tuple[IPNetwork, ...] = ANY_ADDRESS
    protocols: frozenset[str] = frozenset(DEVICE_PROTOCOLS)
    # SMTP: a device identified only by its source address (allow_from), for
    # printers that cannot authenticate at all.
    relay_without_auth: bool = False

    def allowed(self, address: str) -> bool:
        ip = parse_peer_address(address)
        if ip is None:
            return False
        return any(ip.version == net.version and ip in net for net in self.allow_from)


@dataclass(frozen=True)
class Listener:
    """One listening socket for devices."""

    protocol: DeviceProtocol
    port: int
    tls: TLSMode
    address: str = "0.0.0.0"
    min_tls: TLSVersionName = "1.2"
    # Accept USER/PASS/AUTH on a starttls listener before STLS. Off by default:
    # a device's password would cross the network in clear.
    allow_plaintext_auth: bool = False
    # Every connection starts with a PROXY protocol header (v1 or v2, from
    # HAProxy's send-proxy / send-proxy-v2) naming the device's address; only
    # peers in `ProxySettings.trusted` may connect, and a missing header closes.
    proxy_protocol: bool = False


@dataclass(frozen=True)
class TLSFiles:
    certificate: Path
    private_key: Path


@dataclass(frozen=True)
class POP3Settings:
    listeners: tuple[Listener, ...] = ()
    # RFC 1939 asks for at least ten minutes before an idle session is closed.
    idle_timeout: float = 600.0
    # gateway.command_queue: a device that leaves its replies unread this long
    # is closed; a command line must end this long after its first byte; a
    # refused login is answered after this pause.
    stall_timeout: float = 120.0
    line_timeout: float = 60.0
    auth_failure_delay: float = 1.0


@dataclass(frozen=True)
class SMTPSettings:
    listeners: tuple[Listener, ...] = ()
    # RFC 5321 4.5.3.2 suggests 5 minutes per command.
    idle_timeout: float = 300.0
    # As for POP3Settings.
    stall_timeout: float = 120.0
    line_timeout: float = 60.0
    auth_failure_delay: float = 1.0
    # Microsoft 365's own default limit is 35 MB; larger is refused at MAIL/DATA.
    max_message_size: int = 35 * 1024 * 1024
    max_recipients: int = 100
    # Spool: first retry soon, then exponential backoff up to the maximum
    # interval; a message still undelivered after its lifetime bounces.
    retry_first: float = 30.0
    retry_max_interval: float = 3600.0
    message_lifetime: float = 5 * 24 * 3600.0
    # A line over 998 octets (RFC 5321 4.5.3.1.6): folded with CRLF SPACE as
    # Postfix does, or the message refused with 554 5.6.0. A device that gets
    # 554 usually never sends the message again, hence folding by default.
    long_lines: LongLines = "fold"
    # Upstream connections per account at once (Microsoft 365 allows 3
    # concurrent SMTP AUTH connections per mailbox), how long an idle one is
    # kept for the next message, and how often `gateway queue` requests are
    # looked for.
    relay_connections: int = 3
    relay_keepalive: float = 2.0
    control_interval: float = 2.0


@dataclass(frozen=True)
class OAuthSettings:
    # The key that encrypts tokens at rest; None: state_dir/gateway.key,
    # generated on first use (or the GATEWAY_KEY environment variable).
    key_file: Path | None = None
    # Refresh this long before the access token expires.
    refresh_margin: float = 300.0
    # Refresh at least this often even when idle, so that refresh tokens do not
    # age out (Microsoft expires them after 90 days without use).
    idle_refresh_interval: float = 3 * 24 * 3600.0


@dataclass(frozen=True)
class AdminUser:
    """One web console login (`[admin.users.NAME]`), with its argon2 hash."""

    name: str
    password_hash: Secret


@dataclass(frozen=True)
class AdminSettings:
    """The admin HTTP listener (`[admin]`): metrics, health, later the web console.

    It exists only when the file has an `[admin]` section. Loopback by
    default: what it shows names devices and accounts.
    """

    address: str = "127.0.0.1"
    port: int = 9925
    # None: HTTPS with the [tls] certificate unless `address` is a loopback
    # address, plain HTTP there.
    tls: bool | None = None
    # `[admin.users.NAME]`: who may log in to the web console; none, no console.
    users: Mapping[str, AdminUser] = field(default_factory=dict)
    # A console session unused this long is over (`session_idle`, seconds).
    session_idle: float = 1800.0

    @property
    def uses_tls(self) -> bool:
        if self.tls is not None:
            return self.tls
        return not ipaddress.ip_address(self.address).is_loopback


@dataclass(frozen=True)
class LogSettings:
    # "text": twistd's lines; "json": one JSON object per line, with the
    # fields of each event (session, delivery, ...) as keys.
    format: LogFormat = "text"


@dataclass(frozen=True)
class ProxySettings:
    """Who may put a PROXY protocol header in front of a listener's connections."""

    # The load balancers' networks. Empty: no listener may set proxy_protocol,
    # since the header is a claim anyone could otherwise make.
    trusted: tuple[IPNetwork, ...] = ()
    # A trusted peer that has sent no whole header by then is closed, so a
    # silent connection does not hold a socket.
    header_timeout: float = 10.0


@dataclass(frozen=True)
class LimitSettings:
    """How many device connections the gateway holds at once, and for how long
    (`[limits]`, POP3 and SMTP counted together).

    Sized for a site of some hundred devices: a printer or scanner holds one
    or two sessions, so a device or an address far above that is a loop, a
    scanner or an attack, not a device at work.
    """

    # All device connections at once, both protocols.
    max_connections: int = 1000
    # From one source address (the PROXY protocol's address behind a balancer).
    max_connections_per_address: int = 20
    # Sessions one device is logged in to at once, both protocols.
    max_sessions_per_device: int = 4
    # Seconds a session may last in all, busy or not (the idle timeouts still
    # apply); then it is closed like an idle one, deleting nothing upstream.
    max_session_lifetime: float = 3600.0


@dataclass(frozen=True)
class PenaltySettings:
    """`[penalties]`: login penalties after Dovecot's auth penalty (gateway.penalties).

    Each failed login from an address (an IPv6 address by its /`ipv6_prefix`
    network) doubles the pause before the next answer to it, 2, 4, 8 s up to
    `max_delay`; `lockout_after` failures within `lockout_window` refuse the
    address outright for `lockout_time`. The same per device name and address,
    and a device name failing `device_slow_after` times from all addresses
    slows every address it has not logged in from (never locks them).
    """

    enabled: bool = True
    max_delay: float = 15.0
    lockout_after: int = 10
    lockout_window: float = 600.0
    lockout_time: float = 900.0
    device_slow_after: int = 30
    ipv6_prefix: int = 64
    # Exempt from every penalty (a webmail host, a monitoring probe).
    trusted: tuple[IPNetwork, ...] = ()
    # Addresses, device names and (device, address) pairs remembered, at most,
    # each: unknown names and rotating addresses cannot grow memory past it.
    max_entries: int = 10000


@dataclass(frozen=True)
class StateSettings:
    """`[state]`: where the state nodes must agree on lives (gateway.state).

    "embedded" keeps it under `state_dir`, for one host (its worker processes
    share it through file locks). "postgresql" keeps it in one database that
    every node reaches, so any node can serve any device and take over a dead
    node's queued mail.
    """

    backend: StateBackendName = "embedded"
    # A libpq connection string ("host=db1 dbname=gateway user=gateway") or a
    # postgresql:// URI; its password, if any, comes from `password_file`.
    dsn: str = ""
    password: Secret | None = None
    # How this node names itself in locks, leases and `gateway state status`;
    # "" means the host name.
    node: str = ""
    # A process that has not renewed its heartbeat for this long is dead: its
    # mailbox locks are free and its in-flight messages are taken over.
    lease_time: float = 30.0
    # Connections (and threads) per gateway process.
    pool_size: int = 4
    # How long a device waits for the database before it is told to retry.
    timeout: float = 5.0


@dataclass(frozen=True)
class Config:
    state_dir: Path
    tls: TLSFiles | None
    pop3: POP3Settings = field(default_factory=POP3Settings)
    smtp: SMTPSettings = field(default_factory=SMTPSettings)
    oauth: OAuthSettings = field(default_factory=OAuthSettings)
    # None: no admin listener (no `[admin]` section).
    admin: AdminSettings | None = None
    log: LogSettings = field(default_factory=LogSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    penalties: PenaltySettings = field(default_factory=PenaltySettings)
    state: StateSettings = field(default_factory=StateSettings)
    # Reactor processes serving the listeners (gateway.workers); the file's
    # `workers = "auto"` means one per core. One by default: exactly the
    # single process of before, which a site of printers polling each minute
    # never takes past a fraction of one core; more is an informed choice
    # (a process's memory per worker, and state the workers must share
    # through gateway.state).
    workers: int = 1
    providers: dict[str, Provider] = field(default_factory=dict)
    accounts: dict[str, Account] = field(default_factory=dict)
    devices: dict[str, Device] = field(default_factory=dict)
    source: Path | None = None
    # What the loader found unwise but workable, one line each, as
    # "key.path: message" (a secret file others can read, say).
    warnings: tuple[str, ...] = ()


def field_default(cls: type[Any], name: str) -> Any:
    """The default of one field of a model dataclass, for the loader: a key
    left out of the file means what leaving the argument out means here."""
    for item in dataclasses.fields(cls):
        if item.name != name:
            continue
        if item.default is not dataclasses.MISSING:
            return item.default
        if item.default_factory is not dataclasses.MISSING:
            return item.default_factory()
        break
    raise LookupError(f"{cls.__name__}.{name} has no default")


def listener_name(listener: Listener) -> str:
    """How logs, metrics and the service tree name a listener:
    "pop3-implicit-0.0.0.0-995"."""
    return f"{listener.protocol}-{listener.tls}-{listener.address}-{listener.port}"
