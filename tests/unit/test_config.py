"""Loading the operator's TOML file: the model it builds and every problem it reports."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path

import pytest
import trustme
from argon2 import PasswordHasher
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, Problem, load_config
from gateway.config import reader as config_reader
from gateway.model import (
    ANY_ADDRESS,
    Account,
    AdminSettings,
    Config,
    Device,
    Endpoint,
    Listener,
    LogSettings,
    Provider,
    Secret,
)
from tests.harness.certs import make_tls_material

EXAMPLE = Path(__file__).resolve().parents[2] / "etc" / "gateway.example.toml"

# Cheap parameters: the loader only checks the format, never verifies.
HASH = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("device-pw")
UPSTREAM_PASSWORD = "upstream-pw-7f3a"

# A complete, valid file using paths relative to its own directory. Tests
# break it one replacement at a time.
VALID = f"""\
state_dir = "state"

[tls]
certificate = "tls/cert-chain.pem"
private_key = "tls/key.pem"

[pop3]
idle_timeout = 900

[[pop3.listen]]
tls = "implicit"
port = 995
address = "0.0.0.0"
min_tls = "1.2"

[[pop3.listen]]
tls = "starttls"
port = 110
address = "::"
min_tls = "1.0"
allow_plaintext_auth = true

[providers.corp]
pop3 = {{ host = "pop.example.com", port = 995, tls = "implicit" }}
ca_file = "tls/ca.pem"
timeout = 12.5
pop3_auth = "user"

[accounts.scanner]
provider = "corp"
username = "scanner@example.com"
password_file = "secrets/scanner"

[devices.printer-3f]
password_hash = "{HASH}"
account = "scanner"
allow_from = ["10.20.0.0/16", "192.0.2.7", "2001:db8::/32"]
protocols = ["pop3"]
"""


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def config_dir(tmp_path: Path, ca: trustme.CA) -> Path:
    """A directory with the TLS and password files VALID refers to."""
    make_tls_material(tmp_path / "tls", names=["gateway.example"], ca=ca)
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "scanner").write_text(UPSTREAM_PASSWORD + "\n")
    return tmp_path


def write(directory: Path, text: str) -> Path:
    path = directory / "gateway.toml"
    path.write_text(text)
    return path


def edit(text: str, old: str, new: str) -> str:
    """Replace exactly one occurrence, so a test cannot silently stop testing."""
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


def problems_of(path: Path) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def messages(problems: list[Problem]) -> list[str]:
    return [str(problem) for problem in problems]


# -- a valid file ------------------------------------------------------------------


def test_valid_file_builds_the_model(config_dir: Path) -> None:
    config = load_config(write(config_dir, VALID))

    assert config.source == config_dir / "gateway.toml"
    assert config.state_dir == config_dir / "state"
    assert config.tls is not None
    assert config.tls.certificate == config_dir / "tls" / "cert-chain.pem"
    assert config.tls.private_key == config_dir / "tls" / "key.pem"
    assert config.pop3.idle_timeout == 900.0
    assert config.pop3.listeners == (
        Listener(protocol="pop3", port=995, tls="implicit", address="0.0.0.0", min_tls="1.2"),
        Listener(
            protocol="pop3",
            port=110,
            tls="starttls",
            address="::",
            min_tls="1.0",
            allow_plaintext_auth=True,
        ),
    )
    assert config.providers == {
        "corp": Provider(
            name="corp",
            pop3=Endpoint("pop.example.com", 995, "implicit"),
            ca_file=config_dir / "tls" / "ca.pem",
            timeout=12.5,
            pop3_auth="user",
        )
    }
    assert config.accounts == {
        "scanner": Account(
            name="scanner",
            provider="corp",
            username="scanner@example.com",
            password=Secret(UPSTREAM_PASSWORD),
        )
    }
    assert config.devices == {
        "printer-3f": Device(
            name="printer-3f",
            password_hash=Secret(HASH),
            account="scanner",
            allow_from=(
                ipaddress.ip_network("10.20.0.0/16"),
                ipaddress.ip_network("192.0.2.7/32"),
                ipaddress.ip_network("2001:db8::/32"),
            ),
            protocols=frozenset({"pop3"}),
        )
    }


def test_defaults_fill_in_what_is_left_out(config_dir: Path) -> None:
    text = f"""\
[tls]
certificate = "tls/cert-chain.pem"
private_key = "tls/key.pem"

[[pop3.listen]]
tls = "implicit"

[[pop3.listen]]
tls = "starttls"

[providers.corp]
pop3 = {{ host = "pop.example.com" }}
smtp = {{ host = "smtp.example.com", tls = "starttls" }}
imap = {{ host = "imap.example.com" }}

[accounts.scanner]
provider = "corp"
username = "scanner"
password = "x"

