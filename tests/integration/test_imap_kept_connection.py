"""The upstream IMAP connection kept per account, through the real gateway (twistd
child) in front of the session Dovecot: Dovecot's own log counts the logins."""

from __future__ import annotations

import poplib
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.helpers.imap import gateway_config_imap

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def keep_ports() -> dict[str, int]:
    return {"implicit": free_port(), "starttls": free_port()}


@pytest.fixture(scope="module")
def keep_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    dovecot: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    keep_ports: dict[str, int],
) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("gateway-imap-keep")
    text = gateway_config_imap(base / "state", keep_ports, dovecot, tls_upstream, tls_gateway)
    with GatewayProcess(base, text, list(keep_ports.values())) as gw:
        yield gw


Poll = Callable[..., tuple[int, list[bytes]]]


@pytest.fixture
def poll(
    keep_gateway: GatewayProcess,
    keep_ports: dict[str, int],
    ctx: ssl.SSLContext,
    clean_mailboxes: Dovecot,
) -> Iterator[Poll]:
    """One device poll: login, STAT, UIDL, QUIT; returns (count, uidl lines).

    Every test starts with alice's kept connection gone (kicked), so the first
    poll of a test logs in and the rest are counted against it.
    """
    clean_mailboxes.kick("alice")

    def run(device: str = "printer", dele: tuple[int, ...] = ()) -> tuple[int, list[bytes]]:
        client = poplib.POP3_SSL("localhost", keep_ports["implicit"], context=ctx, timeout=20)
        client.user(device)
        client.pass_(f"{device}-pw")
        count = client.stat()[0]
        uidl = client.uidl()[1]
        for n in dele:
            client.dele(n)
        assert client.quit().startswith(b"+OK")
        return count, uidl

    yield run


def logins(dovecot: Dovecot, user: str = "alice") -> int:
    """Dovecot's count of the user's IMAP logins so far."""
    return sum(
        1
        for x in dovecot.log_text().splitlines()
        if "imap-login: " in x and f"Login: user=<{user}>" in x
    )


def fill(dovecot: Dovecot, count: int, start: int = 1) -> None:
    for n in range(start, start + count):
        dovecot.deliver("alice", f"Message-ID: <{n}@x>\nSubject: {n}\n\nbody {n}\n".encode())


def message_ids(dovecot: Dovecot) -> list[str]:
    out = dovecot.doveadm("fetch", "-u", "alice", "hdr.message-id", "mailbox", "INBOX")
    return [line.split(":", 1)[1].strip() for line in out.splitlines() if ":" in line]


def test_twenty_polls_of_an_unchanged_folder_make_one_login(
    poll: Poll, clean_mailboxes: Dovecot, keep_gateway: GatewayProcess
) -> None:
    dovecot = clean_mailboxes
    fill(dovecot, 3)
    before = logins(dovecot)
    results = [poll() for _ in range(20)]
    assert logins(dovecot) - before == 1, dovecot.log_text()[-2000:]
    assert {count for count, _ in results} == {3}
    assert len({tuple(uidl) for _, uidl in results}) == 1
    keep_gateway.wait_for_log("upstream imap login for account alice-imap")


def test_a_message_delivered_between_polls_is_seen_by_the_next(
    poll: Poll, clean_mailboxes: Dovecot
) -> None:
    dovecot = clean_mailboxes
    fill(dovecot, 1)
    assert poll()[0] == 1
    before = logins(dovecot)
    # Delivered right before the device logs in, no pause: the race a cached
    # snapshot would lose (IDLE's EXISTS may not have arrived yet).
    for n in range(2, 12):
        fill(dovecot, 1, start=n)
        count, uidl = poll()
        assert count == n
        assert len(uidl) == n
    assert logins(dovecot) == before


def test_a_message_expunged_by_another_client_is_gone_at_the_next_poll(
    poll: Poll, clean_mailboxes: Dovecot
) -> None:
    dovecot = clean_mailboxes
    fill(dovecot, 3)
    first = poll()[1]
    before = logins(dovecot)
    dovecot.doveadm("expunge", "-u", "alice", "mailbox", "INBOX", "header", "Message-ID", "<2@x>")
    count, uidl = poll()
    assert count == 2
    assert uidl == [b"1 " + first[0].split()[1], b"2 " + first[2].split()[1]]
    assert logins(dovecot) == before


