"""Load the operator's TOML file into the frozen model of `gateway.model`.

An admin fixing a config wants the whole list of mistakes at once, each named
by the key path they would search the file for, so the loader never stops at
the first problem and never shows a traceback: it collects `Problem`s and
raises one `ConfigError` holding all of them.

Reading goes through `_Table`, a small typed reader that remembers which keys
were asked for. Keys nobody asked for are reported as unknown, because a
misspelt key that is silently ignored (say `alow_from`) leaves a device open to
every network while the admin believes otherwise.

Each section has one function. A function that found a problem in its entry
builds nothing, and later checks only look at what was built, so one mistake
is reported once, where it is, rather than again at every reference to it.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import argon2
from cryptography.hazmat.primitives import serialization

from gateway.model import (
    ANY_ADDRESS,
    Account,
    Config,
    Device,
    Endpoint,
    IPNetwork,
    Listener,
    OAuthClient,
    OAuthSettings,
    POP3Settings,
    Provider,
    Secret,
    SMTPSettings,
    TLSFiles,
)
from gateway.oauth.presets import NEEDS_TENANT, PRESETS
from gateway.tls import ServerIdentity, TLSSetupError, load_server_identity, load_trust_root

DEFAULT_CONFIG_PATH: Final = Path("/etc/gateway/gateway.toml")
CONFIG_ENV: Final = "GATEWAY_CONFIG"
DEFAULT_STATE_DIR: Final = Path("/var/lib/gateway")

TLS_MODES: Final = ("implicit", "starttls")
TLS_VERSIONS: Final = ("1.0", "1.1", "1.2", "1.3")
DEVICE_PROTOCOLS: Final = ("pop3", "smtp")
ENDPOINT_PROTOCOLS: Final = ("pop3", "imap", "smtp")
POP3_AUTH_METHODS: Final = ("auto", "user", "plain")
ACCOUNT_AUTH_METHODS: Final = ("password", "oauth2")
GRANTS: Final = ("device_code", "authorization_code", "client_credentials")
MAILBOX_KINDS: Final = ("pop3", "imap")
DELETE_POLICIES: Final = ("expunge", "move", "keep")
SASL_CHOICES: Final = ("auto", "xoauth2", "oauthbearer")
LISTENER_PROTOCOLS: Final = ("pop3", "smtp")
_SENDER: Final = re.compile(r"(\*|[^@\s*]+)@[^@\s*]+\.?[^@\s*]*")

# Well-known ports, so that an endpoint or listener needs a port only when it
# is unusual.
DEFAULT_PORTS: Final = {
    ("pop3", "implicit"): 995,
    ("pop3", "starttls"): 110,
    ("imap", "implicit"): 993,
    ("imap", "starttls"): 143,
    ("smtp", "implicit"): 465,
    ("smtp", "starttls"): 587,
}

_ARGON2_PREFIXES: Final = ("$argon2id$", "$argon2i$", "$argon2d$")
_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
# Names become POP3 user names and words in log lines: one token each.
_TOKEN: Final = re.compile(r"[^\s\x00-\x1f\x7f]+")

T = TypeVar("T")


# -- results ---------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the file; `path` is "" when it concerns the whole file."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """The file cannot be used; `problems` lists every reason found.

    They come section by section in the order of the example file (state_dir,
    tls, pop3, providers, accounts, devices), then entry by entry in file order.

    `unreadable` says the file itself could not be opened: then the admin most
    needs to know how that file was chosen, and a command should say so.
    """

    def __init__(self, source: Path, problems: list[Problem], *, unreadable: bool = False) -> None:
        self.source = source
        self.problems = list(problems)
        self.unreadable = unreadable
        count = len(self.problems)
        lines = [f"{count} problem{'' if count == 1 else 's'} in {source}:"]
        lines += [f"  {problem}" for problem in self.problems]
        super().__init__("\n".join(lines))


# -- which file ------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigLocation:
    """Which file an admin command uses and why: a failure must say both."""

    path: Path
    origin: str


def locate_config(
    explicit: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> ConfigLocation:
    """`--config FILE`, else `$GATEWAY_CONFIG`, else the default path."""
    env = os.environ if environ is None else environ
    if explicit is not None:
        return ConfigLocation(Path(explicit), "given on the command line")
    if env.get(CONFIG_ENV):
        return ConfigLocation(Path(env[CONFIG_ENV]), f"from ${CONFIG_ENV}")
    return ConfigLocation(
        DEFAULT_CONFIG_PATH,
        f"the default; use --config FILE or set ${CONFIG_ENV} to choose another",
    )


def find_config_path(
    explicit: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> Path:
    return locate_config(explicit, environ).path


# -- the typed table reader --------------------------------------------------------


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = _Required()
_INVALID: Final = object()


def key_path(parent: str, key: str) -> str:
    """Spell a key path as it would be written in TOML, quoting unusual keys."""
    if not _BARE_KEY.fullmatch(key):
        key = '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{parent}.{key}" if parent else key


def _kind(value: object) -> str:
    """Name a value's type as the TOML spec does: the admin never wrote Python."""
    if isinstance(value, bool):
        return "a boolean"
    names = {
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), "a date/time")


