"""Load the operator's TOML file into the frozen model of `gateway.model`.

Each section has one builder (in its own module). A builder that found a
problem in its entry builds nothing, and later checks only look at what was
built, so one mistake is reported once, where it is, rather than again at
every reference to it.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from twisted.logger import Logger

from gateway.config.accounts import account
from gateway.config.admin import admin_section, log_section
from gateway.config.checks import check_oauth_accounts, check_upstreams, served_protocols
from gateway.config.devices import device
from gateway.config.listeners import check_listener_overlap, check_proxy_listeners, tls_section
from gateway.config.problems import ConfigError, Problem, os_error
from gateway.config.providers import provider
from gateway.config.reader import Reader, Table
from gateway.config.secrets import check_config_file, check_state_dir
from gateway.config.settings import (
    limits_section,
    oauth_section,
    penalties_section,
    pop3_section,
    proxy_section,
    smtp_section,
)
from gateway.config.state import state_section
from gateway.config.workers import workers_setting
from gateway.model import DEFAULT_STATE_DIR, DEVICE_PROTOCOLS, Config

T = TypeVar("T")

log = Logger(namespace="gateway.config")


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the whole file; raise `ConfigError` listing every problem."""
    source = Path(path).absolute()
    data = _parse(source)
    reader = Reader(source.parent)
    root = Table(data, "", reader)

    state_dir = root.file("state_dir", DEFAULT_STATE_DIR)
    if state_dir is not None:
        check_state_dir(root, "state_dir", state_dir)
    tls = tls_section(root, wanted_by=_listener_count(data))
    pop3 = pop3_section(root.table("pop3"))
    smtp = smtp_section(root.table("smtp"))
    check_listener_overlap(reader)
    admin = admin_section(root, tls)
    log_settings = log_section(root.table("log"))
    proxy = proxy_section(root.table("proxy"))
    check_proxy_listeners(reader, proxy)
    penalties = penalties_section(root.table("penalties"))
    oauth = oauth_section(root.table("oauth"))
    limits = limits_section(root.table("limits"))
    state = state_section(root.table("state"))
    workers = workers_setting(root)
    providers, provider_names = _named_section(root.table("providers"), provider)
    accounts, account_names = _named_section(
        root.table("accounts"), lambda name, table: account(name, table, provider_names)
    )
    served = served_protocols(accounts, providers)
    devices, _ = _named_section(
        root.table("devices"), lambda name, table: device(name, table, account_names, served)
    )
    check_upstreams(devices, accounts, providers, reader, smtp_listening=bool(smtp.listeners))
    check_oauth_accounts(accounts, providers, reader)
    root.finish()
    check_config_file(reader, source)
    warnings = tuple(str(warning) for warning in reader.warnings)
    for warning in warnings:
        # Start-up reads this in the twistd log; `check-config` prints
        # `Config.warnings` (or `ConfigError.warnings`) itself.
        log.warn("configuration {source}: {warning}", source=source, warning=warning)

    if reader.problems or state_dir is None:
        raise ConfigError(source, reader.problems, warnings=reader.warnings)
    return Config(
        state_dir=state_dir,
        tls=tls,
        pop3=pop3,
        smtp=smtp,
        oauth=oauth,
        admin=admin,
        log=log_settings,
        proxy=proxy,
        limits=limits,
        penalties=penalties,
        state=state,
        workers=workers,
        providers=providers,
        accounts=accounts,
        devices=devices,
        source=source,
        warnings=warnings,
    )


def _parse(source: Path) -> dict[str, Any]:
    try:
        with source.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(source, [Problem("", os_error(e))], unreadable=True) from None
    except UnicodeDecodeError:
        problem = "not UTF-8 text"
    except tomllib.TOMLDecodeError as e:
        problem = f"TOML syntax error: {e}"
    raise ConfigError(source, [Problem("", problem)])


def _named_section(
    table: Table, build: Callable[[str, Table], T | None]
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
    for protocol in DEVICE_PROTOCOLS:
        section = data.get(protocol)
        listen = section.get("listen") if isinstance(section, dict) else None
        count += len(listen) if isinstance(listen, list) else 0
    return count