[devices.printer]
password_hash = "{HASH}"
account = "scanner"
"""
    config = load_config(write(config_dir, text))

    assert config.state_dir == Path("/var/lib/gateway")
    assert config.pop3.idle_timeout == 600.0
    implicit, starttls = config.pop3.listeners
    assert implicit == Listener("pop3", 995, "implicit", "0.0.0.0", "1.2", False)
    assert starttls == Listener("pop3", 110, "starttls", "0.0.0.0", "1.2", False)
    corp = config.providers["corp"]
    assert corp.pop3 == Endpoint("pop.example.com", 995, "implicit")
    assert corp.smtp == Endpoint("smtp.example.com", 587, "starttls")
    assert corp.imap == Endpoint("imap.example.com", 993, "implicit")
    assert (corp.ca_file, corp.timeout, corp.pop3_auth) == (None, 30.0, "auto")
    device = config.devices["printer"]
    assert device.allow_from == ANY_ADDRESS
    assert device.protocols == frozenset({"pop3", "smtp"})


def test_a_file_without_listeners_needs_no_tls(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, 'state_dir = "/srv/gw"\n'))
    assert config.tls is None
    assert config.pop3.listeners == ()
    assert config.state_dir == Path("/srv/gw")


def test_relative_paths_follow_the_config_file_not_the_working_directory(
    config_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(config_dir, VALID)
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))

    config = load_config(config_dir / "gateway.toml")

    assert config.state_dir == config_dir / "state"
    assert config.accounts["scanner"].password == Secret(UPSTREAM_PASSWORD)


def test_source_is_absolute_even_when_given_relative(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(config_dir, VALID)
    monkeypatch.chdir(config_dir.parent)

    config = load_config(Path(config_dir.name) / "gateway.toml")

    assert config.source == config_dir / "gateway.toml"
    assert config.source.is_absolute()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("pw\n", "pw"),
        ("pw\r\n", "pw"),
        ("pw", "pw"),
        (" pw with spaces \n", " pw with spaces "),
        ("pw\n\n", "pw\n"),
    ],
)
def test_password_file_loses_only_its_final_newline(
    config_dir: Path, content: str, expected: str
) -> None:
    (config_dir / "secrets" / "scanner").write_text(content, newline="")
    config = load_config(write(config_dir, VALID))
    assert config.accounts["scanner"].password == Secret(expected)


def test_inline_password_is_accepted_instead_of_a_file(config_dir: Path) -> None:
    text = edit(VALID, 'password_file = "secrets/scanner"', 'password = "inline-pw"')
    config = load_config(write(config_dir, text))
    assert config.accounts["scanner"].password == Secret("inline-pw")


def test_account_without_pop3_is_fine_when_no_pop3_device_uses_it(config_dir: Path) -> None:
    text = edit(
        VALID,
        'pop3 = { host = "pop.example.com", port = 995, tls = "implicit" }',
        'smtp = { host = "smtp.example.com" }',
    )
    text = edit(text, 'protocols = ["pop3"]', 'protocols = ["smtp"]')
    config = load_config(write(config_dir, text))
    assert config.providers["corp"].pop3 is None


# -- secrets ---------------------------------------------------------------------------


def test_secrets_never_appear_in_repr_or_str(config_dir: Path) -> None:
    config = load_config(write(config_dir, VALID))
    for text in (repr(config), str(config), repr(config.accounts), str(config.devices)):
        assert UPSTREAM_PASSWORD not in text
        assert HASH not in text
        assert "argon2" not in text


def test_secret_values_stay_out_of_problem_messages(config_dir: Path) -> None:
    text = edit(VALID, 'password_file = "secrets/scanner"', "password = 31415926")
    text = edit(text, f'password_hash = "{HASH}"', 'password_hash = "hunter2-not-a-hash"')
    with pytest.raises(ConfigError) as info:
        load_config(write(config_dir, text))
    assert "31415926" not in str(info.value)
    assert "hunter2" not in str(info.value)
    assert len(info.value.problems) == 2


def test_private_key_contents_stay_out_of_problem_messages(config_dir: Path) -> None:
    key = config_dir / "tls" / "key.pem"
    key.write_text(key.read_text().replace("A", "B"))  # still PEM-shaped, no longer a key
    text = (config_dir / "tls" / "key.pem").read_text()
    with pytest.raises(ConfigError) as info:
        load_config(write(config_dir, VALID))
    [problem] = info.value.problems
    assert problem.path == "tls.private_key"
    for line in text.splitlines()[1:-1]:
        assert line not in str(info.value)


# -- one problem at a time ---------------------------------------------------------------

BROKEN = [
    # (old, new, key path, message fragment)
    (
        'min_tls = "1.2"',
        'min_tls = "1.4"',
        "pop3.listen[0].min_tls",
        "must be one of 1.0, 1.1, 1.2, 1.3",
    ),
    ('min_tls = "1.2"', "min_tls = 1.2", "pop3.listen[0].min_tls", 'expected one of "1.0"'),
    (
        'tls = "implicit"\nport = 995',
        'tls = "ssl"\nport = 995',
        "pop3.listen[0].tls",
        "must be one of implicit, starttls",
    ),
    ("port = 110", "port = 0", "pop3.listen[1].port", "must be between 1 and 65535"),
    ("port = 110", "port = 65536", "pop3.listen[1].port", "must be between 1 and 65535"),
    ("port = 110", 'port = "110"', "pop3.listen[1].port", "expected an integer, got a string"),
    ("port = 110", "port = true", "pop3.listen[1].port", "expected an integer, got a boolean"),
    ("port = 110", "port = 995", "pop3.listen[1].port", "already taken by pop3.listen[0]"),
    ('address = "::"', 'address = "localhost"', "pop3.listen[1].address", "not an IP address"),
    (
        "allow_plaintext_auth = true",
        'allow_plaintext_auth = "yes"',
        "pop3.listen[1].allow_plaintext_auth",
        "expected true or false",
    ),
    ('tls = "starttls"\n', "", "pop3.listen[1].tls", "required key is missing"),
    ("idle_timeout = 900", "idle_timeout = 0", "pop3.idle_timeout", "greater than 0"),
    ("idle_timeout = 900", "idle_timeout = -5.0", "pop3.idle_timeout", "greater than 0"),
    ("idle_timeout = 900", "idle_timeout = inf", "pop3.idle_timeout", "finite"),
    (
        "idle_timeout = 900",
        'idle_timeout = "10m"',
        "pop3.idle_timeout",
        "expected a number of seconds",
    ),
    (
        "idle_timeout = 900",
        "idle_timout = 900",
        "pop3.idle_timout",
        "unknown key (did you mean idle_timeout?)",
    ),
    ('state_dir = "state"', "state_dir = 1", "state_dir", "expected a string, got an integer"),
    ('state_dir = "state"', 'state_dir = "state"\nsmtp_port = 25', "smtp_port", "unknown key"),
    (
        'certificate = "tls/cert-chain.pem"',
        'certificate = "tls/nope.pem"',
        "tls.certificate",
        "nope.pem: file not found",
    ),
    (
        'certificate = "tls/cert-chain.pem"',
        'certificate = "tls"',
        "tls.certificate",
        "not a regular file",
    ),
    (
        'certificate = "tls/cert-chain.pem"',
        'certificate = "tls/key.pem"',
        "tls.certificate",
        "cannot load",
    ),
    ('private_key = "tls/key.pem"', 'private_key = "tls/ca.pem"', "tls.private_key", "cannot load"),
    ('private_key = "tls/key.pem"\n', "", "tls.private_key", "required key is missing"),
    (
        'pop3 = { host = "pop.example.com", port = 995, tls = "implicit" }',
        "",
        "providers.corp",
        "needs at least one endpoint",
    ),
    ('host = "pop.example.com", ', "", "providers.corp.pop3.host", "required key is missing"),
    (
        'host = "pop.example.com"',
        'host = "pop example com"',
        "providers.corp.pop3.host",
        "not a host name",
    ),
    (
        'tls = "implicit" }',
        'tls = "tls" }',
        "providers.corp.pop3.tls",
        "must be one of implicit, starttls",
    ),
    (
        "port = 995, tls",
        "port = 99999, tls",
        "providers.corp.pop3.port",
        "must be between 1 and 65535",
    ),
    (
        'tls = "implicit" }',
        'tls = "implicit", user = "x" }',
        "providers.corp.pop3.user",
        "unknown key",
    ),
    (
        'pop3 = { host = "pop.example.com", port = 995, tls = "implicit" }',
        'pop3 = "pop.example.com"',
        "providers.corp.pop3",
        "expected a table, got a string",
    ),
    (
        'ca_file = "tls/ca.pem"',
        'ca_file = "tls/missing.pem"',
        "providers.corp.ca_file",
        "missing.pem: file not found",
    ),
    (
        'ca_file = "tls/ca.pem"',
        'ca_file = "secrets/scanner"',
        "providers.corp.ca_file",
        "cannot load",
    ),
    ("timeout = 12.5", "timeout = 0", "providers.corp.timeout", "greater than 0"),
    (
        'pop3_auth = "user"',
        'pop3_auth = "apop"',
        "providers.corp.pop3_auth",
        "must be one of auto, user, plain",
    ),
    (
        'pop3_auth = "user"',
        'pop3_auth = "user"\nfrobnicate = 1',
        "providers.corp.frobnicate",
        "unknown key",
    ),
    (
        'provider = "corp"',
        'provider = "nope"',
        "accounts.scanner.provider",
        "unknown provider 'nope'",
    ),
    (
        'username = "scanner@example.com"\n',
        "",
        "accounts.scanner.username",
        "required key is missing",
    ),
    ('username = "scanner@example.com"', 'username = ""', "accounts.scanner.username", "is empty"),
    (
        'password_file = "secrets/scanner"',
        'password_file = "secrets/nope"',
        "accounts.scanner.password_file",
        "secrets/nope: file not found",
    ),
    (
        'password_file = "secrets/scanner"',
        'password_file = "secrets/scanner"\npassword = "x"',
        "accounts.scanner",
        "exactly one of password or password_file",
    ),
    (
        'password_file = "secrets/scanner"',
        "",
        "accounts.scanner",
        "exactly one of password or password_file",
    ),
    ('password_file = "secrets/scanner"', 'password = ""', "accounts.scanner.password", "is empty"),
    (
        'username = "scanner@example.com"',
        'username = "s"\nauth = "oauth"',
        "accounts.scanner.auth",
        "must be one of password, oauth2",
    ),
    ("[devices.printer-3f]", '[devices."printer 3f"]', 'devices."printer 3f"', "no spaces"),
    (
        'account = "scanner"',
        'account = "nope"',
        "devices.printer-3f.account",
        "unknown account 'nope'",
    ),
    (
        f'password_hash = "{HASH}"',
        'password_hash = "$2b$12$abcdefghijklmnopqrstuv"',
        "devices.printer-3f.password_hash",
        "is not an argon2 hash",
    ),
    (
        f'password_hash = "{HASH}"',
        'password_hash = "$argon2id$v=19$m=65536,t=3,p=4$..."',
        "devices.printer-3f.password_hash",
        "is not an argon2 hash",
    ),
    (
        f'password_hash = "{HASH}"\n',
        "",
        "devices.printer-3f.password_hash",
        "required key is missing",
    ),
    (
        '"192.0.2.7"',
        '"10.0.0.300/8"',
        "devices.printer-3f.allow_from[1]",
        "'10.0.0.300/8' is not a network",
    ),
    (
        '"192.0.2.7"',
        '"10.0.0.1/8"',
        "devices.printer-3f.allow_from[1]",
        "write '10.0.0.0/8' for the network, or '10.0.0.1' for the single address",
    ),
    ('"192.0.2.7"', "7", "devices.printer-3f.allow_from[1]", "expected a string, got an integer"),
    (
        'allow_from = ["10.20.0.0/16", "192.0.2.7", "2001:db8::/32"]',
        "allow_from = []",
        "devices.printer-3f.allow_from",
        "is empty",
    ),
    (
        'allow_from = ["10.20.0.0/16", "192.0.2.7", "2001:db8::/32"]',
        'allow_from = "10.0.0.0/8"',
        "devices.printer-3f.allow_from",
        "expected an array of strings",
    ),
    (
        'allow_from = ["10.20.0.0/16", "192.0.2.7", "2001:db8::/32"]',
        'alow_from = ["10.0.0.0/8"]',
        "devices.printer-3f.alow_from",
        "unknown key (did you mean allow_from?)",
    ),
    (
        'protocols = ["pop3"]',
        'protocols = ["pop3", "imap"]',
        "devices.printer-3f.protocols[1]",
        "must be one of pop3, smtp",
    ),
    ('protocols = ["pop3"]', "protocols = []", "devices.printer-3f.protocols", "is empty"),
    (
        "[devices.printer-3f]\n",
        '[devices]\nprinter-4f = "scanner"\n[devices.printer-3f]\n',
        "devices.printer-4f",
        "expected a table, got a string",
    ),
    (
        'pop3 = { host = "pop.example.com", port = 995, tls = "implicit" }',
        'imap = { host = "imap.example.com" }',
        "devices.printer-3f.account",
        "has no pop3 endpoint",
    ),
]


@pytest.mark.parametrize(("old", "new", "path", "fragment"), BROKEN)
def test_each_problem_is_reported_at_its_key_path(
    config_dir: Path, old: str, new: str, path: str, fragment: str
) -> None:
    problems = problems_of(write(config_dir, edit(VALID, old, new)))

    assert [p.path for p in problems] == [path], messages(problems)
    assert fragment in problems[0].message


def test_missing_tls_is_reported_when_there_are_listeners(config_dir: Path) -> None:
    text = edit(
        VALID, '[tls]\ncertificate = "tls/cert-chain.pem"\nprivate_key = "tls/key.pem"\n', ""
    )
    [problem] = problems_of(write(config_dir, text))
    assert problem.path == "tls"
    assert "certificate and private_key" in problem.message


@pytest.mark.parametrize(
    ("pop3", "path", "message"),
    [
        ("listen = 5", "pop3.listen", "expected an array of tables, written [[pop3.listen]]"),
        ('listen = [{ tls = "implicit" }, "995"]', "pop3.listen[1]", "expected a table"),
        ('listen = [{ tls = "implicit", port = "995" }]', "pop3.listen[0].port", "an integer"),
    ],
)
def test_listeners_must_be_an_array_of_tables(
    tmp_path: Path, pop3: str, path: str, message: str
) -> None:
    text = f'[tls]\ncertificate = "c"\nprivate_key = "k"\n[pop3]\n{pop3}\n'
    problems = problems_of(write(tmp_path, text))
    assert [p.path for p in problems] == ["tls.certificate", "tls.private_key", path]
    assert message in problems[-1].message


def test_a_key_that_does_not_match_the_certificate_is_reported(config_dir: Path) -> None:
    make_tls_material(config_dir / "other", names=["other.example"])
    text = edit(VALID, 'private_key = "tls/key.pem"', 'private_key = "other/key.pem"')
    [problem] = problems_of(write(config_dir, text))
    assert problem.path == "tls.private_key"
    assert "does not match the certificate" in problem.message


def test_an_unreadable_password_file_is_reported(config_dir: Path) -> None:
    (config_dir / "secrets" / "scanner").write_bytes(b"\xff\xfe not utf-8")
    [problem] = problems_of(write(config_dir, VALID))
    assert problem == Problem(
        "accounts.scanner.password_file", f"{config_dir}/secrets/scanner: not UTF-8 text"
    )


def test_an_empty_password_file_is_reported(config_dir: Path) -> None:
    (config_dir / "secrets" / "scanner").write_text("\n")
    [problem] = problems_of(write(config_dir, VALID))
    assert problem.path == "accounts.scanner.password_file"
    assert problem.message.endswith("is empty")


def test_a_broken_entry_is_not_reported_again_where_it_is_used(config_dir: Path) -> None:
    """The account is broken, so it is not built; the device that names it
    must not add 'unknown account', nor the pop3 endpoint check a third."""
    text = edit(VALID, 'username = "scanner@example.com"\n', "")
    problems = problems_of(write(config_dir, text))
    assert [p.path for p in problems] == ["accounts.scanner.username"]


# -- the whole file ------------------------------------------------------------------


def test_every_problem_is_reported_together_section_by_section(config_dir: Path) -> None:
    text = VALID
    for old, new in [
        ('min_tls = "1.2"', 'min_tls = "1.4"'),
        ("timeout = 12.5", "timeout = 12.5\nfrobnicate = true"),
        ('password_file = "secrets/scanner"', 'password_file = "/x"'),
        ('account = "scanner"', 'account = "nope"'),
        ('"192.0.2.7"', '"10.0.0.300/8"'),
    ]:
        text = edit(text, old, new)

    problems = problems_of(write(config_dir, text))

    assert messages(problems) == [
        "pop3.listen[0].min_tls: must be one of 1.0, 1.1, 1.2, 1.3 (got '1.4')",
        "providers.corp.frobnicate: unknown key",
        "accounts.scanner.password_file: /x: file not found",
        "devices.printer-3f.account: unknown account 'nope'",
        "devices.printer-3f.allow_from[1]: '10.0.0.300/8' is not a network"
        " (write an address or address/prefix)",
    ]


def test_the_error_text_lists_every_problem_under_the_file_name(config_dir: Path) -> None:
    text = edit(VALID, 'min_tls = "1.2"', 'min_tls = "1.4"')
    text = edit(text, 'account = "scanner"', 'account = "nope"')
    path = write(config_dir, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert lines[0] == f"2 problems in {path}:"
    assert lines[1].startswith("  pop3.listen[0].min_tls: ")
    assert lines[2].startswith("  devices.printer-3f.account: ")
    assert info.value.source == path


def test_a_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, 'state_dir = "/srv"\n[pop3]\nidle_timeout = = 5\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert problem.path == ""
    assert problem.message.startswith("TOML syntax error: ")
    assert "line 3, column" in problem.message
    assert not info.value.unreadable


def test_a_duplicate_table_is_a_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[devices.a]\n[devices.a]\n")
    [problem] = problems_of(path)
    assert "line 2" in problem.message


def test_a_missing_file_is_one_unreadable_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.toml")
    assert info.value.problems == [Problem("", "file not found")]
    assert info.value.unreadable


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.unreadable


def test_a_file_that_is_not_utf8_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_bytes(b'state_dir = "\xff"\n')
    [problem] = problems_of(path)
    assert "UTF-8" in problem.message


def test_odd_key_names_are_quoted_in_paths(config_dir: Path) -> None:
    text = edit(VALID, "[devices.printer-3f]", '[devices."printer.3f"]')
    text = edit(text, 'account = "scanner"', 'account = "nope"')
    [problem] = problems_of(write(config_dir, text))
    assert problem.path == 'devices."printer.3f".account'


# -- robustness ----------------------------------------------------------------------

toml_scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
    st.text(max_size=20),
    st.sampled_from(["implicit", "starttls", "1.0", "1.3", "pop3", "::1", "10.0.0.0/8", "corp"]),
)
toml_values = st.one_of(toml_scalars, st.lists(toml_scalars, max_size=3))
KEYS = [
    "port", "tls", "address", "min_tls", "allow_plaintext_auth", "host", "provider",
    "username", "password", "password_file", "password_hash", "account", "allow_from",
    "protocols", "ca_file", "timeout", "pop3_auth", "certificate", "private_key",
]  # fmt: skip


def toml_value(value: object) -> str:
    """TOML for the values above."""
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, str):
        escaped = (f"\\u{ord(c):04x}" if c < " " or c in '\x7f"\\' else c for c in value)
        return '"' + "".join(escaped) + '"'
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return json.dumps(value)  # booleans, integers and finite floats are spelt alike


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    section=st.sampled_from(["pop3.listen[0]", "providers.corp", "accounts.scanner", "devices.d"]),
    table=st.dictionaries(st.sampled_from(KEYS), toml_values, max_size=6),
)
def test_any_values_give_problems_never_a_crash(
    tmp_path_factory: pytest.TempPathFactory, section: str, table: dict[str, object]
) -> None:
    body = "\n".join(f"{key} = {toml_value(value)}" for key, value in table.items())
    header = "[[pop3.listen]]" if section == "pop3.listen[0]" else f"[{section}]"
    path = write(tmp_path_factory.mktemp("fuzz"), f"{header}\n{body}\n")
    try:
        config = load_config(path)
    except ConfigError as e:
        assert e.problems
        assert all(re.match(r"(pop3|tls|providers|accounts|devices)\b", p.path) for p in e.problems)
    else:
        assert isinstance(config, Config)


# -- the shipped example ----------------------------------------------------------------


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """The example, with the files it names under /etc/gateway provided in tmp_path."""
    tls = make_tls_material(tmp_path / "tls", names=["gateway.example"])
    tls.certificate.rename(tmp_path / "tls" / "fullchain.pem")
    tls.private_key.rename(tmp_path / "tls" / "privkey.pem")
    make_tls_material(tmp_path / "corp").ca_file.rename(tmp_path / "corp-ca.pem")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "scanner").write_text("upstream secret\n")
    return write(tmp_path, EXAMPLE.read_text().replace('"/etc/gateway/', f'"{tmp_path}/'))


def test_the_example_config_is_valid(example: Path) -> None:
    config = load_config(example)

    assert config.state_dir == Path("/var/lib/gateway")
    assert [listener.port for listener in config.pop3.listeners] == [995, 110]
    assert set(config.devices) == {"printer-3f"}
    assert config.accounts["scanner"].password == Secret("upstream secret")


def test_the_example_mentions_every_key_the_loader_reads(
    example: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every key the loader asks for while reading the example (it asks for
    optional keys too, to apply their defaults) is set or shown commented out."""
    asked: set[str] = set()
    finish = config_reader.Table.finish

    def recording_finish(self: config_reader.Table) -> None:
        asked.update(self._seen)
        finish(self)

    monkeypatch.setattr(config_reader.Table, "finish", recording_finish)
    load_config(example)

    text = EXAMPLE.read_text()
    assert {"imap", "smtp", "password", "auth", "allow_plaintext_auth"} <= asked
    assert {key for key in asked if not re.search(rf"\b{key} = |[.[]{key}[].]", text)} == set()