class _Reader:
    """What all tables of one file share: the problem list and the base directory."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[Problem] = []
        # Every listener built, POP3 and SMTP alike, with its key path: two on
        # one port clash whatever their protocol.
        self.listeners: list[tuple[str, Listener]] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def mark(self) -> int:
        return len(self.problems)

    def clean_since(self, mark: int) -> bool:
        """Whether nothing went wrong since `mark`: only then is an object built."""
        return len(self.problems) == mark


class _Table:
    """One TOML table being read, named by its key path in problems.

    Getters return the value, the default when the key is absent, or None
    after reporting a problem. `valid` is False for a stand-in for a value
    that was not a table: its missing keys are not worth a second report.
    """

    def __init__(
        self, data: Mapping[str, Any], path: str, reader: _Reader, *, valid: bool = True
    ) -> None:
        self.data = data
        self.path = path
        self.reader = reader
        self.valid = valid
        self._seen: set[str] = set()

    def at(self, key: str) -> str:
        return key_path(self.path, key)

    def problem(self, key: str | None, message: str) -> None:
        self.reader.add(self.at(key) if key is not None else self.path, message)

    def has(self, key: str) -> bool:
        """Whether the key is present; asking makes it a known key, so that a
        misspelling of it is not just unknown but gets a "did you mean"."""
        self._seen.add(key)
        return key in self.data

    def _take(self, key: str, default: object, wanted: tuple[type, ...], expected: str) -> Any:
        """The raw value, `default` if absent, `_INVALID` once reported as wrong."""
        self._seen.add(key)
        if key not in self.data:
            if default is not REQUIRED:
                return default
            if self.valid:
                self.problem(key, "required key is missing")
            return _INVALID
        value = self.data[key]
        # bool is an int to Python, but `port = true` is not a port to anyone.
        if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
            self.problem(key, f"expected {expected}, got {_kind(value)}")
            return _INVALID
        return value

    def string(
        self, key: str, default: object = REQUIRED, *, choices: tuple[str, ...] | None = None
    ) -> Any:
        expected = "a string"
        if choices is not None:
            # min_tls = 1.2 parses as a float: show that quotes are needed.
            expected = "one of " + ", ".join(f'"{choice}"' for choice in choices)
        value = self._take(key, default, (str,), expected)
        if value is _INVALID:
            return None
        if not self.has(key):
            return value  # the default, taken as given
        if choices is not None and value not in choices:
            self.problem(key, f"must be one of {', '.join(choices)} (got {value!r})")
            return None
        if value == "":
            self.problem(key, "is empty")
            return None
        return value

    def secret(self, key: str, default: object = REQUIRED) -> Any:
        """A string whose value must not appear in any message."""
        value = self._take(key, default, (str,), "a string")
        if value == "":
            self.problem(key, "is empty")
            return None
        return None if value is _INVALID else value

    def integer(self, key: str, default: object = REQUIRED, *, low: int, high: int) -> Any:
        value = self._take(key, default, (int,), "an integer")
        if value is _INVALID:
            return None
        if not self.has(key):
            return value  # the default, taken as given
        if not low <= value <= high:
            self.problem(key, f"must be between {low} and {high} (got {value})")
            return None
        return value

    def seconds(self, key: str, default: float) -> float | None:
        """A positive duration; `30` and `30.0` both mean thirty seconds."""
        value = self._take(key, default, (int, float), "a number of seconds")
        if value is _INVALID:
            return None
        if not (value > 0 and math.isfinite(value)):
            self.problem(key, f"must be a finite number greater than 0 (got {value})")
            return None
        return float(value)

    def boolean(self, key: str, default: bool) -> bool | None:
        value = self._take(key, default, (bool,), "true or false")
        return None if value is _INVALID else value

    def file(self, key: str, default: object = REQUIRED) -> Path | None:
        """A path, taken relative to the config file's directory unless absolute,
        so that a config and its secrets can move together."""
        value = self.string(key, default)
        if not isinstance(value, str):
            return value
        return self.reader.base_dir / value

    def existing_file(self, key: str, default: object = REQUIRED) -> Path | None:
        """A path that must name a regular file. Checked here so the message is
        the same plain "file not found" whichever loader opens it later."""
        path = self.file(key, default)
        if path is None:
            return None
        if not path.exists():
            self.problem(key, f"{path}: file not found")
            return None
        if not path.is_file():
            self.problem(key, f"{path}: not a regular file")
            return None
        return path

    def strings(self, key: str) -> Iterator[tuple[str, str]]:
        """An array of strings as (item path, value) pairs, so that each item
        is blamed by its own index. Lazy, so problems come out in item order;
        items that are not strings are reported and skipped."""
        value = self._take(key, [], (list,), "an array of strings")
        if value is _INVALID:
            return
        for index, item in enumerate(value):
            path = f"{self.at(key)}[{index}]"
            if isinstance(item, str):
                yield path, item
            else:
                self.reader.add(path, f"expected a string, got {_kind(item)}")

    def table(self, key: str) -> _Table:
        """A sub-table; an absent one reads as empty so that its defaults apply."""
        value = self._take(key, {}, (dict,), "a table")
        if value is _INVALID:
            return _Table({}, self.at(key), self.reader, valid=False)
        return _Table(value, self.at(key), self.reader)

    def tables(self, key: str) -> Iterator[_Table]:
        """An array of tables (`[[pop3.listen]]`), each named by its index."""
        value = self._take(key, [], (list,), f"an array of tables, written [[{self.at(key)}]]")
        if value is _INVALID:
            return
        for index, item in enumerate(value):
            path = f"{self.at(key)}[{index}]"
            if isinstance(item, dict):
                yield _Table(item, path, self.reader)
            else:
                self.reader.add(path, f"expected a table, got {_kind(item)}")

    def entries(self) -> Iterator[tuple[str, _Table]]:
        """Each entry of a table of named things (`[devices.NAME]`)."""
        for name, value in self.data.items():
            self._seen.add(name)
            if not _TOKEN.fullmatch(name):
                self.problem(name, "a name must be non-empty and contain no spaces")
            elif not isinstance(value, dict):
                self.problem(name, f"expected a table, got {_kind(value)}")
            else:
                yield name, _Table(value, self.at(name), self.reader)

    def finish(self) -> None:
        """Report every key that nothing asked for."""
        known = sorted(self._seen)
        for key in self.data:
            if key not in self._seen:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.problem(key, f"unknown key{hint}")


# -- the file and its sections ---------------------------------------------------------


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the whole file; raise `ConfigError` listing every problem."""
    source = Path(path).absolute()
    data = _parse(source)
    reader = _Reader(source.parent)
    root = _Table(data, "", reader)

    state_dir = root.file("state_dir", DEFAULT_STATE_DIR)
    tls = _tls_section(root, wanted_by=_listener_count(data))
    pop3 = _pop3_section(root.table("pop3"))
    smtp = _smtp_section(root.table("smtp"))
    _check_listener_overlap(reader)
    oauth = _oauth_section(root.table("oauth"))
    providers, provider_names = _named_section(root.table("providers"), _provider)
    accounts, account_names = _named_section(
        root.table("accounts"), lambda name, table: _account(name, table, provider_names)
    )
    devices, _ = _named_section(
        root.table("devices"), lambda name, table: _device(name, table, account_names)
    )
    _check_upstreams(devices, accounts, providers, reader, smtp_listening=bool(smtp.listeners))
    _check_oauth_accounts(accounts, providers, reader)
    root.finish()

    if reader.problems or state_dir is None:
        raise ConfigError(source, reader.problems)
    return Config(
        state_dir=state_dir,
        tls=tls,
        pop3=pop3,
        smtp=smtp,
        oauth=oauth,
        providers=providers,
        accounts=accounts,
        devices=devices,
        source=source,
    )


