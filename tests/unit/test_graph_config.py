"""Configuration of Graph-backed accounts: `mailbox = "graph"`, the
provider's `graph_url` (Microsoft's by default, an emulator's in tests) and
the [IN-USE] lock key, which names the folder as for IMAP accounts."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config
from gateway.locks import mailbox_key
from gateway.model import DEFAULT_GRAPH_URL, Account, Provider

BASE = """\
state_dir = "state"

[providers.m365]
graph_url = "{url}"

[providers.m365.oauth]
token_url = "https://login.example/token"
client_id = "gw"
device_authorization_url = "https://login.example/device"

[accounts.scanner]
provider = "m365"
username = "scans@contoso.example"
auth = "oauth2"
mailbox = "graph"
folder = "Inbox/Scans"
on_delete = "move"
move_to = "deleteditems"
"""


def load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return load_config(path)


def test_graph_account_and_graph_url(tmp_path: Path) -> None:
    config = load(tmp_path, BASE.format(url="http://127.0.0.1:8080/v1.0"))
    account = config.accounts["scanner"]
    assert account.mailbox == "graph"
    assert account.folder == "Inbox/Scans"
    assert config.providers["m365"].graph_url == "http://127.0.0.1:8080/v1.0"


def test_graph_url_defaults_to_microsoft(tmp_path: Path) -> None:
    text = BASE.replace('graph_url = "{url}"\n', 'imap = { host = "imap.example" }\n')
    config = load(tmp_path, text)
    assert config.providers["m365"].graph_url == DEFAULT_GRAPH_URL == (
        "https://graph.microsoft.com/v1.0"
    )


def test_graph_url_must_be_https(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, BASE.format(url="http://graph.example/v1.0"))
    assert any("graph_url" in str(p) for p in info.value.problems)


def test_lock_key_names_the_graph_folder() -> None:
    a = Account(name="a", provider="m", username="U@x", mailbox="graph", folder="Inbox/Scans")
    b = Account(name="b", provider="m", username="u@x", mailbox="graph", folder="Inbox/Scans")
    c = Account(name="c", provider="m", username="u@x", mailbox="graph", folder="inbox")
    d = Account(name="d", provider="m", username="u@x", mailbox="graph", folder="Inbox")
    assert mailbox_key(a) == mailbox_key(b) != mailbox_key(c) == mailbox_key(d)


def test_provider_graph_endpoint_for_checks() -> None:
    assert Provider(name="p").graph == DEFAULT_GRAPH_URL


def test_graph_move_goes_to_deleted_items_by_default(tmp_path: Path) -> None:
    text = BASE.format(url="http://127.0.0.1:8080/v1.0").replace('move_to = "deleteditems"\n', "")
    assert load(tmp_path, text).accounts["scanner"].move_to == "deleteditems"


def test_an_imap_move_still_needs_its_folder(tmp_path: Path) -> None:
    text = (
        BASE.format(url="http://127.0.0.1:8080/v1.0")
        .replace('move_to = "deleteditems"\n', "")
        .replace('mailbox = "graph"', 'mailbox = "imap"')
        .replace('graph_url = "http://127.0.0.1:8080/v1.0"', 'imap = { host = "imap.example" }')
    )
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert any(p.path == "accounts.scanner.move_to" for p in info.value.problems)
