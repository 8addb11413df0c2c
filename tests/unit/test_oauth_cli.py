"""`gateway oauth` as an admin types it: parsing, config discovery, text and JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from gateway.cli import main
from gateway.cli.oauth import stdin_line
from gateway.oauth.errors import AuthorizationFailed
from gateway.oauth.keys import KEY_ENV, decode_key

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        "[providers.idp]\n"
        'pop3 = { host = "pop.example.net", port = 995, tls = "implicit" }\n'
        'oauth = { token_url = "https://id.example.net/token", '
        'device_authorization_url = "https://id.example.net/device", '
        'authorization_url = "https://id.example.net/authorize", client_id = "gw", '
        'scopes = ["mail"] }\n'
        "[accounts.scanner]\n"
        'provider = "idp"\nusername = "scanner@example.net"\nauth = "oauth2"\n'
        "[accounts.shop]\n"
        'provider = "idp"\nusername = "shop@example.net"\npassword = "pw"\n'
    )
    return path


def test_status_text(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(config_file), "oauth", "status"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "scanner: not_authorized (device_code, scanner@example.net at idp)",
        "  no tokens yet: run `gateway oauth authorize scanner`",
    ]
    # Looking creates no key.
    assert not (config_file.parent / "state" / "gateway.key").exists()


def test_status_json_from_the_environment_config(
    config_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_CONFIG", str(config_file))
    assert main(["oauth", "status", "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)["accounts"]
    assert entry == {
        "account": "scanner",
        "provider": "idp",
        "username": "scanner@example.net",
        "grant": "device_code",
        "state": "not_authorized",
    }


@pytest.mark.parametrize(
    ("account", "message"),
    [
        ("nope", "no account 'nope' in the configuration (OAuth2 accounts: scanner)"),
        ("shop", 'account shop does not use auth = "oauth2"'),
    ],
)
def test_wrong_account(
    config_file: Path, capsys: pytest.CaptureFixture[str], account: str, message: str
) -> None:
    assert main(["--config", str(config_file), "oauth", "revoke", account]) == 1
    assert capsys.readouterr().err.strip() == f"gateway oauth revoke: {message}"


def test_revoke_then_status(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(config_file), "oauth", "revoke", "scanner"]) == 0
    assert "tokens deleted" in capsys.readouterr().out
    assert main(["--config", str(config_file), "oauth", "status"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("scanner: revoked")
    assert "run `gateway oauth authorize scanner`" in out


def test_new_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["oauth", "new-key"]) == 0
    first = capsys.readouterr().out.strip()
    assert len(decode_key(first, "test")) == 32
    assert main(["oauth", "new-key", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)["key"]
    assert second != first


def test_missing_config_says_which_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    missing = tmp_path / "absent.toml"
    assert main(["oauth", "status", "--config", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().out


def test_subcommand_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["oauth"])
    assert info.value.code == 2
    assert "authorize" in capsys.readouterr().err


class _Reactor:
    """Just enough of a reactor for `stdin_line`: which readers are registered."""

    def __init__(self) -> None:
        self.readers: list[Any] = []

    def addReader(self, reader: Any) -> None:
        self.readers.append(reader)

    def removeReader(self, reader: Any) -> None:
        if reader in self.readers:
            self.readers.remove(reader)


def _paste(data: bytes) -> tuple[_Reactor, Deferred[str]]:
    """`stdin_line` over a pipe that carries `data` and is then closed, read to its end."""
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)
    reactor = _Reactor()
    try:
        d = stdin_line(reactor, read_end)
        while reactor.readers:
            reactor.readers[0].doRead()
    finally:
        os.close(read_end)
    return reactor, d


def test_paste_prompt_ends_at_end_of_input() -> None:
    reactor, d = _paste(b"\n  \n")
    failures: list[Any] = []
    d.addErrback(failures.append)
    [failure] = failures
    assert failure.check(AuthorizationFailed)
    assert "standard input closed" in str(failure.value)
    assert reactor.readers == []


def test_paste_prompt_takes_a_last_line_without_newline() -> None:
    _, d = _paste(b"\nhttp://localhost:1/?code=c&state=s")
    results: list[Any] = []
    d.addBoth(results.append)
    assert results == ["http://localhost:1/?code=c&state=s"]


def test_authorize_with_stdin_closed_fails_at_once(config_file: Path) -> None:
    """Ctrl-D (here: /dev/null) at the paste prompt ends the command now, not
    after the sign-in timeout (ten minutes)."""
    with config_file.open("a") as f:
        f.write(
            "[accounts.browser]\n"
            'provider = "idp"\nusername = "browser@example.net"\nauth = "oauth2"\n'
            'grant = "authorization_code"\n'
        )
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "--config",
            str(config_file),
            "oauth",
            "authorize",
            "browser",
            "--no-listen",
            "--redirect-uri",
            "http://localhost:1/",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "paste it here" in result.stdout
    assert result.stderr.startswith("gateway oauth authorize: standard input closed")
    assert time.monotonic() - started < 30