def _parse(source: Path) -> dict[str, Any]:
    try:
        with source.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(source, [Problem("", _os_error(e))], unreadable=True) from None
    except UnicodeDecodeError:
        problem = "not UTF-8 text"
    except tomllib.TOMLDecodeError as e:
        problem = f"TOML syntax error: {e}"
    raise ConfigError(source, [Problem("", problem)])


def _os_error(e: OSError) -> str:
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, PermissionError):
        return "permission denied (the gateway's user must be able to read it)"
    if isinstance(e, IsADirectoryError):
        return "is a directory, not a file"
    return e.strerror or type(e).__name__


def _named_section(
    table: _Table, build: Callable[[str, _Table], T | None]
) -> tuple[dict[str, T], set[str]]:
    """Build each `[section.NAME]`. Also return every declared name, so that a
    reference to a broken entry is not reported a second time as unknown."""
    built: dict[str, T] = {}
    declared: set[str] = set()
    for name, entry in table.entries():
        declared.add(name)
        mark = table.reader.mark()
        obj = build(name, entry)
        entry.finish()
        if obj is not None and table.reader.clean_since(mark):
            built[name] = obj
    table.finish()
    return built, declared


def _listener_count(data: Mapping[str, Any]) -> int:
    """Listeners the file asks for, even broken ones: `[tls]` is needed all the
    same, and saying so in the same run saves the admin a round trip."""
    count = 0
    for protocol in LISTENER_PROTOCOLS:
        section = data.get(protocol)
        listen = section.get("listen") if isinstance(section, dict) else None
        count += len(listen) if isinstance(listen, list) else 0
    return count


