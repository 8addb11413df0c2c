"""`gateway queue list|retry|delete`, with and without a gateway holding the spool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.smtp.spool import Envelope, SpoolDir, new_id

T0 = 1_700_000_000.0


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    return path


@pytest.fixture
def spool(tmp_path: Path) -> SpoolDir:
    return SpoolDir(tmp_path / "state" / "spool").prepare()


def add(spool: SpoolDir, sender: str = "dev@scan.example.com") -> str:
    message = b"Subject: x\r\n\r\nbody\r\n"
    entry = spool.add(
        Envelope(
            id=new_id(T0),
            account="scanner",
            device="printer",
            peer="10.0.0.1",
            identified_by="password",
            original_sender=sender,
            sender=sender,
            recipients=("a@example.org", "b@example.org"),
            received=T0,
            size=len(message),
            eight_bit=False,
        ),
        message,
    )
    return entry.id


def run(config: Path, *args: str) -> int:
    return main(["--config", str(config), "queue", *args])


def test_list_empty_and_missing_spool(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config, "list") == 0
    assert "no messages" in capsys.readouterr().out
    assert run(config, "list", "--json") == 0
    assert json.loads(capsys.readouterr().out)["messages"] == []


def test_list_queued_and_dead(
    config: Path, spool: SpoolDir, capsys: pytest.CaptureFixture[str]
) -> None:
    queued = add(spool)
    dead_id = add(spool, sender="other@scan.example.com")
    entry = spool.read(queued)
    assert entry is not None
    entry.state.attempts = 2
    entry.state.next_attempt = 4e9
    entry.state.last_error = "cannot connect to provider corp: connection refused"
    spool.save_state(entry)
    dead = spool.read(dead_id)
    assert dead is not None
    spool.bury(dead, "<a@example.org>: 550 5.1.1 no such user")
    assert run(config, "list") == 0
    out = capsys.readouterr().out
    assert f"{queued}  queued  account scanner  device printer" in out
    assert "<dev@scan.example.com> -> <a@example.org> (+1)" in out
    assert "attempts 2, next try in" in out and "last error: cannot connect" in out
    assert f"{dead_id}  dead" in out and "failed: <a@example.org>: 550 5.1.1" in out
    assert out.rstrip().endswith("1 queued, 1 dead letter(s) in " + str(spool.root))
    assert run(config, "list", "--json") == 0
    listed = {m["id"]: m for m in json.loads(capsys.readouterr().out)["messages"]}
    assert listed[queued]["attempts"] == 2 and listed[queued]["status"] == "queued"
    assert listed[dead_id]["dead_reason"].startswith("<a@example.org>: 550")
    assert listed[dead_id]["next_attempt"] is None


def test_retry_and_delete_without_a_gateway(
    config: Path, spool: SpoolDir, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = add(spool), add(spool)
    entry = spool.read(first)
    assert entry is not None
    spool.bury(entry, "550 nope")
    assert run(config, "retry", first) == 0
    assert "will be tried as soon as the gateway starts" in capsys.readouterr().out
    revived = spool.read(first)
    assert revived is not None and revived.status == "queued"
    assert run(config, "delete", second) == 0
    assert spool.read(second) is None
    assert list(spool.control.iterdir()) == []


def test_retry_and_delete_with_a_running_gateway_leave_requests(
    config: Path, spool: SpoolDir, capsys: pytest.CaptureFixture[str]
) -> None:
    message_id = add(spool)
    spool.lock()  # what a running gateway holds
    try:
        assert run(config, "delete", message_id, "--json") == 0
        assert json.loads(capsys.readouterr().out) == {
            "id": message_id,
            "action": "delete",
            "gateway_running": True,
        }
        assert spool.read(message_id) is not None  # untouched: the gateway does it
        assert spool.requests() == [("delete", message_id)]
    finally:
        spool.unlock()


def test_bad_and_unknown_ids(
    config: Path, spool: SpoolDir, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(config, "retry", "../../etc/passwd") == 1
    assert "is not a queue id" in capsys.readouterr().err
    assert run(config, "delete", "20240101000000-aaaaaaaa") == 1
    assert "no message 20240101000000-aaaaaaaa" in capsys.readouterr().err


def test_unusable_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path / "missing.toml", "list") == 1
    assert "gateway queue: configuration" in capsys.readouterr().err
