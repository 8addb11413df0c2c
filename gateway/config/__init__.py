"""The operator's configuration file: which file, and loading it into `gateway.model`.

Modules by job: `reader` (the typed TOML table reader), `problems` (what is
reported), `listeners` (`[tls]` and listeners), `settings` (`[pop3]`,
`[smtp]`, `[oauth]`), `providers`, `accounts`, `devices`, `secrets` (secret
files), `checks` (across sections) and `loader` (the whole file).

Which file is chosen lives here, not in a submodule, so that tests (and
packagers) can replace `DEFAULT_CONFIG_PATH` on this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gateway.config.loader import load_config
from gateway.config.problems import ConfigError, Problem
from gateway.model import DEFAULT_STATE_DIR

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_STATE_DIR",
    "ConfigError",
    "ConfigLocation",
    "Problem",
    "find_config_path",
    "load_config",
    "locate_config",
]

DEFAULT_CONFIG_PATH: Path = Path("/etc/gateway/gateway.toml")
CONFIG_ENV: Final = "GATEWAY_CONFIG"


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