def _tls_section(root: _Table, *, wanted_by: int) -> TLSFiles | None:
    if not root.has("tls"):
        if wanted_by:
            root.problem("tls", "missing: listeners need certificate and private_key")
        return None
    table = root.table("tls")
    certificate = table.existing_file("certificate")
    private_key = table.existing_file("private_key")
    table.finish()
    if certificate is None or private_key is None:
        return None
    files = TLSFiles(certificate=certificate, private_key=private_key)
    try:
        identity = load_server_identity(files)
    except TLSSetupError as e:
        # gateway.tls already names the key; its messages never show key material.
        key, _, message = str(e).partition(": ")
        table.reader.add(key if key.startswith("tls.") else "tls", message or str(e))
        return None
    if not _key_matches_certificate(identity):
        table.problem("private_key", f"{private_key}: does not match the certificate")
        return None
    return files


def _key_matches_certificate(identity: ServerIdentity) -> bool:
    """A swapped key file would otherwise surface as every handshake failing."""

    def spki(public_key: Any) -> bytes:
        return public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    certificate_key = identity.certificate.to_cryptography().public_key()
    return spki(certificate_key) == spki(identity.key.to_cryptography_key().public_key())


def _pop3_section(table: _Table) -> POP3Settings:
    idle_timeout = table.seconds("idle_timeout", 600.0)
    listeners = _listeners(table, "pop3")
    table.finish()
    return POP3Settings(
        listeners=listeners,
        # None only after a reported problem, when this object is never used.
        idle_timeout=idle_timeout or 600.0,
    )


def _listeners(table: _Table, protocol: str) -> tuple[Listener, ...]:
    built = []
    for entry in table.tables("listen"):
        listener = _listener(entry, protocol)
        if listener is not None:
            table.reader.listeners.append((entry.path, listener))
            built.append(listener)
    return tuple(built)


