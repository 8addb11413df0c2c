"""`gateway oauth` as an admin types it: parsing, config discovery, text and JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.oauth.keys import KEY_ENV, decode_key


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
        'device_authorization_url = "https://id.example.net/device", client_id = "gw", '
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
