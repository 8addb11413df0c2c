"""The relay and classified login refusals: retried with backoff like any failure,
but the error line with the provider's code and advice comes once per account and
change, and the recovery is logged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_smtp_relay import Harness, logged

__all__ = ["logged"]

MS_SMTP_DISABLED = (
    b"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for "
    b"the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information."
)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    if harness.relay.running:
        harness.stop()


def errors(logged: list[str]) -> list[str]:
    return [line for line in logged if line.startswith("error")]


def test_misconfiguration_is_retried_but_logged_once_per_change(
    h: Harness, logged: list[str]
) -> None:
    h.upstream.script.auth_replies = [MS_SMTP_DISABLED] * 3
    entry = h.queue()
    h.start()
    h.advance(30)
    h.advance(60)
    assert entry.state.attempts == 3 and h.upstream.arrived == []
    assert entry.state.next_attempt == h.clock.seconds() + 120
    lines = errors(logged)
    assert len(lines) == 1, lines
    assert "[535 5.7.139] gateway or app misconfigured" in lines[0]
    assert "https://aka.ms/smtp_auth_disabled" in lines[0]
    # Every attempt still leaves its warning with the reason.
    deferred = [line for line in logged if "smtp deferred" in line]
    assert len(deferred) == 3 and all("5.7.139" in line for line in deferred)
    # Another refusal is a change: a new error line.
    h.upstream.script.auth_replies = [
        b"550 5.7.30 Basic authentication is not supported for Client Submission."
    ]
    h.advance(120)
    assert len(errors(logged)) == 2 and "[550 5.7.30]" in errors(logged)[1]
    # Fixed by the admin: delivered, and the log says the login works again.
    h.advance(240)
    assert len(h.upstream.arrived) == 1
    assert h.spool.entries == {}
    assert any("login for account scanner works again (was: 550 5.7.30)" in x for x in logged)


def test_temporary_refusal_is_a_warning(h: Harness, logged: list[str]) -> None:
    h.upstream.script.auth_replies = [b"432 4.3.2 Concurrent connections limit exceeded"]
    entry = h.queue()
    h.start()
    assert entry.state.attempts == 1
    assert errors(logged) == []
    assert any(line.startswith("warn") and "[432 4.3.2] temporary" in line for line in logged)
    h.advance(30)
    assert h.spool.entries == {}