def _smtp_section(table: _Table) -> SMTPSettings:
    defaults = SMTPSettings()
    settings = SMTPSettings(
        listeners=_listeners(table, "smtp"),
        idle_timeout=table.seconds("idle_timeout", defaults.idle_timeout) or 0.0,
        max_message_size=table.integer(
            "max_message_size", defaults.max_message_size, low=1024, high=2**31
        )
        or 0,
        max_recipients=table.integer("max_recipients", defaults.max_recipients, low=1, high=10000)
        or 0,
        retry_first=table.seconds("retry_first", defaults.retry_first) or 0.0,
        retry_max_interval=table.seconds("retry_max_interval", defaults.retry_max_interval)
        or 0.0,
        message_lifetime=table.seconds("message_lifetime", defaults.message_lifetime) or 0.0,
    )
    table.finish()
    return settings


def _oauth_section(table: _Table) -> OAuthSettings:
    defaults = OAuthSettings()
    settings = OAuthSettings(
        key_file=table.file("key_file", None),
        refresh_margin=table.seconds("refresh_margin", defaults.refresh_margin) or 0.0,
        idle_refresh_interval=table.seconds(
            "idle_refresh_interval", defaults.idle_refresh_interval
        )
        or 0.0,
    )
    table.finish()
    return settings


def _listener(table: _Table, protocol: str) -> Listener | None:
    mark = table.reader.mark()
    tls = table.string("tls", choices=TLS_MODES)
    port = table.integer("port", DEFAULT_PORTS.get((protocol, tls)), low=1, high=65535)
    address = table.string("address", "0.0.0.0")
    if address is not None and not _is_ip_address(address):
        table.problem("address", f"{address!r} is not an IP address (0.0.0.0 or :: means all)")
    min_tls = table.string("min_tls", "1.2", choices=TLS_VERSIONS)
    plaintext = table.boolean("allow_plaintext_auth", False)
    table.finish()
    if not table.reader.clean_since(mark):
        return None
    return Listener(
        protocol=protocol,
        port=port,
        tls=tls,
        address=address,
        min_tls=min_tls,
        allow_plaintext_auth=plaintext,
    )


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _check_listener_overlap(reader: _Reader) -> None:
    """Two listeners on one port would otherwise fail only at startup."""
    seen: list[tuple[str, Listener]] = []
    for path, listener in reader.listeners:
        for other_path, other in seen:
            if listener.port == other.port and _addresses_overlap(listener.address, other.address):
                reader.add(
                    f"{path}.port",
                    f"{listener.address} port {listener.port} is already taken by {other_path}",
                )
                break
        seen.append((path, listener))


def _addresses_overlap(a: str, b: str) -> bool:
    """Whether two listeners on one port would fight over it. "::" counts as
    every IPv4 address too: Twisted listens dual-stack there on Linux."""
    ip_a, ip_b = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if ip_a == ip_b:
        return True
    for wildcard, other in ((ip_a, ip_b), (ip_b, ip_a)):
        if wildcard.is_unspecified and (wildcard.version == 6 or other.version == 4):
            return True
    return False


def _provider(name: str, table: _Table) -> Provider | None:
    mark = table.reader.mark()
    preset = _preset(table)
    present = [protocol for protocol in ENDPOINT_PROTOCOLS if table.has(protocol)]
    if not present and preset is None and table.reader.clean_since(mark):
        table.problem(None, "needs at least one endpoint: pop3, imap or smtp (or a preset)")
    endpoints = {protocol: _endpoint(table.table(protocol), protocol) for protocol in present}
    if preset is not None:
        for protocol in ENDPOINT_PROTOCOLS:
            endpoints.setdefault(protocol, getattr(preset, protocol))
    oauth = _oauth_client(table.table("oauth"), table.has("oauth")) or (
        preset.oauth if preset is not None else None
    )
    ca_file = table.existing_file("ca_file", None)
    if ca_file is not None:
        _check_ca_file(table, ca_file)
    timeout = table.seconds("timeout", 30.0)
    pop3_auth = table.string("pop3_auth", "auto", choices=POP3_AUTH_METHODS)
    sasl = table.string("sasl", "auto", choices=SASL_CHOICES)
    if not table.reader.clean_since(mark):
        return None
    return Provider(
        name=name,
        pop3=endpoints.get("pop3"),
        imap=endpoints.get("imap"),
        smtp=endpoints.get("smtp"),
        ca_file=ca_file,
        timeout=timeout,
        pop3_auth=pop3_auth,
        preset=table.data.get("preset"),
        oauth=oauth,
        sasl=sasl,
    )


