"""The gateway (real twistd process) in front of a real Dovecot, driven by poplib
and raw sockets the way devices drive it."""

from __future__ import annotations

import poplib
import re
import socket
import ssl
import time

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import REPO_ROOT, GatewayProcess
from tests.helpers.pop3 import Ports, crlf, message
from tests.helpers.pop3_programs import drop

pytestmark = pytest.mark.integration


@pytest.fixture
def pop(gateway: GatewayProcess, ports: Ports, ctx: ssl.SSLContext, clean_mailboxes: None):
    """Connect a poplib client to the gateway's implicit-TLS listener."""
    clients: list[poplib.POP3] = []

    def connect(port: int | None = None) -> poplib.POP3_SSL:
        client = poplib.POP3_SSL("localhost", port or ports.implicit, context=ctx, timeout=20)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        if client.sock is not None:  # None after QUIT
            drop(client)


def direct(dovecot: Dovecot, tls_upstream: TLSMaterial, user: str) -> poplib.POP3_SSL:
    ctx = ssl.create_default_context(cafile=str(tls_upstream.ca_file))
    client = poplib.POP3_SSL("localhost", dovecot.pop3s_port, context=ctx, timeout=10)
    client.user(user)
    client.pass_(f"{user}-pw")
    return client


def test_retrieve_everything_byte_for_byte(pop, dovecot: Dovecot, tls_upstream) -> None:
    for n in range(3):
        dovecot.deliver("alice", message(n))
    stored = [crlf(m) for m in dovecot.messages("alice")]
    upstream = direct(dovecot, tls_upstream, "alice")
    upstream_uidl = upstream.uidl()[1]
    upstream.quit()

    client = pop()
    assert client.user("printer").startswith(b"+OK")
    assert client.pass_("printer-pw").startswith(b"+OK maildrop has 3 messages")
    assert client.stat() == (3, sum(len(m) for m in stored))
    assert client.list()[1] == [f"{i} {len(m)}".encode() for i, m in enumerate(stored, 1)]
    assert client.uidl()[1] == upstream_uidl
    for i, expected in enumerate(stored, 1):
        _, lines, _octets = client.retr(i)
        assert b"\r\n".join(lines) + b"\r\n" == expected
        assert client.list(i).split()[2] == str(len(expected)).encode()
        header, _, body = expected.partition(b"\r\n\r\n")
        _, top_lines, _ = client.top(i, 2)
        first_two = b"\r\n".join(body.split(b"\r\n")[:2])
        assert b"\r\n".join(top_lines) == header + b"\r\n\r\n" + first_two
    client.quit()
    assert len(dovecot.messages("alice")) == 3