# -- keys of the OAuth2, IMAP-backed and SMTP relay features -----------------------


def all_problems(directory: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as failure:
        load_config(write(directory, text))
    return [str(problem) for problem in failure.value.problems]


OAUTH_PROVIDER = """
[providers.m365]
preset = "microsoft365"
tenant = "contoso.onmicrosoft.com"
client_id = "app-id"

[providers.idp]
imap = { host = "imap.example.net" }
sasl = "oauthbearer"
oauth = { token_url = "http://127.0.0.1:8080/token", client_id = "gw", scopes = ["mail"], \
device_authorization_url = "https://id.example.net/device" }

[accounts.alarm]
provider = "m365"
username = "alarm@contoso.com"
auth = "oauth2"

[accounts.archive]
provider = "idp"
username = "archive@example.net"
auth = "oauth2"
mailbox = "imap"
folder = "Scans"
on_delete = "move"
move_to = "Archive"
"""


def test_preset_fills_endpoints_and_oauth_client(config_dir: Path) -> None:
    config = load_config(write(config_dir, VALID + OAUTH_PROVIDER))
    m365 = config.providers["m365"]
    assert m365.pop3 is not None and m365.pop3.host == "outlook.office365.com"
    assert m365.smtp is not None and (m365.smtp.port, m365.smtp.tls) == (587, "starttls")
    assert m365.oauth is not None
    assert m365.oauth.token_url.startswith("https://login.microsoftonline.com/contoso")
    assert "offline_access" in m365.oauth.scopes and m365.oauth.client_id == "app-id"
    alarm = config.accounts["alarm"]
    assert (alarm.auth, alarm.grant, alarm.password) == ("oauth2", "device_code", None)
    archive = config.accounts["archive"]
    assert (archive.mailbox, archive.folder, archive.on_delete, archive.move_to) == (
        "imap",
        "Scans",
        "move",
        "Archive",
    )
    idp = config.providers["idp"]
    assert idp.sasl == "oauthbearer" and idp.oauth is not None and idp.oauth.scopes == ("mail",)


def test_oauth_mistakes(config_dir: Path) -> None:
    text = VALID + OAUTH_PROVIDER
    text = edit(text, 'tenant = "contoso.onmicrosoft.com"\n', "")
    text = edit(text, "http://127.0.0.1:8080/token", "http://id.example.net/token")
    text = edit(text, 'auth = "oauth2"\nmailbox', 'auth = "oauth2"\npassword = "x"\nmailbox')
    text = edit(text, 'move_to = "Archive"\n', "")
    found = all_problems(config_dir, text)
    assert any(p.startswith("providers.m365.tenant: required with preset") for p in found)
    assert any(p.startswith("providers.idp.oauth.token_url: ") and "https" in p for p in found)
    assert any(p.startswith("accounts.archive.password: not used with auth") for p in found)
    assert any(p.startswith("accounts.archive.move_to: required") for p in found)


def test_grant_needs_what_the_provider_offers(config_dir: Path) -> None:
    text = VALID + OAUTH_PROVIDER + 'grant = "client_credentials"\n'
    found = all_problems(config_dir, text)
    assert found == [
        "accounts.archive.provider: provider 'idp' has no client secret, which the "
        "client_credentials grant needs"
    ]


def test_client_secret_file_is_read_as_a_secret(config_dir: Path) -> None:
    (config_dir / "secrets" / "m365").write_text("s3cret\n")
    text = edit(
        VALID + OAUTH_PROVIDER,
        'client_id = "app-id"\n',
        'client_id = "app-id"\nclient_secret_file = "secrets/m365"\n',
    )
    config = load_config(write(config_dir, text))
    oauth = config.providers["m365"].oauth
    assert oauth is not None and oauth.client_secret == Secret("s3cret")
    assert "s3cret" not in repr(config)


SMTP = """
[smtp]
max_recipients = 20
retry_first = 5

[[smtp.listen]]
tls = "starttls"
port = 2587
"""


def test_smtp_section_and_relay_devices(config_dir: Path) -> None:
    text = edit(VALID, 'protocols = ["pop3"]', 'protocols = ["pop3", "smtp"]')
    text = edit(
        text,
        'pop3 = {{ host = "pop.example.com"'.replace("{{", "{"),
        'smtp = { host = "smtp.example.com" }\npop3 = { host = "pop.example.com"',
    )
    text += "relay_without_auth = true\n[accounts.scanner.x]\n" if False else ""
    text = edit(text, 'account = "scanner"\n', 'account = "scanner"\nrelay_without_auth = true\n')
    config = load_config(write(config_dir, text + SMTP))
    assert config.smtp.max_recipients == 20 and config.smtp.retry_first == 5.0
    (listener,) = config.smtp.listeners
    assert (listener.protocol, listener.port, listener.tls) == ("smtp", 2587, "starttls")
    assert config.devices["printer-3f"].relay_without_auth


def test_smtp_long_lines(config_dir: Path) -> None:
    assert load_config(write(config_dir, VALID)).smtp.long_lines == "fold"
    text = VALID + '[smtp]\nlong_lines = "refuse"\n'
    assert load_config(write(config_dir, text)).smtp.long_lines == "refuse"
    text = VALID + '[smtp]\nlong_lines = "truncate"\n'
    assert any(
        "smtp.long_lines" in problem and "fold, refuse" in problem
        for problem in all_problems(config_dir, text)
    ), all_problems(config_dir, text)


def test_relay_without_auth_needs_allow_from(config_dir: Path) -> None:
    text = edit(VALID, 'allow_from = ["10.20.0.0/16", "192.0.2.7", "2001:db8::/32"]\n', "")
    text = edit(
        text, 'protocols = ["pop3"]', 'protocols = ["pop3", "smtp"]\nrelay_without_auth = true'
    )
    found = all_problems(config_dir, text)
    assert found[0].startswith("devices.printer-3f.relay_without_auth: needs allow_from")


def test_smtp_device_needs_an_smtp_endpoint_when_smtp_listens(config_dir: Path) -> None:
    text = edit(VALID, 'protocols = ["pop3"]', 'protocols = ["pop3", "smtp"]')
    found = all_problems(config_dir, text + SMTP)
    assert any("has no smtp endpoint" in p for p in found)


def test_listeners_clash_across_protocols(config_dir: Path) -> None:
    text = edit(VALID, 'protocols = ["pop3"]', 'protocols = ["pop3"]')
    found = all_problems(config_dir, text + SMTP.replace("port = 2587", "port = 995"))
    assert found == ["smtp.listen[0].port: 0.0.0.0 port 995 is already taken by pop3.listen[0]"]


def test_imap_backed_account_needs_an_imap_endpoint(config_dir: Path) -> None:
    text = edit(
        VALID,
        'password_file = "secrets/scanner"',
        'password_file = "secrets/scanner"\nmailbox = "imap"',
    )
    found = all_problems(config_dir, text)
    assert any("has no imap endpoint" in p for p in found)


def test_relay_without_auth_refuses_every_address(config_dir: Path) -> None:
    text = edit(VALID, '"192.0.2.7", "2001:db8::/32"]', '"0.0.0.0/0"]')
    text = edit(
        text, 'protocols = ["pop3"]', 'protocols = ["pop3", "smtp"]\nrelay_without_auth = true'
    )
    found = all_problems(config_dir, text)
    assert found == [
        "devices.printer-3f.relay_without_auth: allow_from includes every address, "
        "which would make the gateway an open relay"
    ]


# -- file modes of secrets and state -----------------------------------------------------


def private(config_dir: Path) -> Path:
    """VALID with every secret 0600 and the config file 0644: nothing to say."""
    (config_dir / "secrets" / "scanner").chmod(0o600)
    (config_dir / "tls" / "key.pem").chmod(0o600)
    path = write(config_dir, VALID)
    path.chmod(0o644)
    return path


def test_private_secrets_give_no_warning(config_dir: Path) -> None:
    assert load_config(private(config_dir)).warnings == ()


def test_secrets_others_can_read_are_warned_about_not_refused(config_dir: Path) -> None:
    (config_dir / "secrets" / "m365").write_text("s3cret\n")
    text = edit(
        VALID + OAUTH_PROVIDER,
        'client_id = "app-id"\n',
        'client_id = "app-id"\nclient_secret_file = "secrets/m365"\n',
    )
    path = write(config_dir, text + '\n[oauth]\nkey_file = "secrets/gateway.key"\n')
    (config_dir / "secrets" / "gateway.key").write_text("key\n")
    (config_dir / "secrets" / "scanner").chmod(0o644)
    (config_dir / "tls" / "key.pem").chmod(0o640)
    (config_dir / "secrets" / "m365").chmod(0o604)
    (config_dir / "secrets" / "gateway.key").chmod(0o644)
    config = load_config(path)
    scanner, key, m365, gateway_key = (
        config_dir / "secrets" / "scanner",
        config_dir / "tls" / "key.pem",
        config_dir / "secrets" / "m365",
        config_dir / "secrets" / "gateway.key",
    )
    assert sorted(config.warnings) == sorted(
        [
            f"tls.private_key: {key} holds a secret but is readable by group "
            "(mode -rw-r-----); chmod go-r it",
            f"oauth.key_file: {gateway_key} holds a secret but is readable by group and "
            "others (mode -rw-r--r--); chmod go-r it",
            f"providers.m365.client_secret_file: {m365} holds a secret but is readable by "
            "others (mode -rw----r--); chmod go-r it",
            f"accounts.scanner.password_file: {scanner} holds a secret but is readable by "
            "group and others (mode -rw-r--r--); chmod go-r it",
        ]
    )
    assert "s3cret" not in " ".join(config.warnings)


def test_a_config_file_with_inline_passwords_others_can_read_is_warned_about(
    config_dir: Path,
) -> None:
    (config_dir / "tls" / "key.pem").chmod(0o600)
    path = write(config_dir, edit(VALID, 'password_file = "secrets/scanner"', 'password = "pw"'))
    path.chmod(0o666)
    assert load_config(path).warnings == (
        "the file holds upstream passwords (accounts.scanner.password) but is readable by "
        "group and others (mode -rw-rw-rw-); chmod go-r it, or move them to password_file",
    )
    path.chmod(0o600)
    assert load_config(path).warnings == ()


def test_warnings_come_with_problems_too(config_dir: Path) -> None:
    path = private(config_dir)
    (config_dir / "tls" / "key.pem").chmod(0o644)
    path.write_text(edit(VALID, "timeout = 12.5", "timeout = -1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [p.path for p in info.value.warnings] == ["tls.private_key"]
    assert [p.path for p in info.value.problems] == ["providers.corp.timeout"]


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o1777])
def test_a_state_dir_others_can_write_is_a_problem(config_dir: Path, mode: int) -> None:
    path = private(config_dir)
    (config_dir / "state").mkdir()
    (config_dir / "state").chmod(mode)
    [problem] = problems_of(path)
    assert problem.path == "state_dir"
    assert problem.message.startswith(f"{config_dir / 'state'} is writable by group or others")
    assert "chmod go-w" in problem.message


@pytest.mark.parametrize("mode", [0o700, 0o755, 0o750])
def test_a_state_dir_only_its_owner_writes_is_fine(config_dir: Path, mode: int) -> None:
    path = private(config_dir)
    (config_dir / "state").mkdir()
    (config_dir / "state").chmod(mode)
    assert load_config(path).state_dir == config_dir / "state"


def test_a_state_dir_that_is_a_file_is_a_problem(config_dir: Path) -> None:
    path = private(config_dir)
    (config_dir / "state").write_text("")
    assert messages(problems_of(path)) == [f"state_dir: {config_dir / 'state'}: not a directory"]


# -- [admin] and [log] ---------------------------------------------------------------


def test_no_admin_section_means_no_admin_listener_and_text_logs(config_dir: Path) -> None:
    config = load_config(write(config_dir, VALID))
    assert config.admin is None
    assert config.log == LogSettings(format="text")


def test_an_empty_admin_section_is_plain_http_on_loopback(config_dir: Path) -> None:
    config = load_config(write(config_dir, VALID + "[admin]\n"))
    assert config.admin == AdminSettings()
    assert (config.admin.address, config.admin.port) == ("127.0.0.1", 9925)
    assert config.admin.uses_tls is False


def test_an_admin_listener_off_loopback_uses_https_by_default(config_dir: Path) -> None:
    config = load_config(write(config_dir, VALID + '[admin]\naddress = "10.1.2.3"\nport = 8443\n'))
    assert config.admin == AdminSettings(address="10.1.2.3", port=8443, tls=None)
    assert config.admin.uses_tls is True
    assert not any(w.startswith("admin.") for w in config.warnings)


def test_plain_http_off_loopback_is_allowed_with_a_warning(config_dir: Path) -> None:
    config = load_config(write(config_dir, VALID + '[admin]\naddress = "::"\ntls = false\n'))
    assert config.admin is not None and config.admin.uses_tls is False
    assert any(w.startswith("admin.tls: ") and "clear text" in w for w in config.warnings)


def test_https_on_the_admin_listener_needs_the_tls_section(tmp_path: Path) -> None:
    text = 'state_dir = "/srv/gw"\n[admin]\naddress = "192.0.2.1"\n'
    [problem] = problems_of(write(tmp_path, text))
    assert problem.path == "admin.address"
    assert "needs the [tls] certificate" in problem.message
    [problem] = problems_of(write(tmp_path, 'state_dir = "/srv/gw"\n[admin]\ntls = true\n'))
    assert problem.path == "admin.tls"


@pytest.mark.parametrize(
    ("admin", "path", "fragment"),
    [
        ('address = "localhost"', "admin.address", "not an IP address"),
        ("port = 0", "admin.port", "between 1 and 65535"),
        ('tls = "yes"', "admin.tls", "true or false"),
        ("port = 995", "admin.port", "already taken by pop3.listen[0]"),
        ("prot = 1", "admin.prot", "unknown key (did you mean port?)"),
    ],
)
def test_admin_section_problems(config_dir: Path, admin: str, path: str, fragment: str) -> None:
    problems = problems_of(write(config_dir, VALID + f"[admin]\n{admin}\n"))
    assert [p.path for p in problems] == [path], messages(problems)
    assert fragment in problems[0].message


def test_log_format(config_dir: Path) -> None:
    config = load_config(write(config_dir, VALID + '[log]\nformat = "json"\n'))
    assert config.log.format == "json"
    [problem] = problems_of(write(config_dir, VALID + '[log]\nformat = "xml"\n'))
    assert problem.path == "log.format"
    assert "must be one of text, json" in problem.message


def test_a_device_without_protocols_gets_what_its_provider_serves(config_dir: Path) -> None:
    """A printer meant only to send mail needs no `protocols = ["smtp"]`."""
    text = edit(VALID, 'protocols = ["pop3"]\n', "")
    text = edit(
        text,
        'pop3 = {{ host = "pop.example.com", port = 995, tls = "implicit" }}'.replace(
            "{{", "{"
        ).replace("}}", "}"),
        'smtp = { host = "smtp.example.com" }',
    )
    config = load_config(write(config_dir, text + SMTP))
    assert config.devices["printer-3f"].protocols == frozenset({"smtp"})

    both = edit(
        text,
        'smtp = { host = "smtp.example.com" }',
        'smtp = { host = "smtp.example.com" }\npop3 = { host = "pop.example.com" }',
    )
    config = load_config(write(config_dir, both + SMTP))
    assert config.devices["printer-3f"].protocols == frozenset({"pop3", "smtp"})


def test_a_device_whose_provider_serves_nothing_is_refused(config_dir: Path) -> None:
    """An IMAP-only provider serves nothing to a POP3-backed account's devices."""
    text = edit(VALID, 'protocols = ["pop3"]\n', "")
    text = edit(
        text, 'pop3 = {{ host = "pop.example.com"'.replace("{{", "{"), 'imap = { host = "i"'
    )
    found = all_problems(config_dir, text)
    assert found == [
        "devices.printer-3f.account: its provider has no endpoint a device could use "
        "(pop3, imap or smtp)"
    ]


# -- PROXY protocol -----------------------------------------------------------------------

PROXY = """
[proxy]
trusted = ["10.0.0.0/8", "fd00::1"]
header_timeout = 5
"""


def test_proxy_protocol_listener_with_trusted_networks(config_dir: Path) -> None:
    text = edit(VALID, 'min_tls = "1.2"\n', 'min_tls = "1.2"\nproxy_protocol = true\n')
    config = load_config(write(config_dir, text + PROXY))
    implicit, starttls = config.pop3.listeners
    assert implicit.proxy_protocol and not starttls.proxy_protocol
    assert config.proxy.trusted == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::1/128"),
    )
    assert config.proxy.header_timeout == 5.0


