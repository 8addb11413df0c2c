"""SIGHUP re-reads the whole configuration of a running gateway (real twistd
process in front of the session Dovecot): devices added, removed and changed
take effect for the next login, an open session finishes, a broken file
changes nothing and the log lists its problems."""

from __future__ import annotations

import poplib
import signal
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_config import config_head, listen, provider
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.helpers.pop3 import HASHER, crlf, device, message
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.integration


def config_text(
    state: Path,
    port: int,
    dovecot: Dovecot,
    upstream: TLSMaterial,
    own: TLSMaterial,
    devices: list[str],
) -> str:
    return "\n".join(
        [
            *config_head(state, own),
            *listen("pop3", port, "implicit"),
            *provider(
                "dovecot", "pop3", dovecot.pop3s_port, "implicit", upstream.ca_file, timeout=5
            ),
            "[accounts.alice]",
            'provider = "dovecot"\nusername = "alice"\npassword = "alice-pw"',
            "[accounts.bob]",
            'provider = "dovecot"\nusername = "bob"\npassword = "bob-pw"',
            *devices,
        ]
    )


def hang_up(gateway: GatewayProcess, needle: str, timeout: float = 10.0) -> str:
    """SIGHUP, then wait for one more log line containing `needle`."""
    assert gateway.process is not None
    seen = gateway.log_text().count(needle)
    gateway.process.send_signal(signal.SIGHUP)
    return wait_until(
        gateway.log_text,
        timeout,
        lambda text: f"no new {needle!r} in the gateway log:\n{text[-3000:]}",
        done=lambda text: text.count(needle) > seen,
    )


Connect = Callable[[int], poplib.POP3_SSL]


@pytest.fixture
def connect(tls_gateway: TLSMaterial) -> Iterator[Connect]:
    ctx = ssl.create_default_context(cafile=str(tls_gateway.ca_file))
    clients: list[poplib.POP3_SSL] = []

    def open_client(port: int) -> poplib.POP3_SSL:
        client = poplib.POP3_SSL("localhost", port, context=ctx, timeout=20)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        if client.sock is not None:
            client.close()


def test_sighup_applies_devices_and_refuses_a_broken_file(
    tmp_path: Path,
    clean_mailboxes: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    connect: Connect,
) -> None:
    dovecot = clean_mailboxes
    dovecot.deliver("alice", message(1))
    stored = crlf(dovecot.messages("alice")[0])
    port = free_port()

    def text(devices: list[str]) -> str:
        return config_text(tmp_path / "state", port, dovecot, tls_upstream, tls_gateway, devices)

    def logs_in(name: str, password: str) -> bool:
        client = connect(port)
        try:
            client.user(name)
            client.pass_(password)
        except poplib.error_proto:
            client.quit()
            return False
        client.quit()
        return True

    keeper, doomed, changer = (
        device("keeper", "alice"),
        device("doomed", "bob"),
        device("changer", "bob"),
    )
    changed = (
        f'[devices.changer]\npassword_hash = "{HASHER.hash("changer-new-pw")}"\n'
        'account = "bob"\nallow_from = ["127.0.0.0/8"]\n'
    )
    with GatewayProcess(tmp_path / "gw", text([keeper, doomed, changer]), [port]) as gateway:
        # Both logged in once, so the authenticator remembers their passwords.
        assert logs_in("doomed", "doomed-pw") and logs_in("changer", "changer-pw")
        assert not logs_in("newcomer", "newcomer-pw")
        session = connect(port)
        session.user("keeper")
        assert session.pass_("keeper-pw").startswith(b"+OK maildrop has 1 message")

        gateway.config.write_text(text([keeper, changed, device("newcomer", "bob")]))
        log = hang_up(gateway, "config reloaded from")
        assert (
            f"config reloaded from {gateway.config}: devices +newcomer -doomed ~changer; "
            "accounts unchanged; providers unchanged"
        ) in log

        assert logs_in("newcomer", "newcomer-pw")
        assert not logs_in("doomed", "doomed-pw")
        assert not logs_in("changer", "changer-pw")
        assert logs_in("changer", "changer-new-pw")

        # The session opened before the reload carries on to its end.
        _, lines, _ = session.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" == stored
        assert session.quit().startswith(b"+OK")

        broken = text([keeper, changed, '[devices.ghost]\naccount = "nobody"\n'])
        gateway.config.write_text(broken)
        hang_up(gateway, "refused, the running config stays: 2 problems")
        gateway.wait_for_log("devices.ghost.password_hash: required key is missing")
        gateway.wait_for_log("devices.ghost.account: unknown account 'nobody'")
        # Still the previous file: the newcomer (absent from the broken one) logs in.
        assert logs_in("newcomer", "newcomer-pw")
        assert not logs_in("doomed", "doomed-pw")
        assert gateway.process is not None and gateway.process.poll() is None
