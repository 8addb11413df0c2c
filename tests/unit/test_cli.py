"""The `gateway` admin command: hash-password, check-config, and which file it uses."""

from __future__ import annotations

import io
import json
from pathlib import Path

import argon2
import pytest
from argon2 import PasswordHasher

from gateway import cli
from gateway import config as config_module
from gateway.config import CONFIG_ENV, find_config_path, locate_config
from tests.harness.certs import make_tls_material

SHIPPED_DEFAULT = config_module.DEFAULT_CONFIG_PATH  # before the fixture below replaces it
HASH = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("device-pw")


@pytest.fixture(autouse=True)
def no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Neither the caller's $GATEWAY_CONFIG nor a real /etc/gateway may leak in."""
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    default = tmp_path / "etc-gateway" / "gateway.toml"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", default)
    return default


def valid_config(directory: Path) -> Path:
    tls = make_tls_material(directory / "tls", names=["gateway.example"])
    path = directory / "gateway.toml"
    path.write_text(
        f"""\
[tls]
certificate = "{tls.certificate}"
private_key = "{tls.private_key}"

[[pop3.listen]]
tls = "implicit"

[[pop3.listen]]
tls = "starttls"
address = "::"
min_tls = "1.0"

[providers.corp]
pop3 = {{ host = "pop.example.com" }}

[accounts.scanner]
provider = "corp"
username = "scanner"
password = "upstream-secret"

[devices.printer]
password_hash = "{HASH}"
account = "scanner"

[devices.copier]
password_hash = "{HASH}"
account = "scanner"
"""
    )
    path.chmod(0o600)  # it holds an upstream password
    return path


def broken_config(directory: Path) -> Path:
    path = directory / "broken.toml"
    path.write_text(
        """\
[pop3]
idle_timeout = "long"

[devices.printer]
password_hash = "not a hash"
account = "nope"
"""
    )
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# -- hash-password ---------------------------------------------------------------------


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_hash_password_from_stdin_gives_a_verifiable_argon2id_hash(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse\n"))

    status, out, err = run(capsys, "hash-password")

    assert (status, err) == (0, "")
    hashed = out.strip()
    assert out == hashed + "\n"
    assert hashed.startswith("$argon2id$")
    assert PasswordHasher().verify(hashed, "correct horse")
    parameters = argon2.extract_parameters(hashed)
    assert parameters == argon2.profiles.RFC_9106_LOW_MEMORY


def test_hash_password_keeps_spaces_but_not_the_newline(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(" padded \r\nsecond line\n"))
    status, out, _ = run(capsys, "hash-password")
    assert status == 0
    assert PasswordHasher().verify(out.strip(), " padded ")


def test_hash_password_refuses_an_empty_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    status, out, err = run(capsys, "hash-password")
    assert (status, out) == (1, "")
    assert "empty password" in err


def test_hash_password_asks_twice_on_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = iter(["s3cret", "s3cret"])
    monkeypatch.setattr("sys.stdin", FakeTTY())
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))

    status, out, _ = run(capsys, "hash-password")

    assert status == 0
    assert PasswordHasher().verify(out.strip(), "s3cret")


def test_hash_password_refuses_two_different_answers(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = iter(["s3cret", "s3cert"])
    monkeypatch.setattr("sys.stdin", FakeTTY())
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))

    status, out, err = run(capsys, "hash-password")

    assert (status, out) == (1, "")
    assert "differ" in err


def test_hash_password_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    status, out, _ = run(capsys, "hash-password", "--json")
    assert status == 0
    assert PasswordHasher().verify(json.loads(out)["password_hash"], "pw")


# -- check-config -------------------------------------------------------------------------


def test_check_config_summarises_a_valid_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = valid_config(tmp_path)

    status, out, err = run(capsys, "check-config", str(path))

    assert (status, err) == (0, "")
    assert out.splitlines() == [
        f"{path}: valid",
        "  pop3 on 0.0.0.0:995, implicit TLS, TLS 1.2 or newer",
        "  pop3 on [::]:110, STARTTLS, TLS 1.0 or newer",
        "  1 provider, 1 account, 2 devices",
    ]
    assert "upstream-secret" not in out