def test_proxy_defaults(config_dir: Path) -> None:
    config = load_config(write(config_dir, VALID))
    assert config.proxy.trusted == () and config.proxy.header_timeout == 10.0
    assert not any(listener.proxy_protocol for listener in config.pop3.listeners)


def test_proxy_protocol_without_trusted_networks_is_refused(config_dir: Path) -> None:
    text = edit(VALID, "allow_plaintext_auth = true\n", "proxy_protocol = true\n")
    assert all_problems(config_dir, text) == [
        "pop3.listen[1].proxy_protocol: needs [proxy] trusted naming the networks of the "
        "proxies that send the header"
    ]
    assert all_problems(config_dir, text + "[proxy]\ntrusted = []\n") == [
        "pop3.listen[1].proxy_protocol: needs [proxy] trusted naming the networks of the "
        "proxies that send the header"
    ]


@pytest.mark.parametrize(
    ("proxy", "expected"),
    [
        (
            'trusted = ["10.0.0.1/8"]',
            "proxy.trusted[0]: '10.0.0.1/8' has host bits set: write '10.0.0.0/8' for the "
            "network, or '10.0.0.1' for the single address",
        ),
        (
            'trusted = ["haproxy.lan"]',
            "proxy.trusted[0]: 'haproxy.lan' is not a network (write an address or address/prefix)",
        ),
        (
            'trusted = ["0.0.0.0/0"]',
            "proxy.trusted: 0.0.0.0/0 includes every address: anyone could claim any "
            "client address",
        ),
        ('trusted = "10.0.0.0/8"', "proxy.trusted: expected an array of strings, got a string"),
        ('trusted = ["10.0.0.0/8"]\nheader_timeout = 0', "proxy.header_timeout: must be"),
        ('trusted = ["10.0.0.0/8"]\ntrusted_networks = []', "proxy.trusted_networks: unknown"),
    ],
)
def test_proxy_section_problems(config_dir: Path, proxy: str, expected: str) -> None:
    found = all_problems(config_dir, VALID + "\n[proxy]\n" + proxy + "\n")
    assert found[0].startswith(expected), found


