"""The gateway key and the encrypted token store: modes, races, wrong keys, torn files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from gateway.model import OAuthSettings, Secret
from gateway.oauth.keys import (
    KEY_ENV,
    GatewayKey,
    GatewayKeyError,
    encode_key,
    generate_key_file,
    load_key,
    new_key,
)
from gateway.oauth.store import StoreUnreadable, TokenRecord, TokenStore, TokenStoreError
from gateway.oauth.tokens import Tokens
from tests.helpers.oauth import fresh_key

ACCESS = "access-token-value-123"
REFRESH = "refresh-token-value-456"


def record(account: str = "scanner", now: float = 1000.0) -> TokenRecord:
    tokens = Tokens(Secret(ACCESS), now + 3600, Secret(REFRESH), "mail")
    return TokenRecord.authorized(account, "device_code", tokens, now)


# -- the key ------------------------------------------------------------------------


def test_key_generated_on_first_use_with_mode_0600(tmp_path: Path) -> None:
    key = load_key(OAuthSettings(), tmp_path, environ={})
    path = tmp_path / "gateway.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key.origin == f"key file {path}"
    # The same key the second time: nothing regenerated.
    assert load_key(OAuthSettings(), tmp_path, environ={}).key == key.key


def test_key_generation_never_replaces_an_existing_key(tmp_path: Path) -> None:
    path = tmp_path / "k"
    assert generate_key_file(path) is True
    first = path.read_text()
    assert generate_key_file(path) is False  # a concurrent process lost the race
    assert path.read_text() == first
    assert [p.name for p in tmp_path.iterdir()] == ["k"]  # no temp files left


def test_key_from_environment_wins(tmp_path: Path) -> None:
    material = new_key()
    key = load_key(OAuthSettings(), tmp_path, environ={KEY_ENV: encode_key(material)})
    assert key.key == material and key.origin == f"${KEY_ENV}"
    assert not (tmp_path / "gateway.key").exists()


def test_key_file_from_config(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "tokens.key"
    path.parent.mkdir()
    key = load_key(OAuthSettings(key_file=path), tmp_path, environ={})
    assert path.exists() and key.origin == f"key file {path}"


def test_readable_key_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "gateway.key"
    generate_key_file(path)
    path.chmod(0o644)
    with pytest.raises(GatewayKeyError, match="must be 0600"):
        load_key(OAuthSettings(), tmp_path, environ={})


@pytest.mark.parametrize("bad", ["", "not base64 at all!", encode_key(b"short")])
def test_malformed_key_refused_without_showing_it(tmp_path: Path, bad: str) -> None:
    with pytest.raises(GatewayKeyError) as info:
        load_key(OAuthSettings(), tmp_path, environ={KEY_ENV: bad})
    assert f"${KEY_ENV} is not a gateway key" in str(info.value)
    if bad:
        assert bad not in str(info.value)


def test_key_repr_hides_material() -> None:
    key = fresh_key()
    assert encode_key(key.key) not in repr(key) and key.key.hex() not in repr(key)


# -- the store ------------------------------------------------------------------------


def test_round_trip_and_encrypted_at_rest(tmp_path: Path) -> None:
    store = TokenStore.open(tmp_path, fresh_key())
    store.update("scanner", lambda _: record())
    loaded = store.load("scanner")
    assert loaded is not None and loaded.tokens is not None
    assert loaded.tokens.access_token.reveal() == ACCESS
    assert loaded.tokens.refresh_token is not None
    assert loaded.tokens.refresh_token.reveal() == REFRESH
    raw = store.path_for("scanner").read_bytes()
    assert ACCESS.encode() not in raw and REFRESH.encode() not in raw and b"scanner" not in raw
    assert stat.S_IMODE(store.path_for("scanner").stat().st_mode) == 0o600
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700


def test_missing_record_is_none(tmp_path: Path) -> None:
    store = TokenStore.open(tmp_path, fresh_key())
    assert store.load("nobody") is None
    assert store.signature("nobody") is None


def test_a_restarted_process_reads_the_tokens_with_the_same_key(tmp_path: Path) -> None:
    key = fresh_key()
    TokenStore.open(tmp_path, key).update("scanner", lambda _: record())
    again = TokenStore.open(tmp_path, GatewayKey(key.key, "after restart"))
    loaded = again.load("scanner")
    assert loaded is not None and loaded.tokens is not None
    assert loaded.tokens.access_token.reveal() == ACCESS


def test_wrong_key_is_named_as_such(tmp_path: Path) -> None:
    TokenStore.open(tmp_path, fresh_key()).update("scanner", lambda _: record())
    other = TokenStore.open(tmp_path, GatewayKey(new_key(), "$GATEWAY_KEY"))
    with pytest.raises(StoreUnreadable) as info:
        other.load("scanner")
    assert "different gateway key" in info.value.reason
    assert "$GATEWAY_KEY" in info.value.reason
    assert ACCESS not in str(info.value)


@pytest.mark.parametrize("cut", [0, 5, 30, -1])
def test_torn_file_is_a_clear_error(tmp_path: Path, cut: int) -> None:
    store = TokenStore.open(tmp_path, fresh_key())
    store.update("scanner", lambda _: record())
    path = store.path_for("scanner")
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(StoreUnreadable) as info:
        store.load("scanner")
    assert any(w in info.value.reason for w in ("truncated", "corrupt")), info.value.reason


def test_flipped_bit_is_corruption(tmp_path: Path) -> None:
    store = TokenStore.open(tmp_path, fresh_key())
    store.update("scanner", lambda _: record())
    path = store.path_for("scanner")
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(StoreUnreadable, match="authentication failed"):
        store.load("scanner")


def test_garbage_file_is_not_a_token_file(tmp_path: Path) -> None:
    store = TokenStore.open(tmp_path, fresh_key())
    store.path_for("scanner").write_bytes(b"x" * 200)
    with pytest.raises(StoreUnreadable, match="not a gateway token file"):
        store.load("scanner")


def _sealed_document(store: TokenStore, account: str, change: Any) -> None:
    """Write a validly encrypted file whose record was changed by `change`."""
    document = json.loads(record(account).to_json())
    change(document)
    plain = json.dumps(document).encode()
    store.path_for(account).write_bytes(store.seal(account, plain))


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d.update(lineage=7),
        lambda d: d["tokens"].update(expires_at="soon"),
        lambda d: d["tokens"].update(access_token=None),
        lambda d: d.update(state="sleeping"),
        lambda d: d.pop("grant"),
        lambda d: d["tokens"].pop("access_token"),
        lambda d: d.update(junk=[1]),
    ],
    ids=[
        "wrong-type",
        "wrong-nested-type",
        "null-token",
        "unknown-state",
        "missing",
        "missing-nested",
        "extra",
    ],
)
def test_a_damaged_record_is_corrupt_content(tmp_path: Path, change: Any) -> None:
    store = TokenStore.open(tmp_path, fresh_key())
    _sealed_document(store, "scanner", change)
    with pytest.raises(StoreUnreadable) as info:
        store.load("scanner")
    assert info.value.reason == "corrupt: unreadable content"
    assert ACCESS not in str(info.value) and REFRESH not in str(info.value)


def test_a_record_without_optional_fields_takes_their_defaults(tmp_path: Path) -> None:
    store = TokenStore.open(tmp_path, fresh_key())

    def change(document: dict[str, Any]) -> None:
        for key in ("state", "last_refresh", "last_error", "last_error_at"):
            del document[key]
        del document["tokens"]["refresh_token"]
        del document["tokens"]["scope"]

    _sealed_document(store, "scanner", change)
    loaded = store.load("scanner")
    assert loaded is not None and loaded.state == "ok" and loaded.last_error is None
    assert loaded.tokens is not None and loaded.tokens.refresh_token is None
    assert loaded.tokens.access_token == Secret(ACCESS) and loaded.tokens.scope == ""


def test_a_record_round_trips(tmp_path: Path) -> None:
    store = TokenStore.open(tmp_path, fresh_key())
    saved = record().failed("needs_reauth", "invalid_grant", 2000.0)
    store.update("scanner", lambda _: saved)
    assert store.load("scanner") == saved


def test_file_copied_to_another_account_is_refused(tmp_path: Path) -> None:
    store = TokenStore.open(tmp_path, fresh_key())
    store.update("scanner", lambda _: record())
    store.path_for("printer").write_bytes(store.path_for("scanner").read_bytes())
    with pytest.raises(StoreUnreadable, match="corrupt"):
        store.load("printer")


def test_unreadable_file_is_not_overwritten_by_a_refresh(tmp_path: Path) -> None:
    store = TokenStore.open(tmp_path, fresh_key())
    store.path_for("scanner").write_bytes(b"torn")
    with pytest.raises(StoreUnreadable):
        store.update("scanner", lambda current: record())
    assert store.path_for("scanner").read_bytes() == b"torn"
    # ...but an admin's new authorisation replaces it.
    store.update("scanner", lambda current: record(), replace_unreadable=True)
    assert store.load("scanner") is not None


def test_readable_token_file_refused_at_open(tmp_path: Path) -> None:
    key = fresh_key()
    store = TokenStore.open(tmp_path, key)
    store.update("scanner", lambda _: record())
    store.path_for("scanner").chmod(0o640)
    with pytest.raises(TokenStoreError, match="must be 0600"):
        TokenStore.open(tmp_path, key)


def test_state_dir_writable_by_others_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    with pytest.raises(Exception, match="writable by others"):
        TokenStore.open(state, fresh_key())


def test_update_rereads_what_another_process_wrote(tmp_path: Path) -> None:
    key = fresh_key()
    cli = TokenStore.open(tmp_path, key)
    gateway = TokenStore.open(tmp_path, key)
    old = record(now=1.0)
    gateway.update("scanner", lambda _: old)
    new = record(now=2.0)  # the admin re-authorised: a new lineage
    cli.update("scanner", lambda _: new)
    seen: list[TokenRecord | None] = []

    def refresh(current: TokenRecord | None) -> TokenRecord | None:
        seen.append(current)
        return current

    gateway.update("scanner", refresh)
    assert seen[0] is not None and seen[0].lineage == new.lineage


def test_names_that_are_not_file_names(tmp_path: Path) -> None:
    store = TokenStore.open(tmp_path, fresh_key())
    for name in ("../evil", ".hidden", "ünïcode", "a/b"):
        store.update(name, lambda _, name=name: record(name))
        path = store.path_for(name)
        assert path.parent == store.directory and not path.name.startswith(".")
        loaded = store.load(name)
        assert loaded is not None and loaded.account == name
    assert set(store.accounts_on_disk()) == {"../evil", ".hidden", "ünïcode", "a/b"}


def test_no_temp_files_left_behind(tmp_path: Path) -> None:
    store = TokenStore.open(tmp_path, fresh_key())
    for n in range(5):
        store.update("scanner", lambda _, n=n: record(now=float(n)))
    names = sorted(os.listdir(store.directory))
    assert names == [".lock", "scanner.token"]


def test_revoked_record_keeps_no_tokens(tmp_path: Path) -> None:
    store = TokenStore.open(tmp_path, fresh_key())
    store.update("scanner", lambda _: record())
    store.update("scanner", lambda current: current.revoked(5.0) if current else None)
    loaded = store.load("scanner")
    assert loaded is not None and loaded.state == "revoked" and loaded.tokens is None
    assert ACCESS.encode() not in store.path_for("scanner").read_bytes()
