"""IMAP-backed accounts through the real gateway (twistd child process) in front
of the session Dovecot, driven by poplib, raw sockets and real POP3 clients
(curl, mpop, fetchmail), the way devices drive it."""

from __future__ import annotations

import poplib
import re
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.helpers.imap import crlf, gateway_config_imap, varied_messages
from tests.helpers.pop3_programs import (
    Connect,
    drop,
    fetchmail_download,
    logged_in_clients,
    mpop_download,
    run,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def imap_ports() -> dict[str, int]:
    return {"implicit": free_port(), "starttls": free_port()}


@pytest.fixture(scope="module")
def imap_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    dovecot: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    imap_ports: dict[str, int],
) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("gateway-imap")
    text = gateway_config_imap(base / "state", imap_ports, dovecot, tls_upstream, tls_gateway)
    with GatewayProcess(base, text, list(imap_ports.values())) as gw:
        yield gw


@pytest.fixture
def pop(
    imap_gateway: GatewayProcess,
    imap_ports: dict[str, int],
    ctx: ssl.SSLContext,
    clean_mailboxes: Dovecot,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Connect]:
    """poplib clients logged in as a device on the implicit-TLS listener."""
    # poplib refuses lines over 2048 octets; the long-line messages have more.
    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)
    with logged_in_clients(imap_ports["implicit"], ctx, timeout=20) as connect:
        yield connect


def direct_pop3(
    dovecot: Dovecot, tls_upstream: TLSMaterial, user: str = "alice"
) -> poplib.POP3_SSL:
    ctx = ssl.create_default_context(cafile=str(tls_upstream.ca_file))
    client = poplib.POP3_SSL("localhost", dovecot.pop3s_port, context=ctx, timeout=10)
    client.user(user)
    client.pass_(f"{user}-pw")
    return client


def ids(dovecot: Dovecot, folder: str = "INBOX", user: str = "alice") -> list[str]:
    out = dovecot.doveadm("fetch", "-u", user, "hdr.message-id", "mailbox", folder)
    return [line.split(":", 1)[1].strip() for line in out.splitlines() if ":" in line]


def flags(dovecot: Dovecot, user: str = "alice") -> list[str]:
    out = dovecot.doveadm("fetch", "-u", user, "flags", "mailbox", "INBOX")
    found = [ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("flags:")]
    return [" ".join(f for f in fl if f != "\\Recent") for fl in found]


def fill(dovecot: Dovecot, count: int, user: str = "alice", body_lines: int = 3) -> None:
    for n in range(1, count + 1):
        body = "".join(f"line {i} of {n}\n" for i in range(body_lines))
        dovecot.deliver(user, f"Message-ID: <{n}@x>\nSubject: {n}\n\n.{body}".encode())


def imap_logins(dovecot: Dovecot, user: str) -> list[str]:
    """Dovecot's log lines for the user's IMAP logins, oldest first."""
    return [
        x
        for x in dovecot.log_text().splitlines()
        if "imap-login: " in x and f"Login: user=<{user}>" in x
    ]


def latest_imap_session(dovecot: Dovecot, user: str) -> str:
    """The session id of the user's latest IMAP login."""
    logins = imap_logins(dovecot, user)
    return re.search(r"session=<([^>]+)>", logins[-1]).group(1)  # type: ignore[union-attr]


def imap_session_end(dovecot: Dovecot, user: str, timeout: float = 10) -> str:
    """Dovecot's log line for the end of the user's latest IMAP session."""
    return dovecot.session_end(user, "imap-login: ", timeout)


def test_retr_top_list_uidl_byte_for_byte(
    pop: Connect, clean_mailboxes: Dovecot, tls_upstream: TLSMaterial
) -> None:
    dovecot = clean_mailboxes
    for m in varied_messages():
        dovecot.deliver("alice", m)
    client = pop()
    count, octets = client.stat()
    listing = client.list()[1]
    uidl = client.uidl()[1]
    got = [b"\r\n".join(client.retr(n)[1]) for n in range(1, count + 1)]
    tops = [b"\r\n".join(client.top(n, 2)[1]) for n in range(1, count + 1)]
    assert client.quit().startswith(b"+OK")
    assert flags(dovecot) == [""] * count, "the gateway changed flags (\\Seen?)"

    upstream = direct_pop3(dovecot, tls_upstream)
    assert (count, octets) == upstream.stat()
    assert listing == upstream.list()[1]
    for n in range(1, count + 1):
        assert got[n - 1] == b"\r\n".join(upstream.retr(n)[1]), n
        assert tops[n - 1] == b"\r\n".join(upstream.top(n, 2)[1]), n
    upstream.quit()
    assert len(set(uidl)) == count
    assert [u.split()[0] for u in uidl] == [str(n).encode() for n in range(1, count + 1)]