def _preset(table: _Table) -> Any:
    """The built-in provider named by `preset`, with the app registration in
    `client_id` / `client_secret_file` (and `tenant` for Microsoft 365)."""
    name = table.string("preset", None, choices=tuple(PRESETS))
    tenant = table.string("tenant", None)
    client_id = table.string("client_id", None)
    secret_file = table.existing_file("client_secret_file", None)
    if name is None:
        for key in ("tenant", "client_id", "client_secret_file"):
            if table.has(key) and not table.has("preset"):
                table.problem(key, "only used with a preset; put it in the oauth table instead")
        return None
    if name in NEEDS_TENANT and tenant is None and not table.has("tenant"):
        table.problem("tenant", f"required with preset {name!r} (e.g. contoso.onmicrosoft.com)")
    if client_id is None and not table.has("client_id"):
        table.problem("client_id", f"required with preset {name!r}: the app registration's id")
    secret = _read_secret_file(table, "client_secret_file", secret_file) if secret_file else None
    if client_id is None or (name in NEEDS_TENANT and tenant is None):
        return None
    return PRESETS[name](tenant, client_id, secret)


def _oauth_client(table: _Table, present: bool) -> OAuthClient | None:
    if not present or not table.valid:
        return None
    mark = table.reader.mark()
    urls = {
        key: _url(table, key, required=key == "token_url")
        for key in ("token_url", "device_authorization_url", "authorization_url")
    }
    client_id = table.string("client_id")
    secret_file = table.existing_file("client_secret_file", None)
    secret = _read_secret_file(table, "client_secret_file", secret_file) if secret_file else None
    scopes = tuple(text for _, text in table.strings("scopes"))
    app_scopes = tuple(text for _, text in table.strings("app_scopes"))
    table.finish()
    if not table.reader.clean_since(mark):
        return None
    return OAuthClient(
        token_url=urls["token_url"],
        client_id=client_id,
        device_authorization_url=urls["device_authorization_url"],
        authorization_url=urls["authorization_url"],
        client_secret=secret,
        scopes=scopes,
        app_scopes=app_scopes,
    )


def _url(table: _Table, key: str, *, required: bool) -> Any:
    """An https URL; plain http only to a loopback address (a test server)."""
    from urllib.parse import urlsplit

    value = table.string(key, REQUIRED if required else None)
    if value is None:
        return None
    parts = urlsplit(value)
    loopback = parts.hostname in ("localhost",) or _is_loopback(parts.hostname or "")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        table.problem(key, f"{value!r} must be an https:// URL (http only on loopback)")
        return None
    if not parts.hostname:
        table.problem(key, f"{value!r} has no host name")
        return None
    return value


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_ca_file(table: _Table, ca_file: Path) -> None:
    try:
        load_trust_root(ca_file)
    except TLSSetupError as e:
        table.problem("ca_file", str(e).partition(": ")[2] or str(e))


def _endpoint(table: _Table, protocol: str) -> Endpoint | None:
    if not table.valid:
        return None
    mark = table.reader.mark()
    host = table.string("host")
    if host is not None and not _TOKEN.fullmatch(host):
        table.problem("host", f"{host!r} is not a host name")
    tls = table.string("tls", "implicit", choices=TLS_MODES)
    port = table.integer("port", DEFAULT_PORTS.get((protocol, tls)), low=1, high=65535)
    table.finish()
    if not table.reader.clean_since(mark):
        return None
    return Endpoint(host=host, port=port, tls=tls)


