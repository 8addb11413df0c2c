"""The one place the running configuration lives (see gateway.reload).

Subsystems read devices, accounts and providers through the holder's live
mappings, or subscribe with `on_reload` for what they derived from the
configuration, so that a reload is one assignment and nothing keeps a stale
copy. Kept apart from gateway.reload, which needs the runtime, so that the
runtime can hold a holder without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from twisted.logger import Logger

from gateway.model import Account, Config, Device, Provider

log = Logger(namespace="gateway.reload")

T = TypeVar("T")
ReloadListener = Callable[[Config], None]


class CurrentMapping(Mapping[str, T], Generic[T]):
    """A read-only mapping that always shows one section of the current config."""

    def __init__(self, section: Callable[[], Mapping[str, T]]) -> None:
        self._section = section

    def __getitem__(self, key: str) -> T:
        return self._section()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._section())

    def __len__(self) -> int:
        return len(self._section())

    def __contains__(self, key: object) -> bool:
        return key in self._section()


class ConfigHolder:
    """The one place the running configuration lives."""

    def __init__(self, config: Config) -> None:
        self.current = config
        self._listeners: list[ReloadListener] = []
        self.devices: Mapping[str, Device] = CurrentMapping(lambda: self.current.devices)
        self.accounts: Mapping[str, Account] = CurrentMapping(lambda: self.current.accounts)
        self.providers: Mapping[str, Provider] = CurrentMapping(lambda: self.current.providers)

    def on_reload(self, listener: ReloadListener) -> None:
        """Call `listener(new_config)` after each accepted reload, in subscription order."""
        self._listeners.append(listener)

    def replace(self, config: Config) -> None:
        self.current = config
        for listener in list(self._listeners):
            try:
                listener(config)
            except Exception:
                # One subsystem's bug must not leave the others on the old config.
                log.failure("config reload: a subsystem failed to take the new config")