def test_uidls_stable_across_sessions(pop: Connect, clean_mailboxes: Dovecot) -> None:
    fill(clean_mailboxes, 3)
    first = pop()
    uidls = first.uidl()[1]
    first.quit()
    second = pop("copier")
    assert second.uidl()[1] == uidls
    second.quit()


@pytest.mark.parametrize("device", ["printer", "mover", "keeper"])
def test_dele_then_quit_applies_the_policy(
    pop: Connect, clean_mailboxes: Dovecot, device: str
) -> None:
    dovecot = clean_mailboxes
    fill(dovecot, 3)
    client = pop(device)
    client.retr(1)
    client.dele(1)
    client.dele(3)
    assert client.stat()[0] == 1
    assert client.quit().startswith(b"+OK")
    if device == "printer":  # expunge
        assert ids(dovecot) == ["<2@x>"]
    elif device == "mover":
        assert ids(dovecot) == ["<2@x>"]
        assert ids(dovecot, "Archive") == ["<1@x>", "<3@x>"]
    else:  # keep, with mark_seen
        assert ids(dovecot) == ["<1@x>", "<2@x>", "<3@x>"]
        assert flags(dovecot) == ["\\Seen $POP3Deleted", "", "$POP3Deleted"]
    again = pop(device)
    assert again.stat()[0] == 1
    assert again.retr(1)[1][0] == b"Message-ID: <2@x>"
    again.quit()


@pytest.mark.parametrize("device", ["printer", "mover", "keeper"])
def test_dele_then_drop_changes_nothing(
    pop: Connect, clean_mailboxes: Dovecot, imap_gateway: GatewayProcess, device: str
) -> None:
    dovecot = clean_mailboxes
    fill(dovecot, 2)
    client = pop(device)
    client.retr(1)
    client.dele(1)
    client.dele(2)
    drop(client)
    imap_gateway.wait_for_log(f"device={device} ")
    # The session was read-only: the kept upstream connection goes back to
    # its keeper untouched (neither LOGOUT nor a close), and nothing changed.
    session = latest_imap_session(dovecot, "alice")
    assert not [x for x in dovecot.log_text().splitlines() if f"<{session}>: " in x], session
    assert ids(dovecot) == ["<1@x>", "<2@x>"]
    assert flags(dovecot) == ["", ""]
    assert dovecot.doveadm("mailbox", "list", "-u", "alice").split() == ["INBOX"]
    again = pop(device)
    assert again.stat()[0] == 2
    again.quit()
    assert latest_imap_session(dovecot, "alice") == session, "the next poll logged in again"


def test_message_added_during_a_session_waits_for_the_next(
    pop: Connect, clean_mailboxes: Dovecot
) -> None:
    dovecot = clean_mailboxes
    fill(dovecot, 1)
    client = pop()
    dovecot.deliver("alice", b"Message-ID: <late@x>\n\nlate\n")
    assert client.stat()[0] == 1
    assert len(client.uidl()[1]) == 1
    client.dele(1)
    client.quit()
    client = pop()
    assert client.stat()[0] == 1
    assert client.retr(1)[1][0] == b"Message-ID: <late@x>"
    client.quit()


def test_second_device_on_the_account_gets_in_use(pop: Connect) -> None:
    first = pop()
    second = pop(None)
    second.user("copier")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_("copier-pw")
    first.quit()
    second.user("copier")
    assert second.pass_("copier-pw").startswith(b"+OK")
    second.quit()


def test_starttls_upstream(pop: Connect, clean_mailboxes: Dovecot) -> None:
    fill(clean_mailboxes, 2, user="bob")
    client = pop("scanner")
    assert client.stat()[0] == 2
    assert client.retr(2)[1][0] == b"Message-ID: <2@x>"
    client.quit()