def _account(name: str, table: _Table, providers: set[str]) -> Account | None:
    mark = table.reader.mark()
    provider = table.string("provider")
    if provider is not None and provider not in providers:
        table.problem("provider", f"unknown provider {provider!r}")
    username = table.string("username")
    auth = table.string("auth", "password", choices=ACCOUNT_AUTH_METHODS)
    password = None
    grant = None
    if auth == "oauth2":
        grant = table.string("grant", "device_code", choices=GRANTS)
        for key in ("password", "password_file"):
            if table.has(key):
                table.problem(key, 'not used with auth = "oauth2": the gateway holds tokens')
    elif auth == "password":
        password = _account_password(table)
        if table.has("grant"):
            table.problem("grant", 'only used with auth = "oauth2"')
    else:
        # auth itself was wrong and reported; its dependants are not unknown keys.
        for key in ("password", "password_file", "grant"):
            table.has(key)
    mailbox = table.string("mailbox", "pop3", choices=MAILBOX_KINDS)
    folder = table.string("folder", "INBOX")
    on_delete = table.string("on_delete", "expunge", choices=DELETE_POLICIES)
    move_to = table.string("move_to", None)
    if on_delete == "move" and move_to is None and not table.has("move_to"):
        table.problem("move_to", 'required with on_delete = "move": the folder to move to')
    if move_to is not None and on_delete != "move":
        table.problem("move_to", 'only used with on_delete = "move"')
    mark_seen = table.boolean("mark_seen", False)
    senders = tuple(_senders(table))
    rewrite_sender = table.boolean("rewrite_sender", False)
    rewrite_from_header = table.boolean("rewrite_from_header", False)
    if not table.reader.clean_since(mark):
        return None
    return Account(
        name=name,
        provider=provider,
        username=username,
        password=password,
        auth=auth,
        grant=grant,
        mailbox=mailbox,
        folder=folder,
        on_delete=on_delete,
        move_to=move_to,
        mark_seen=mark_seen,
        allowed_senders=senders,
        rewrite_sender=rewrite_sender,
        rewrite_from_header=rewrite_from_header,
    )


def _senders(table: _Table) -> Iterator[str]:
    for path, text in table.strings("allowed_senders"):
        if _SENDER.fullmatch(text):
            yield text.lower()
        else:
            table.reader.add(path, f"{text!r} is not an address or *@domain")


def _account_password(table: _Table) -> Secret | None:
    inline = table.secret("password", None)
    path = table.existing_file("password_file", None)
    if table.has("password") == table.has("password_file"):
        table.problem(None, "needs exactly one of password or password_file")
        return None
    if inline is not None:
        return Secret(inline)
    return _read_password_file(table, path) if path is not None else None


def _read_password_file(table: _Table, path: Path) -> Secret | None:
    return _read_secret_file(table, "password_file", path)


def _read_secret_file(table: _Table, key: str, path: Path) -> Secret | None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        table.problem(key, f"{path}: {_os_error(e)}")
        return None
    except UnicodeDecodeError:
        table.problem(key, f"{path}: not UTF-8 text")
        return None
    # Editors and `echo` add a final newline that is no part of the secret.
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret:
        table.problem(key, f"{path}: is empty")
        return None
    return Secret(secret)


def _device(name: str, table: _Table, accounts: set[str]) -> Device | None:
    mark = table.reader.mark()
    password_hash = _password_hash(table)
    account = table.string("account")
    if account is not None and account not in accounts:
        table.problem("account", f"unknown account {account!r}")
    allow_from = _allow_from(table)
    protocols = _protocols(table)
    relay_without_auth = table.boolean("relay_without_auth", False)
    if relay_without_auth and not table.has("allow_from"):
        table.problem(
            "relay_without_auth",
            "needs allow_from naming the device's own networks, or the gateway "
            "would relay for any address",
        )
    if relay_without_auth and any(network.prefixlen == 0 for network in allow_from):
        table.problem(
            "relay_without_auth",
            "allow_from includes every address, which would make the gateway an open relay",
        )
    if relay_without_auth and "smtp" not in protocols:
        table.problem("relay_without_auth", "the device's protocols do not include smtp")
    if not table.reader.clean_since(mark):
        return None
    return Device(
        name=name,
        password_hash=password_hash,
        account=account,
        allow_from=allow_from,
        protocols=protocols,
        relay_without_auth=relay_without_auth,
    )


def _password_hash(table: _Table) -> Secret | None:
    value = table.secret("password_hash")
    if value is None:
        return None
    if not value.startswith(_ARGON2_PREFIXES) or not _parses_as_argon2(value):
        table.problem(
            "password_hash", "is not an argon2 hash; make one with `gateway hash-password`"
        )
        return None
    return Secret(value)