def test_proxy_protocol_must_be_a_boolean(config_dir: Path) -> None:
    text = edit(VALID, "allow_plaintext_auth = true\n", 'proxy_protocol = "v2"\n')
    found = all_problems(config_dir, text + PROXY)
    assert found == ["pop3.listen[1].proxy_protocol: expected true or false, got a string"]


# -- presets as the providers document them (issue 9) --------------------------------------


def provider_text(body: str, account: str = "") -> str:
    return (
        VALID
        + f'\n[providers.p]\n{body}\n[accounts.a]\nprovider = "p"\n'
        + ('username = "alice@example.com"\nauth = "oauth2"\n' + account)
    )


def test_gmail_defaults_to_the_code_grant_with_xoauth2_and_a_loopback_ip(
    config_dir: Path,
) -> None:
    config = load_config(
        write(
            config_dir,
            provider_text('preset = "gmail"\nclient_id = "id.apps.googleusercontent.com"'),
        )
    )
    gmail = config.providers["p"]
    assert (gmail.sasl, gmail.default_grant) == ("xoauth2", "authorization_code")
    assert gmail.oauth is not None and gmail.oauth.loopback_host == "127.0.0.1"
    assert gmail.oauth.revocation_url == "https://oauth2.googleapis.com/revoke"
    assert gmail.oauth.device_authorization_url is None
    assert config.accounts["a"].grant == "authorization_code"


