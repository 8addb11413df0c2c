"""What mail servers say to OAuth2 logins reaches `gateway oauth status`:
the token manager as `LoginOutcomes`, the record it writes (once per code),
and what the status command shows until a login succeeds again."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock

from gateway.cli import main
from gateway.config.loader import load_config
from gateway.model import Account, Config
from gateway.oauth.errors import OAuthUnavailable
from gateway.oauth.keys import KEY_ENV, load_key
from gateway.oauth.manager import TokenManager
from gateway.oauth.refusal import Refusal, RefusalKind
from gateway.oauth.store import TokenRecord, TokenStore
from gateway.upstream.credentials import LoginOutcomes, note_refused, note_succeeded, refused
from gateway.upstream.refusals import Answer, classify_login
from tests.harness.oauth_server import AuthServer, InMemoryPoster
from tests.helpers.oauth import seed

START = time.time()  # `oauth status` judges validity by the real clock
SMTP_DISABLED = classify_login(
    Answer(
        "smtp",
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled "
        "for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.",
        reply_code=535,
    ),
    bearer=True,
)
TOKEN_REFUSED = classify_login(
    Answer("smtp", "535 5.7.3 Authentication unsuccessful", reply_code=535), bearer=True
)


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        "[providers.idp]\n"
        'smtp = { host = "smtp.example.net", port = 587, tls = "starttls" }\n'
        'oauth = { token_url = "http://127.0.0.1:9/token", '
        'device_authorization_url = "http://127.0.0.1:9/device", client_id = "gateway", '
        'scopes = ["mail", "offline_access"] }\n'
        "[accounts.scanner]\n"
        'provider = "idp"\nusername = "alice"\nauth = "oauth2"\n'
    )
    return path


@pytest.fixture
def config(config_file: Path) -> Config:
    return load_config(config_file)


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(START)
    return c


@pytest.fixture
def server(clock: Clock) -> AuthServer:
    return AuthServer(client_secret=None, clock=clock)  # a public client, as configured


@pytest.fixture
def store(config: Config) -> TokenStore:
    return TokenStore.open(config.state_dir, load_key(config.oauth, config.state_dir, environ={}))


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[TokenRecord]:
    """Every record the store writes."""
    written: list[TokenRecord] = []
    original = TokenStore._write

    def counting(self: TokenStore, account: str, record: TokenRecord) -> None:
        written.append(record)
        original(self, account, record)

    monkeypatch.setattr(TokenStore, "_write", counting)
    return written


@pytest.fixture
def manager(config: Config, clock: Clock, server: AuthServer, store: TokenStore) -> Any:
    seed(store, server, clock.seconds())
    manager = TokenManager(config, clock=clock, poster=InMemoryPoster(server), store=store)
    manager.startService()
    yield manager
    manager.stopService()


def status(config_file: Path, capsys: pytest.CaptureFixture[str]) -> tuple[list[str], Any]:
    capsys.readouterr()
    assert main(["--config", str(config_file), "oauth", "status"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert main(["--config", str(config_file), "oauth", "status", "--json"]) == 0
    return text, json.loads(capsys.readouterr().out)["accounts"]


def account(config: Config) -> Account:
    return config.accounts["scanner"]


def test_the_manager_records_login_outcomes(manager: TokenManager) -> None:
    assert isinstance(manager, LoginOutcomes)


@pytest.mark.parametrize(
    ("refusal", "label"),
    [(SMTP_DISABLED, "gateway or app misconfigured"), (TOKEN_REFUSED, "token refused")],
)
def test_a_refused_login_shows_in_oauth_status_until_a_login_succeeds(
    manager, config, config_file, clock, capsys, refusal: Refusal, label: str
) -> None:
    assert refusal.kind in (RefusalKind.MISCONFIGURED, RefusalKind.TOKEN_REFUSED)
    # As the upstream login paths report it (gateway.upstream.credentials).
    note_refused(manager, account(config), refused(refusal, "login refused"))
    text, document = status(config_file, capsys)
    (entry,) = document
    assert entry["state"] == "failed"
    assert entry["error_code"] == refusal.code and entry["error_kind"] == refusal.kind.value
    assert entry["error_advice"] == refusal.advice and entry["error_source"] == "login"
    assert text[0].startswith("scanner: failed (device_code, alice at idp)")
    assert f"  login refused by the mail server: code {refusal.code} ({label})" in text
    assert f"  what to do: {refusal.advice}" in text
    # Tokens are still handed out: the refusal is the mail server's, not the grant's.
    clock.advance(1)
    note_succeeded(manager, account(config))
    text, document = status(config_file, capsys)
    assert document[0]["state"] == "ok" and document[0]["error_code"] is None
    assert not any("refused" in line for line in text)


def test_identical_refusals_write_once(manager, config, writes) -> None:
    for _ in range(20):
        manager.login_refused(account(config), SMTP_DISABLED)
    assert len(writes) == 1
    # Another code is news, and is written.
    manager.login_refused(account(config), TOKEN_REFUSED)
    assert len(writes) == 2 and writes[-1].error_code == TOKEN_REFUSED.code
    # Successful logins write only to clear, once.
    for _ in range(20):
        manager.login_succeeded(account(config))
    assert len(writes) == 3 and writes[-1].state == "ok" and writes[-1].error_code is None


def test_a_successful_login_writes_nothing_when_nothing_is_recorded(
    manager, config, writes
) -> None:
    for _ in range(10):
        manager.login_succeeded(account(config))
    assert writes == []


def test_a_login_does_not_clear_a_token_endpoint_error(
    manager, config, clock, store, writes
) -> None:
    poster = manager._poster
    poster.raise_next.append(OAuthUnavailable("connection refused"))
    clock.advance(3600)  # the background refresh fails for now
    record = store.load("scanner")
    assert record is not None and record.last_error is not None
    assert not record.error_from_login
    count = len(writes)
    manager.login_succeeded(account(config))
    assert len(writes) == count
    assert store.load("scanner") == record


def test_a_temporary_refusal_is_recorded_without_failing_the_account(
    manager, config, store
) -> None:
    busy = classify_login(
        Answer("smtp", "432 4.3.2 Concurrent connections limit exceeded", reply_code=432),
        bearer=True,
    )
    assert busy.kind is RefusalKind.TEMPORARY
    manager.login_refused(account(config), busy)
    record = store.load("scanner")
    assert record is not None and record.state == "ok" and record.error_code == busy.code


def test_a_refusal_never_overwrites_a_new_authorisation(
    manager, config, clock, server, store
) -> None:
    # An admin re-authorises while the gateway still holds the old record.
    fresh = seed(store, server, clock.seconds())
    stale = manager._states["scanner"].record
    assert stale is not None and stale.lineage != fresh.lineage
    manager.login_refused(account(config), SMTP_DISABLED)
    assert store.load("scanner") == fresh


def test_oauth_status_shows_the_graph_token(manager, config, config_file, capsys) -> None:
    results: list[object] = []
    ensureDeferred(manager.graph_token(account(config))).addBoth(results.append)
    assert isinstance(results[0], str)
    text, document = status(config_file, capsys)
    assert document[0]["graph_token_valid"] is True and document[0]["graph_expires_at"]
    assert f"  Graph token valid until {document[0]['graph_expires_at']}" in text