def test_long_lines_and_dots_at_chunk_boundaries_pass_exactly(
    pop, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = bytearray()
    for boundary in (4096, 16384, 65536, 131072):
        body += b"x" * (boundary - len(body) - 1) + b"\n.\n..\n"
    body += b"y" * 3_000_000 + b"\n.\n"  # a 3 MB line, then a lone dot line
    dovecot.deliver("alice", b"Subject: long\n\n" + bytes(body))
    (stored,) = [crlf(m) for m in dovecot.messages("alice")]
    monkeypatch.setattr(poplib, "_MAXLINE", 4_000_000)  # poplib's own limit, not ours
    client = pop()
    client.user("printer")
    client.pass_("printer-pw")
    _, lines, _ = client.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == stored
    client.quit()


def test_dele_then_quit_deletes_upstream(pop, dovecot: Dovecot) -> None:
    for n in range(3):
        dovecot.deliver("alice", message(n))
    keep = crlf(dovecot.messages("alice")[1])
    client = pop()
    client.user("printer")
    client.pass_("printer-pw")
    client.dele(1)
    client.dele(3)
    assert client.stat()[0] == 1
    client.quit()
    assert [crlf(m) for m in dovecot.messages("alice")] == [keep]


def test_dele_then_drop_deletes_nothing_and_sends_no_quit(
    pop, dovecot: Dovecot, gateway: GatewayProcess
) -> None:
    for n in range(2):
        dovecot.deliver("alice", message(n))
    client = pop()
    client.user("printer")
    client.pass_("printer-pw")
    client.dele(1)
    client.dele(2)
    drop(client)
    gateway.wait_for_log("outcome=dropped")
    end = upstream_session_end(dovecot, "alice")
    assert len(dovecot.messages("alice")) == 2
    # Dovecot says "Logged out" only when the session ended with QUIT.
    assert "Logged out" not in end and "del=0/2" in end, end


def upstream_session_end(dovecot: Dovecot, user: str, timeout: float = 10) -> str:
    """Dovecot's log line for the end of the user's latest POP3 session."""
    return dovecot.session_end(user, timeout=timeout)


def test_rset_undeletes(pop, dovecot: Dovecot) -> None:
    dovecot.deliver("alice", message(1))
    client = pop()
    client.user("printer")
    client.pass_("printer-pw")
    client.dele(1)
    client.rset()
    client.quit()
    assert len(dovecot.messages("alice")) == 1


def test_second_device_on_the_account_gets_in_use(pop) -> None:
    first = pop()
    first.user("printer")
    first.pass_("printer-pw")
    second = pop()
    second.user("copier")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_("copier-pw")
    first.quit()
    second.user("copier")
    assert second.pass_("copier-pw").startswith(b"+OK")
    second.quit()


def test_wrong_password_unknown_device_and_disallowed_network_look_alike(
    pop, gateway: GatewayProcess
) -> None:
    replies = []
    for name, password in [("printer", "nope"), ("nobody", "x"), ("faraway", "faraway-pw")]:
        client = pop()
        client.user(name)
        with pytest.raises(poplib.error_proto) as failure:
            client.pass_(password)
        replies.append(failure.value.args[0])
    assert replies == [b"-ERR [AUTH] invalid user name or password"] * 3
    log = gateway.wait_for_log("not in allow_from")
    assert "device printer from 127.0.0.1: wrong password" in log
    assert "device nobody from 127.0.0.1: unknown device" in log
    assert "nope" not in log and "faraway-pw" not in log
    # The shipped fail2ban filter finds each refusal and its address.
    hosts = fail2ban_hosts(log)
    assert len(hosts) >= 3 and set(hosts) == {"127.0.0.1"}


def fail2ban_hosts(log: str) -> list[str]:
    """Apply etc/fail2ban/filter.d/gateway.conf's failregex the way fail2ban does."""
    conf = (REPO_ROOT / "etc" / "fail2ban" / "filter.d" / "gateway.conf").read_text()
    failregex = re.search(r"^failregex = (.*)$", conf, re.MULTILINE).group(1)  # type: ignore[union-attr]
    pattern = re.compile(failregex.replace("<HOST>", r"(?P<host>[\w.:-]+)"))
    return [m.group("host") for line in log.splitlines() if (m := pattern.match(line))]


def test_upstream_rejecting_the_account_is_sys_perm(pop, gateway: GatewayProcess) -> None:
    client = pop()
    client.user("misconfigured")
    with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[SYS/PERM\]"):
        client.pass_("misconfigured-pw")
    log = gateway.wait_for_log("UpstreamRejected")
    assert "#error]" in log.split("UpstreamRejected")[0].splitlines()[-1]
    assert "not-alices-password" not in log


def test_upstream_down_is_sys_temp(pop) -> None:
    client = pop()
    client.user("orphan")
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        client.pass_("orphan-pw")


def test_upstream_certificate_from_another_ca_is_refused(pop, gateway, dovecot) -> None:
    dovecot.deliver("alice", message(1))
    client = pop()
    client.user("suspicious")
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        client.pass_("suspicious-pw")
    gateway.wait_for_log("UpstreamUnavailable")


def test_upstream_kicked_mid_retr_drops_the_device(
    gateway: GatewayProcess, ports: Ports, ctx: ssl.SSLContext, dovecot: Dovecot, clean_mailboxes
) -> None:
    big = b"Subject: big\n\n" + (b"y" * 998 + b"\n") * 30_000  # ~30 MB
    dovecot.deliver("alice", big)
    raw = ctx.wrap_socket(
        socket.create_connection(("localhost", ports.implicit)), server_hostname="localhost"
    )
    reader = raw.makefile("rb")
    reader.readline()
    raw.sendall(b"USER printer\r\nPASS printer-pw\r\nRETR 1\r\n")
    assert reader.readline().startswith(b"+OK")
    assert reader.readline().startswith(b"+OK maildrop")
    assert reader.readline().startswith(b"+OK")
    received = reader.read(100_000)  # then stop reading: back-pressure stalls the upstream
    wait_until_stalled(dovecot.pop3s_port)
    dovecot.kick("alice")
    rest = b""
    raw.settimeout(20)
    try:
        while chunk := reader.read(65536):
            rest += chunk
    except (ssl.SSLError, ConnectionError):
        pass
    data = received + rest
    assert len(data) < len(big) * 1.01
    assert not data.endswith(b"\r\n.\r\n")
    gateway.wait_for_log("connection dropped")
    raw.close()


def wait_until_stalled(port: int | None, timeout: float = 10.0) -> None:
    """Until a connection from local `port` has unsent bytes that do not move:
    the upstream is held back because the gateway stopped reading from it."""
    assert port is not None
    deadline = time.monotonic() + timeout
    previous: set[tuple[str, int]] = set()
    while time.monotonic() < deadline:
        queued = set(_send_queues(port))
        if queued & previous:
            return
        previous = queued
        time.sleep(0.1)
    raise AssertionError(f"the upstream on port {port} never stalled: no back-pressure")


def _send_queues(port: int) -> list[tuple[str, int]]:
    """(remote address, bytes queued to send) of each established TCP socket
    on local `port` that has any, from /proc/net/tcp and tcp6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, remote, state, queues = fields[1], fields[2], fields[3], fields[4]
                tx_queue = int(queues.split(":")[0], 16)
                if int(local.rsplit(":", 1)[1], 16) == port and state == "01" and tx_queue:
                    found.append((remote, tx_queue))
    return found


def test_plaintext_listener_refuses_login_before_stls(
    gateway: GatewayProcess, ports: Ports, ctx: ssl.SSLContext, clean_mailboxes
) -> None:
    client = poplib.POP3("127.0.0.1", ports.starttls, timeout=10)
    caps = client.capa()
    assert "STLS" in caps and "USER" not in caps and "SASL" not in caps
    with pytest.raises(poplib.error_proto, match="after STLS"):
        client.user("printer")
    client.stls(context=ctx)
    assert "USER" in client.capa()
    client.user("printer")
    assert client.pass_("printer-pw").startswith(b"+OK maildrop")
    client.quit()


def test_upstream_over_stls_with_user_pass(pop, dovecot: Dovecot) -> None:
    dovecot.deliver("bob", message(7))
    client = pop()
    client.user("scanner")
    assert client.pass_("scanner-pw").startswith(b"+OK maildrop has 1 messages")
    assert b"\r\n".join(client.retr(1)[1]) + b"\r\n" == crlf(dovecot.messages("bob")[0])
    client.quit()


def test_legacy_tls_only_where_the_listener_allows_it(
    gateway: GatewayProcess, ports: Ports, tls_gateway: TLSMaterial, clean_mailboxes
) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(cafile=str(tls_gateway.ca_file))
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1
    try:
        legacy = poplib.POP3_SSL("localhost", ports.legacy, context=old, timeout=10)
    except ssl.SSLError as e:  # this Python's OpenSSL cannot speak TLS 1.0 at all
        pytest.fail(f"client side cannot do TLS 1.0 here: {e}")
    legacy.user("printer")
    legacy.pass_("printer-pw")
    legacy.quit()
    gateway.wait_for_log("tls=TLSv1 ")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        poplib.POP3_SSL("localhost", ports.implicit, context=old, timeout=10)


def test_session_log_line(pop, gateway: GatewayProcess, dovecot: Dovecot) -> None:
    dovecot.deliver("alice", message(1))
    client = pop()
    client.user("copier")
    client.pass_("copier-pw")
    client.list()
    client.retr(1)
    client.dele(1)
    client.quit()
    log = gateway.wait_for_log("retrieved=1 deleted=1")
    line = [x for x in log.splitlines() if "retrieved=1 deleted=1" in x][-1]
    assert "device=copier peer=127.0.0.1 account=alice tls=TLSv1.3 cipher=TLS_" in line
    assert "listed=1 " in line and "outcome=quit" in line and "bytes=" in line
