"""Live reload: SIGHUP re-reads the whole configuration file.

Everything that serves devices reads the configuration through one
`ConfigHolder` (gateway.holder): either through its live mappings (`holder.devices`,
`holder.accounts`, `holder.providers`, which always show the current file),
or by subscribing to it (`holder.on_reload`) for what it derived from the
configuration (the device authenticator's cache of successful logins, the
SMTP listeners' relay-by-address table, the token manager's accounts).
Nothing keeps a private copy, so a reload is one assignment followed by the
listeners; sessions already open keep the objects they looked up at login,
which is what lets a removed device's open session finish.

A file with any problem is refused as a whole and the running configuration
stays. Settings outside `LIVE` take effect only when sockets are bound or
state is opened (listeners, state_dir and with it the spool, [proxy], the
OAuth key file): they are kept at their running values and reported as
needing a restart, so the held configuration always describes what runs.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService, Service
from twisted.logger import Logger

from gateway.config import ConfigError, load_config
from gateway.model import Config

if TYPE_CHECKING:
    from gateway.oauth.manager import TokenManager
    from gateway.runtime import Runtime

log = Logger(namespace="gateway.reload")


# -- what changed -----------------------------------------------------------------


@dataclass(frozen=True)
class SectionChanges:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()

    @classmethod
    def between(cls, old: Mapping[str, Any], new: Mapping[str, Any]) -> SectionChanges:
        return cls(
            added=tuple(sorted(set(new) - set(old))),
            removed=tuple(sorted(set(old) - set(new))),
            changed=tuple(sorted(n for n in set(old) & set(new) if old[n] != new[n])),
        )

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def describe(self) -> str:
        if not self:
            return "unchanged"
        return " ".join(
            [f"+{n}" for n in self.added]
            + [f"-{n}" for n in self.removed]
            + [f"~{n}" for n in self.changed]
        )


# The settings outside devices, accounts and providers that the running
# gateway takes at once (each has a subscriber, or is read per session);
# any other is read only when sockets are bound or state is opened.
LIVE = frozenset(
    {
        "tls",
        "pop3.idle_timeout",
        "smtp.idle_timeout",
        "smtp.max_message_size",
        "smtp.max_recipients",
        "smtp.retry_first",
        "smtp.retry_max_interval",
        "smtp.message_lifetime",
        "oauth.refresh_margin",
        "oauth.idle_refresh_interval",
        "limits.max_connections",
        "limits.max_connections_per_address",
        "limits.max_sessions_per_device",
        "limits.max_session_lifetime",
    }
)
_NOT_SETTINGS = frozenset({"providers", "accounts", "devices", "source", "warnings"})


def _key(section: str, name: str) -> str:
    """A setting's key path as the file spells it (`listeners` is `[[x.listen]]`)."""
    return f"{section}.{'listen' if name == 'listeners' else name}"


def _sections(config: Config) -> Iterator[tuple[str, Any]]:
    """(name, value) of each top-level setting or `[section]` of `config`."""
    for item in dataclasses.fields(config):
        if item.name not in _NOT_SETTINGS:
            yield item.name, getattr(config, item.name)


def _is_section(name: str, value: Any) -> bool:
    return name != "tls" and dataclasses.is_dataclass(value)


def _settings(config: Config) -> dict[str, Any]:
    """Every setting outside the named sections, by its key path in the file."""
    found: dict[str, Any] = {}
    for name, value in _sections(config):
        if _is_section(name, value):
            for item in dataclasses.fields(value):
                found[_key(name, item.name)] = getattr(value, item.name)
        else:
            found[name] = value
    return found


@dataclass(frozen=True)
class ConfigChanges:
    devices: SectionChanges
    accounts: SectionChanges
    providers: SectionChanges
    # Applied at once (timeouts, limits, certificate paths).
    settings: tuple[str, ...]
    # Kept at the running value until the gateway is restarted.
    needs_restart: tuple[str, ...]

    @classmethod
    def between(cls, old: Config, new: Config) -> ConfigChanges:
        before, after = _settings(old), _settings(new)
        differ = [key for key in before if before[key] != after[key]]
        return cls(
            devices=SectionChanges.between(old.devices, new.devices),
            accounts=SectionChanges.between(old.accounts, new.accounts),
            providers=SectionChanges.between(old.providers, new.providers),
            settings=tuple(k for k in differ if k in LIVE),
            needs_restart=tuple(k for k in differ if k not in LIVE),
        )

    def describe(self) -> str:
        """E.g. `devices +printer-4 -printer-2 ~copier; accounts ~scanner; providers unchanged`."""
        parts = [
            f"devices {self.devices.describe()}",
            f"accounts {self.accounts.describe()}",
            f"providers {self.providers.describe()}",
        ]
        if self.settings:
            parts.append("settings " + " ".join(f"~{key}" for key in self.settings))
        return "; ".join(parts)


