"""`[state]`: the backend choice and the PostgreSQL settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from gateway.model import StateSettings


def load(tmp_path: Path, state: str) -> StateSettings:
    path = tmp_path / "gateway.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n{state}')
    path.chmod(0o600)
    return load_config(path).state


def problems(tmp_path: Path, state: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, state)
    return [str(p) for p in info.value.problems]


def test_no_section_means_the_embedded_backend(tmp_path: Path) -> None:
    assert load(tmp_path, "") == StateSettings()
    assert StateSettings().backend == "embedded"


def test_postgresql_with_its_password_from_a_file(tmp_path: Path) -> None:
    secret = tmp_path / "pg-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    settings = load(
        tmp_path,
        '[state]\nbackend = "postgresql"\ndsn = "host=db1 dbname=gateway user=gw"\n'
        'password_file = "pg-password"\nnode = "gw1"\nlease_time = 12\npool_size = 8\n'
        "timeout = 3\n",
    )
    assert settings.backend == "postgresql"
    assert settings.dsn == "host=db1 dbname=gateway user=gw"
    assert settings.password is not None and settings.password.reveal() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert (settings.node, settings.lease_time, settings.pool_size, settings.timeout) == (
        "gw1",
        12.0,
        8,
        3.0,
    )


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ('backend = "postgresql"', "state.dsn: is required"),
        ('backend = "redis"', "state.backend: must be one of embedded, postgresql"),
        ('dsn = "host=db password=hunter2"', "state.dsn: must not hold the password"),
        ("lease_time = 2", "state.lease_time: must be at least 5 seconds"),
        ("pool_size = 0", "state.pool_size"),
        ("spool = true", "state.spool"),
    ],
)
def test_mistakes_are_named(tmp_path: Path, section: str, expected: str) -> None:
    found = problems(tmp_path, f"[state]\n{section}\n")
    assert any(expected in p for p in found), found
    assert not any("hunter2" in p for p in found)