@pytest.mark.parametrize(
    ("grant", "says"),
    [
        ("device_code", "Google's device flow does not allow the Gmail scope"),
        (
            "client_credentials",
            "Google has no client credentials grant: for app-only access to "
            'Workspace mailboxes use grant = "service_account"',
        ),
        ("service_account", "has no service_account_file"),
    ],
)
def test_gmail_refuses_the_grants_google_does_not_offer(
    config_dir: Path, grant: str, says: str
) -> None:
    text = provider_text('preset = "gmail"\nclient_id = "id"', f'grant = "{grant}"\n')
    (problem,) = all_problems(config_dir, text)
    assert problem.startswith(
        "accounts.a.provider: provider 'p' (gmail): "
        if grant != "service_account"
        else "accounts.a.provider: provider 'p' has no"
    )
    assert says in problem


def service_account_file(config_dir: Path, document: dict[str, str]) -> Path:
    path = config_dir / "secrets" / "sa.json"
    path.write_text(json.dumps(document))
    path.chmod(0o600)
    return path


def test_gmail_service_account_from_its_key_file(config_dir: Path) -> None:
    from tests.harness.oauth_modes import new_service_account
    from tests.harness.oauth_server import AuthServer

    key = new_service_account(AuthServer(), "gw@p.iam.gserviceaccount.com", ["alice"])
    path = service_account_file(config_dir, key)
    text = provider_text(
        f'preset = "gmail"\nclient_id = "id"\nservice_account_file = "{path}"',
        'grant = "service_account"\n',
    )
    config = load_config(write(config_dir, text))
    oauth = config.providers["p"].oauth
    assert oauth is not None and oauth.service_account is not None
    assert oauth.service_account.client_email == "gw@p.iam.gserviceaccount.com"
    assert key["private_key"] not in repr(config)
    service_account_file(config_dir, {"type": "authorized_user"})
    (problem,) = all_problems(config_dir, text)
    assert problem.startswith("providers.p.service_account_file: ")
    assert "not 'service_account'" in problem