def test_wrong_upstream_password_is_sys_perm_and_logged(
    pop: Connect, imap_gateway: GatewayProcess
) -> None:
    client = pop(None)
    client.user("misconfigured")
    with pytest.raises(poplib.error_proto, match=r"\[SYS/PERM\]") as caught:
        client.pass_("misconfigured-pw")
    assert b"AUTHENTICATIONFAILED" not in caught.value.args[0]
    log = imap_gateway.wait_for_log("UpstreamRejected")
    assert "not-alices-password" not in log


def test_upstream_kicked_mid_retr_drops_the_device(
    imap_gateway: GatewayProcess,
    imap_ports: dict[str, int],
    ctx: ssl.SSLContext,
    clean_mailboxes: Dovecot,
) -> None:
    dovecot = clean_mailboxes
    dovecot.deliver("alice", b"Message-ID: <big@x>\n\n" + b"0123456789abcdef\n" * 2_000_000)
    raw = ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", imap_ports["implicit"]), timeout=20),
        server_hostname="localhost",
    )
    reader = raw.makefile("rb")
    assert reader.readline().startswith(b"+OK")
    raw.sendall(b"USER printer\r\nPASS printer-pw\r\n")
    assert reader.readline().startswith(b"+OK")
    assert reader.readline().startswith(b"+OK")
    raw.sendall(b"RETR 1\r\n")
    assert reader.readline().startswith(b"+OK")
    assert reader.read(1000)  # the message is streaming: now the provider cuts in
    assert dovecot.kick("alice", retry_for=5)
    rest = reader.read()  # until the gateway drops the connection
    raw.close()
    received = 1000 + len(rest)
    assert received < 34_000_000
    assert not rest.endswith(b"\r\n.\r\n")
    imap_gateway.wait_for_log("connection dropped")
    assert len(dovecot.messages("alice")) == 1


# -- real clients -------------------------------------------------------------------------


def stored(dovecot: Dovecot) -> list[bytes]:
    fill(dovecot, 3, body_lines=40)
    return [crlf(m) for m in dovecot.messages("alice")]


def test_curl_lists_and_retrieves(
    imap_gateway: GatewayProcess,
    imap_ports: dict[str, int],
    tls_gateway: TLSMaterial,
    clean_mailboxes: Dovecot,
) -> None:
    expected = stored(clean_mailboxes)
    base = ["curl", "-sS", "--max-time", "30", "-u", "printer:printer-pw"]
    ca = ["--cacert", str(tls_gateway.ca_file)]
    listing = run([*base, *ca, f"pop3s://localhost:{imap_ports['implicit']}/"]).stdout
    assert listing == b"".join(f"{i} {len(m)}\r\n".encode() for i, m in enumerate(expected, 1))
    url = f"pop3://localhost:{imap_ports['starttls']}/2"
    assert run([*base, *ca, "--ssl-reqd", url]).stdout == expected[1]
    run([*base, *ca, "--ssl-reqd", url, "-X", "DELE", "-I"])
    assert ids(clean_mailboxes) == ["<1@x>", "<3@x>"]


def test_mpop_downloads_and_deletes(
    imap_gateway: GatewayProcess,
    imap_ports: dict[str, int],
    tls_gateway: TLSMaterial,
    clean_mailboxes: Dovecot,
    tmp_path: Path,
) -> None:
    expected = stored(clean_mailboxes)
    got = mpop_download(imap_ports["starttls"], tls_gateway.ca_file, tmp_path)
    assert len(got) == len(expected)
    for original in expected:
        assert any(g.endswith(original.replace(b"\r\n", b"\n")) for g in got), original[:80]
    assert ids(clean_mailboxes) == []


def test_fetchmail_downloads_and_deletes(
    imap_gateway: GatewayProcess,
    imap_ports: dict[str, int],
    tls_gateway: TLSMaterial,
    clean_mailboxes: Dovecot,
    tmp_path: Path,
) -> None:
    expected = stored(clean_mailboxes)
    got = fetchmail_download(imap_ports["implicit"], tls_gateway.ca_file, tmp_path)
    assert len(got) == len(expected)
    for original in expected:
        body = original.partition(b"\r\n\r\n")[2].replace(b"\r\n", b"\n")
        assert any(g.endswith(body) for g in got)
    assert ids(clean_mailboxes) == []