def _parses_as_argon2(value: str) -> bool:
    try:
        argon2.extract_parameters(value)
    except argon2.exceptions.InvalidHashError:
        return False
    return True


def _allow_from(table: _Table) -> tuple[IPNetwork, ...]:
    """Partial after a reported problem; `_device` then builds nothing."""
    if not table.has("allow_from"):
        return ANY_ADDRESS
    networks = [_network(path, text, table.reader) for path, text in table.strings("allow_from")]
    if table.data["allow_from"] == []:
        table.problem("allow_from", "is empty, so the device could never connect")
    return tuple(network for network in networks if network is not None)


def _network(path: str, text: str, reader: _Reader) -> IPNetwork | None:
    """Strict on purpose: '10.0.0.1/8' is as likely a typo for '10.0.0.1/32' as
    for '10.0.0.0/8', and guessing wrong opens or closes a whole network."""
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        meant = ipaddress.ip_network(text, strict=False)
    except ValueError:
        reader.add(path, f"{text!r} is not a network (write an address or address/prefix)")
        return None
    address = text.partition("/")[0]
    reader.add(
        path,
        f"{text!r} has host bits set: write '{meant}' for the network, "
        f"or '{address}' for the single address",
    )
    return None


def _protocols(table: _Table) -> frozenset[str]:
    """Partial after a reported problem; `_device` then builds nothing."""
    if not table.has("protocols"):
        return frozenset(DEVICE_PROTOCOLS)
    names = ", ".join(DEVICE_PROTOCOLS)
    protocols = set()
    for path, text in table.strings("protocols"):
        if text in DEVICE_PROTOCOLS:
            protocols.add(text)
        else:
            table.reader.add(path, f"must be one of {names} (got {text!r})")
    if table.data["protocols"] == []:
        table.problem("protocols", f"is empty: name at least one of {names}")
    return frozenset(protocols)


def _check_upstreams(
    devices: dict[str, Device],
    accounts: dict[str, Account],
    providers: dict[str, Provider],
    reader: _Reader,
    *,
    smtp_listening: bool,
) -> None:
    """A device needs an account whose provider has the endpoint it will use:
    POP3 (or IMAP, for an IMAP-backed account) for a POP3 device, SMTP for an
    SMTP device when SMTP listeners exist.

    An account without one is fine as long as no device needs it (an
    SMTP-only relay account, say), so this is checked across sections.
    """
    for device in devices.values():
        account = accounts.get(device.account)
        provider = providers.get(account.provider) if account else None
        if account is None or provider is None:
            continue
        needs = []
        if "pop3" in device.protocols:
            needs.append(("pop3", account.mailbox))
        if "smtp" in device.protocols and smtp_listening:
            needs.append(("smtp", "smtp"))
        for protocol, endpoint in needs:
            if getattr(provider, endpoint) is None:
                reader.add(
                    key_path(key_path("devices", device.name), "account"),
                    f"account {device.account!r} uses provider {provider.name!r}, which has no "
                    f"{endpoint} endpoint, yet this device may use {protocol} (set protocols, "
                    f"or add {key_path(key_path('providers', provider.name), endpoint)})",
                )


def _check_oauth_accounts(
    accounts: dict[str, Account], providers: dict[str, Provider], reader: _Reader
) -> None:
    """An OAuth2 account needs its provider's OAuth client, with what its grant uses."""
    for account in accounts.values():
        provider = providers.get(account.provider)
        if account.auth != "oauth2" or provider is None:
            continue
        where = key_path(key_path("accounts", account.name), "provider")
        oauth = provider.oauth
        if oauth is None:
            reader.add(
                where,
                f"provider {provider.name!r} has no OAuth2 client: add a preset or an "
                "oauth table",
            )
        elif account.grant == "device_code" and not oauth.device_authorization_url:
            reader.add(where, f"provider {provider.name!r} has no device_authorization_url")
        elif account.grant == "authorization_code" and not oauth.authorization_url:
            reader.add(where, f"provider {provider.name!r} has no authorization_url")
        elif account.grant == "client_credentials" and oauth.client_secret is None:
            reader.add(
                where,
                f"provider {provider.name!r} has no client secret, which the "
                "client_credentials grant needs",
            )