def test_check_config_warns_about_a_secret_others_can_read(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = valid_config(tmp_path)
    path.chmod(0o644)

    status, out, err = run(capsys, "check-config", str(path))
    json_status, json_out, _ = run(capsys, "check-config", "--json", str(path))

    assert (status, err) == (0, "")
    assert out.splitlines()[1] == (
        f"{path}: warning: the file holds upstream passwords (accounts.scanner.password) "
        "but is readable by group and others (mode -rw-r--r--); chmod go-r it, "
        "or move them to password_file"
    )
    assert json_status == 0
    assert json.loads(json_out)["warnings"] == [out.splitlines()[1].split(": warning: ", 1)[1]]
    assert "upstream-secret" not in out + json_out


def test_check_config_lists_smtp_listeners_too(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = valid_config(tmp_path)
    text = path.read_text().replace(
        'pop3 = { host = "pop.example.com" }',
        'pop3 = { host = "pop.example.com" }\nsmtp = { host = "smtp.example.com" }',
    )
    path.write_text(
        text
        + '\n[[smtp.listen]]\ntls = "starttls"\nport = 2525\nallow_plaintext_auth = true\n'
    )

    status, out, _ = run(capsys, "check-config", str(path))

    assert status == 0
    assert (
        "  smtp on 0.0.0.0:2525, STARTTLS, TLS 1.2 or newer, plaintext login allowed before "
        "STARTTLS" in out.splitlines()
    )


def test_check_config_lists_every_problem_prefixed_by_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = broken_config(tmp_path)

    status, out, _ = run(capsys, "check-config", "--config", str(path))

    assert status == 1
    assert out.splitlines() == [
        f"{path}: pop3.idle_timeout: expected a number of seconds, got a string",
        f"{path}: devices.printer.password_hash: is not an argon2 hash;"
        " make one with `gateway hash-password`",
        f"{path}: devices.printer.account: unknown account 'nope'",
    ]


def test_check_config_json_for_a_broken_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = broken_config(tmp_path)

    status, out, _ = run(capsys, "check-config", "--json", str(path))

    assert status == 1
    document = json.loads(out)
    assert document["valid"] is False
    assert document["config"] == str(path)
    assert document["config_origin"] == "given on the command line"
    assert [p["path"] for p in document["problems"]] == [
        "pop3.idle_timeout",
        "devices.printer.password_hash",
        "devices.printer.account",
    ]
    assert all(p["message"] for p in document["problems"])


def test_check_config_json_for_a_valid_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = valid_config(tmp_path)

    status, out, _ = run(capsys, "--json", "check-config", str(path))

    assert status == 0
    document = json.loads(out)
    assert document["valid"] is True
    assert document["problems"] == []
    assert document["devices"] == ["copier", "printer"]
    assert document["accounts"] == ["scanner"]
    assert document["providers"] == ["corp"]
    assert document["listeners"][1] == {
        "protocol": "pop3",
        "address": "::",
        "port": 110,
        "tls": "starttls",
        "min_tls": "1.0",
        "allow_plaintext_auth": False,
        "proxy_protocol": False,
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "{path}", "check-config"],
        ["check-config", "--config", "{path}"],
        ["check-config", "{path}"],
    ],
)
def test_config_option_works_before_or_after_the_command(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    path = valid_config(tmp_path)
    status, out, _ = run(capsys, *(arg.format(path=path) for arg in argv))
    assert status == 0
    assert out.startswith(f"{path}: valid")


def test_check_config_refuses_two_different_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    status, _, err = run(capsys, "check-config", "--config", "a.toml", "b.toml")
    assert status == 1
    assert "not both" in err


def test_a_missing_file_is_named_with_how_it_was_chosen(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nowhere.toml"

    status, out, _ = run(capsys, "check-config", str(missing))
    assert status == 1
    assert out == f"{missing}: file not found (given on the command line)\n"

    monkeypatch.setenv(CONFIG_ENV, str(missing))
    status, out, _ = run(capsys, "check-config")
    assert status == 1
    assert out == f"{missing}: file not found (from $GATEWAY_CONFIG)\n"


def test_the_default_file_missing_says_how_to_choose_another(
    capsys: pytest.CaptureFixture[str], no_ambient_config: Path
) -> None:
    status, out, _ = run(capsys, "check-config")
    assert status == 1
    assert out.startswith(f"{no_ambient_config}: file not found (the default;")
    assert "--config FILE" in out
    assert "$GATEWAY_CONFIG" in out


def test_a_missing_file_in_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status, out, _ = run(capsys, "check-config", "--json", str(tmp_path / "x.toml"))
    assert status == 1
    document = json.loads(out)
    assert document["unreadable"] is True
    assert document["problems"] == [{"path": "", "message": "file not found"}]


def test_a_syntax_error_is_one_line_without_a_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("[pop3\n")
    status, out, err = run(capsys, "check-config", str(path))
    assert (status, err) == (1, "")
    [line] = out.splitlines()
    assert line.startswith(f"{path}: TOML syntax error: ")
    assert "line 1" in line


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


# -- which file -------------------------------------------------------------------------------


def test_an_explicit_file_wins_over_the_environment(no_ambient_config: Path) -> None:
    environ = {CONFIG_ENV: "/from/env.toml"}
    assert find_config_path("given.toml", environ) == Path("given.toml")
    assert locate_config("given.toml", environ).origin == "given on the command line"


def test_the_environment_wins_over_the_default(no_ambient_config: Path) -> None:
    environ = {CONFIG_ENV: "/from/env.toml"}
    assert find_config_path(None, environ) == Path("/from/env.toml")
    assert locate_config(None, environ).origin == "from $GATEWAY_CONFIG"


def test_the_default_is_used_last(no_ambient_config: Path) -> None:
    assert find_config_path(None, {}) == no_ambient_config
    assert find_config_path(None, {CONFIG_ENV: ""}) == no_ambient_config


def test_the_real_default_is_etc_gateway() -> None:
    assert SHIPPED_DEFAULT == Path("/etc/gateway/gateway.toml")


def test_the_process_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CONFIG_ENV, "/from/env.toml")
    assert find_config_path(None) == Path("/from/env.toml")
