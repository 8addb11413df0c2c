"""`[pop3]`/`[smtp]` `stall_timeout`, `line_timeout` and `auth_failure_delay`:
the deadlines of gateway.command_queue and the refusal pause, read from the
file (tests/integration/test_hardening.py sets them low on the real gateway)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.model import POP3Settings, SMTPSettings
from gateway.pop3.server import POP3ServerFactory
from gateway.smtp.server import SMTPServerFactory
from tests.unit.test_config import VALID, ca, config_dir, edit, problems_of, write

__all__ = ["ca", "config_dir"]  # fixtures, used by name

KEYS = ("stall_timeout", "line_timeout", "auth_failure_delay")


def test_defaults_are_the_servers_own() -> None:
    for settings in (POP3Settings(), SMTPSettings()):
        assert (settings.stall_timeout, settings.line_timeout, settings.auth_failure_delay) == (
            120.0,
            60.0,
            1.0,
        )
    # Written twice (a server's factory is built without a config in unit
    # tests): they must agree.
    pairs = ((POP3ServerFactory, POP3Settings()), (SMTPServerFactory, SMTPSettings()))
    for factory, settings in pairs:
        for key in KEYS:
            assert getattr(factory, key) == getattr(settings, key), (factory, key)


def test_keys_are_read_for_both_services(config_dir: Path) -> None:
    text = edit(
        VALID,
        "[pop3]\nidle_timeout = 900\n",
        "[pop3]\nidle_timeout = 900\nstall_timeout = 4\nline_timeout = 2.5\n"
        "auth_failure_delay = 0.05\n",
    )
    text += "\n[smtp]\nstall_timeout = 5\nline_timeout = 3\nauth_failure_delay = 0.5\n"
    config = load_config(write(config_dir, text))
    assert (config.pop3.stall_timeout, config.pop3.line_timeout) == (4.0, 2.5)
    assert config.pop3.auth_failure_delay == 0.05
    assert (config.smtp.stall_timeout, config.smtp.line_timeout) == (5.0, 3.0)
    assert config.smtp.auth_failure_delay == 0.5


@pytest.mark.parametrize("key", KEYS)
def test_a_deadline_of_zero_is_refused(config_dir: Path, key: str) -> None:
    text = edit(VALID, "[pop3]\nidle_timeout = 900\n", f"[pop3]\nidle_timeout = 900\n{key} = 0\n")
    [problem] = problems_of(write(config_dir, text))
    assert problem.path == f"pop3.{key}" and "greater than 0" in problem.message