@pytest.mark.parametrize("tenant", ["common", "organizations", "consumers"])
def test_client_credentials_need_a_real_tenant(config_dir: Path, tenant: str) -> None:
    (config_dir / "secrets" / "m365").write_text("s3cret\n")
    text = provider_text(
        f'preset = "microsoft365"\ntenant = "{tenant}"\nclient_id = "id"\n'
        'client_secret_file = "secrets/m365"',
        'grant = "client_credentials"\n',
    )
    (problem,) = all_problems(config_dir, text)
    assert "AADSTS9001023" in problem and "tenant id or its domain" in problem


def test_microsoft_presets_are_public_clients_speaking_xoauth2(config_dir: Path) -> None:
    config = load_config(write(config_dir, VALID + OAUTH_PROVIDER))
    m365 = config.providers["m365"]
    assert m365.sasl == "xoauth2" and m365.oauth is not None
    assert (m365.oauth.client_type, m365.oauth.loopback_host) == ("public", "localhost")
    assert m365.oauth.revocation_url is None and m365.graph_url == "https://graph.microsoft.com/v1.0"
    assert (m365.tenant, m365.cloud) == ("contoso.onmicrosoft.com", "global")


def test_confidential_microsoft_client_refuses_the_device_flow(config_dir: Path) -> None:
    text = provider_text(
        'preset = "microsoft365"\ntenant = "contoso.com"\nclient_id = "id"\n'
        'client_type = "confidential"'
    )
    (problem,) = all_problems(config_dir, text)
    assert "AADSTS700025" in problem and "public client flow" in problem


