"""The service tree twistd runs, built without starting it: which services, in
which order, and no blocking name lookup while building."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import IServiceCollection
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactor

from gateway.config import load_config
from gateway.service import make_service
from gateway.smtp.service import LocalHostname, SpoolService
from tests.harness.certs import make_tls_material

HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXo"


def write_config(directory: Path) -> Path:
    tls = make_tls_material(directory / "tls", names=["gateway.example"])
    path = directory / "gateway.toml"
    path.write_text(
        f"""\
state_dir = "{directory / "state"}"

[tls]
certificate = "{tls.certificate}"
private_key = "{tls.private_key}"

[[pop3.listen]]
tls = "implicit"
port = 9950

[[smtp.listen]]
tls = "starttls"
port = 5870

[providers.corp]
pop3 = {{ host = "pop.example.com" }}
smtp = {{ host = "smtp.example.com" }}

[accounts.scanner]
provider = "corp"
username = "scanner"
password = "upstream-secret"

[devices.printer]
password_hash = "{HASH}"
account = "scanner"
"""
    )
    return path


def test_the_service_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_lookup(*args: Any) -> str:
        raise AssertionError("a blocking name lookup while building the services")

    monkeypatch.setattr(socket, "getfqdn", no_lookup)
    top = make_service(load_config(write_config(tmp_path)), MemoryReactor())
    assert IServiceCollection.providedBy(top)
    names = [service.name for service in top]
    assert names == [
        "state",  # first: started before, stopped after, what uses it
        "imap-kept-connections",
        "pop3-implicit-0.0.0.0-9950",
        "smtp-hostname",
        "smtp-spool",
        "smtp-starttls-0.0.0.0-5870",
        None,  # ReloadOnHangup
    ]


class Named:
    def __init__(self) -> None:
        self.hostname = socket.gethostname()


def test_local_hostname_renames_once_the_lookup_answers() -> None:
    answer: Deferred[str] = Deferred()
    named = [Named(), Named()]
    service = LocalHostname(lambda: answer, named)
    service.startService()
    assert {n.hostname for n in named} == {socket.gethostname()}
    answer.callback("gateway.example.net")
    assert [n.hostname for n in named] == ["gateway.example.net"] * 2


def test_local_hostname_keeps_the_kernel_name_when_the_lookup_fails() -> None:
    answer: Deferred[str] = Deferred()
    named = [Named()]
    LocalHostname(lambda: answer, named).startService()
    answer.errback(OSError("resolver down"))
    assert named[0].hostname == socket.gethostname()


def test_the_relay_takes_its_connections_keepalive_and_control_interval_from_smtp(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path)
    path.write_text(
        path.read_text().replace(
            "[[smtp.listen]]",
            "[smtp]\nrelay_connections = 1\nrelay_keepalive = 30\ncontrol_interval = 5\n\n"
            "[[smtp.listen]]",
        )
    )
    top = make_service(load_config(path), MemoryReactor())
    spool = top.getServiceNamed("smtp-spool")
    assert isinstance(spool, SpoolService)
    relay = spool.relay
    assert (relay.connections, relay.keepalive, relay.control_interval) == (1, 30.0, 5.0)