def keep_restart_only(running: Config, loaded: Config) -> Config:
    """`loaded` with every setting outside `LIVE` at its running value."""
    kept: dict[str, Any] = {}
    for name, value in _sections(loaded):
        old = getattr(running, name)
        if _is_section(name, value):
            fixed = {
                item.name: getattr(old, item.name)
                for item in dataclasses.fields(value)
                if _key(name, item.name) not in LIVE
            }
            kept[name] = dataclasses.replace(value, **fixed)
        elif name not in LIVE:
            kept[name] = old
    return dataclasses.replace(loaded, **kept)


# -- doing it ---------------------------------------------------------------------


class Reloader:
    """Re-reads the file the running config came from and hands it to the holder.

    `make_tokens` builds a token manager for a config that gained its first
    OAuth2 account (at start there was none, so none was made); it becomes a
    child of `parent` and the runtime's token source.
    """

    def __init__(
        self,
        runtime: Runtime,
        *,
        parent: MultiService | None = None,
        make_tokens: Callable[[Config], TokenManager | None] | None = None,
        load: Callable[[Path], Config] = load_config,
    ) -> None:
        self._runtime = runtime
        self._parent = parent
        self._make_tokens = make_tokens
        self._load = load
        runtime.holder.on_reload(lambda config: runtime.authenticator.reconfigure(config.devices))

    def follow_tokens(self, tokens: TokenManager) -> None:
        """Give `tokens` (the runtime's token source) each new configuration."""
        self._runtime.holder.on_reload(tokens.reconfigure)

    def reload(self) -> ConfigChanges | None:
        """Apply the file if it is usable; the TLS certificate is re-read either way."""
        try:
            return self._reload_config()
        finally:
            self._runtime.reload_tls()

    def _reload_config(self) -> ConfigChanges | None:
        holder = self._runtime.holder
        running = holder.current
        source = running.source
        if source is None:
            log.error("config reload: the running config was not read from a file")
            return None
        try:
            loaded = self._load(source)
        except ConfigError as e:
            count = len(e.problems)
            log.error(
                "config reload from {source} refused, the running config stays: {count} problem{s}",
                source=str(source),
                count=count,
                s="" if count == 1 else "s",
            )
            for problem in e.problems:
                log.error(
                    "config reload from {source}: {problem}", source=str(source), problem=problem
                )
            return None
        except Exception:
            log.failure(
                "config reload from {source} failed, the running config stays", source=str(source)
            )
            return None
        changes = ConfigChanges.between(running, loaded)
        for key in changes.needs_restart:
            log.warn(
                "config reload from {source}: {key} changed and needs a restart; "
                "the running value stays until then",
                source=str(source),
                key=key,
            )
        holder.replace(keep_restart_only(running, loaded))
        self._start_tokens_if_needed()
        log.info(
            "config reloaded from {source}: {changes}",
            source=str(source),
            changes=changes.describe(),
        )
        return changes

    def _start_tokens_if_needed(self) -> None:
        runtime = self._runtime
        if runtime.tokens is not None or self._make_tokens is None:
            return
        tokens = self._make_tokens(runtime.config)
        if tokens is None:
            return
        runtime.tokens = tokens
        self.follow_tokens(tokens)
        if self._parent is not None:
            # Started at once when the parent runs: the store opens now.
            tokens.setServiceParent(self._parent)


class ReloadOnHangup(Service):
    """`kill -HUP` (systemctl reload) re-reads the configuration file and the
    TLS certificate and key, without dropping any device session."""

    def __init__(self, reactor: Any, reload: Callable[[], object]) -> None:
        self._reactor = reactor
        self.reload = reload
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> Any:
        signal.signal(signal.SIGHUP, self._previous or signal.SIG_DFL)
        return super().stopService()

    def _hangup(self, signum: int, frame: Any) -> None:
        # Signal handlers run between bytecodes; do the work in the reactor.
        self._reactor.callFromThread(self.reload)