def test_outlook_preset(config_dir: Path) -> None:
    config = load_config(write(config_dir, provider_text('preset = "outlook"\nclient_id = "id"')))
    outlook = config.providers["p"]
    assert outlook.smtp is not None and outlook.smtp.host == "smtp-mail.outlook.com"
    assert outlook.pop3 is not None and outlook.pop3.host == "outlook.office365.com"
    assert outlook.imap is not None and outlook.imap.host == "outlook.office365.com"
    assert outlook.oauth is not None
    assert (
        outlook.oauth.token_url == "https://login.microsoftonline.com/consumers/oauth2/v2.0/token"
    )
    text = provider_text('preset = "outlook"\nclient_id = "id"', 'grant = "client_credentials"\n')
    (problem,) = all_problems(config_dir, text)
    assert "Outlook.com mailboxes have no app-only access" in problem


@pytest.mark.parametrize(
    ("cloud", "login", "exchange", "graph"),
    [
        ("usgov", "login.microsoftonline.us", "outlook.office365.us", "graph.microsoft.us"),
        ("dod", "login.microsoftonline.us", "outlook-dod.office365.us", "dod-graph.microsoft.us"),
        (
            "china",
            "login.partner.microsoftonline.cn",
            "partner.outlook.cn",
            "microsoftgraph.chinacloudapi.cn",
        ),
    ],
)
def test_national_clouds(
    config_dir: Path, cloud: str, login: str, exchange: str, graph: str
) -> None:
    text = provider_text(
        f'preset = "microsoft365"\ntenant = "contoso.com"\nclient_id = "id"\ncloud = "{cloud}"'
    )
    provider = load_config(write(config_dir, text)).providers["p"]
    assert provider.oauth is not None and provider.pop3 is not None
    assert provider.oauth.token_url == f"https://{login}/contoso.com/oauth2/v2.0/token"
    assert provider.pop3.host == exchange and provider.graph_url == f"https://{graph}/v1.0"
    assert provider.oauth.app_scopes == (f"https://{exchange}/.default",)
    assert provider.cloud == cloud


def test_cloud_is_for_microsoft365_only(config_dir: Path) -> None:
    text = provider_text('preset = "gmail"\nclient_id = "id"\ncloud = "usgov"')
    assert all_problems(config_dir, text) == [
        'providers.p.cloud: only used with preset "microsoft365" (Microsoft\'s national clouds)'
    ]


def test_an_oauth_table_overrides_only_what_it_names(config_dir: Path) -> None:
    text = provider_text(
        'preset = "microsoft365"\ntenant = "contoso.com"\nclient_id = "id"\n'
        'graph_url = "https://graph.example.net"\n'
        'oauth = { token_url = "http://127.0.0.1:8080/contoso.com/oauth2/v2.0/token" }'
    )
    provider = load_config(write(config_dir, text)).providers["p"]
    assert provider.oauth is not None
    assert provider.oauth.token_url == "http://127.0.0.1:8080/contoso.com/oauth2/v2.0/token"
    assert provider.oauth.client_id == "id" and "offline_access" in provider.oauth.scopes
    assert provider.oauth.client_type == "public"
    assert provider.graph_url == "https://graph.example.net"


def test_an_explicit_sasl_beats_the_presets(config_dir: Path) -> None:
    text = provider_text('preset = "gmail"\nclient_id = "id"\nsasl = "oauthbearer"')
    assert load_config(write(config_dir, text)).providers["p"].sasl == "oauthbearer"


def test_relay_connections_keepalive_and_control_interval(config_dir: Path) -> None:
    defaults = load_config(write(config_dir, VALID)).smtp
    assert (defaults.relay_connections, defaults.relay_keepalive, defaults.control_interval) == (
        3,
        2.0,
        2.0,
    )
    text = VALID + "\n[smtp]\nrelay_connections = 1\nrelay_keepalive = 30\ncontrol_interval = 5\n"
    smtp = load_config(write(config_dir, text)).smtp
    assert (smtp.relay_connections, smtp.relay_keepalive, smtp.control_interval) == (1, 30.0, 5.0)
    assert all_problems(config_dir, VALID + "\n[smtp]\nrelay_connections = 0\n")[0].startswith(
        "smtp.relay_connections"
    )