def test_a_message_hidden_by_another_session_is_gone_at_the_next_poll(
    poll: Poll, clean_mailboxes: Dovecot
) -> None:
    """A flag update (`$POP3Deleted` set elsewhere) is a change too."""
    dovecot = clean_mailboxes
    fill(dovecot, 3)
    assert poll()[0] == 3
    dovecot.doveadm(
        "flags", "add", "-u", "alice", "$POP3Deleted", "mailbox", "INBOX", "header",
        "Message-ID", "<1@x>",
    )  # fmt: skip
    assert poll()[0] == 2


def test_a_kicked_kept_connection_reconnects_at_the_next_poll(
    poll: Poll, clean_mailboxes: Dovecot, keep_gateway: GatewayProcess
) -> None:
    dovecot = clean_mailboxes
    fill(dovecot, 2)
    assert poll()[0] == 2
    before = logins(dovecot)
    assert dovecot.kick("alice", retry_for=5)
    fill(dovecot, 1, start=3)
    assert poll()[0] == 3
    assert logins(dovecot) == before + 1
    assert poll()[0] == 3
    assert logins(dovecot) == before + 1


def test_dele_and_quit_on_the_kept_connection_then_the_next_poll(
    poll: Poll, clean_mailboxes: Dovecot
) -> None:
    dovecot = clean_mailboxes
    fill(dovecot, 3)
    before = logins(dovecot)
    assert poll(dele=(1, 3))[0] == 3
    assert message_ids(dovecot) == ["<2@x>"]
    assert poll()[0] == 1
    assert poll("mover", dele=(1,))[0] == 1
    assert message_ids(dovecot) == []
    assert poll()[0] == 0
    # One login for alice-imap; alice-move has a kept connection of its own.
    assert logins(dovecot) - before == 2


def test_without_keep_connection_each_poll_logs_in(
    tmp_path_factory: pytest.TempPathFactory,
    clean_mailboxes: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    ctx: ssl.SSLContext,
) -> None:
    dovecot = clean_mailboxes
    ports = {"implicit": free_port(), "starttls": free_port()}
    base = tmp_path_factory.mktemp("gateway-imap-nokeep")
    text = gateway_config_imap(base / "state", ports, dovecot, tls_upstream, tls_gateway)
    text = text.replace('mailbox = "imap"\n', 'mailbox = "imap"\nkeep_connection = false\n')
    fill(dovecot, 1)
    with GatewayProcess(base, text, list(ports.values())):
        before = logins(dovecot)
        for _ in range(3):
            client = poplib.POP3_SSL("localhost", ports["implicit"], context=ctx, timeout=20)
            client.user("printer")
            client.pass_("printer-pw")
            assert client.stat()[0] == 1
            client.quit()
        assert logins(dovecot) - before == 3


def test_stopping_the_gateway_logs_the_kept_connection_out(
    tmp_path: Path,
    clean_mailboxes: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    ctx: ssl.SSLContext,
) -> None:
    """A stopping gateway sends LOGOUT on the connections it kept, rather than
    leaving the provider a dropped socket."""
    dovecot = clean_mailboxes
    dovecot.kick("alice")
    fill(dovecot, 1)
    ports = {"implicit": free_port(), "starttls": free_port()}
    text = gateway_config_imap(tmp_path / "state", ports, dovecot, tls_upstream, tls_gateway)
    gateway = GatewayProcess(tmp_path, text, list(ports.values()))
    gateway.start()
    try:
        client = poplib.POP3_SSL("localhost", ports["implicit"], context=ctx, timeout=20)
        client.user("printer")
        client.pass_("printer-pw")
        assert client.stat()[0] == 1
        client.quit()
        logged_out = sum(
            "imap(alice)" in x and "Logged out" in x for x in dovecot.log_text().splitlines()
        )
    finally:
        gateway.stop()
    lines = dovecot.log_text().splitlines()
    assert sum("imap(alice)" in x and "Logged out" in x for x in lines) == logged_out + 1
