"""Login penalties in the real twistd gateway, over real sockets: repeated
wrong passwords from 127.0.0.1 slow it, then lock it out with the line the
shipped fail2ban filter matches, while the device logs in from 127.0.0.2
at once."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from tests.harness.certs import TLSMaterial, make_tls_material
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import GatewayProcess
from tests.helpers.log_lines import fail2ban_hosts
from tests.helpers.pop3 import Ports, gateway_config

pytestmark = pytest.mark.integration

# Small numbers so the test is quick; the steps are the defaults' (1 s, then doubling).
PENALTIES = "[penalties]\nlockout_after = 3\nmax_delay = 2\n"


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    dovecot: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    ports: Ports,
) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("gateway-penalties")
    stranger = make_tls_material(base / "stranger")
    text = gateway_config(
        base / "state", ports, dovecot, tls_upstream, tls_gateway, stranger.ca_file
    )
    with GatewayProcess(base, text + "\n" + PENALTIES, [ports.implicit]) as gw:
        yield gw


def login(
    port: int, ctx: ssl.SSLContext, user: str, password: str, source: str
) -> tuple[float, bytes]:
    """(seconds from PASS to its answer, the answer), from address `source`."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=20, source_address=(source, 0))
    with ctx.wrap_socket(raw, server_hostname="localhost") as conn:
        reader = conn.makefile("rb")
        assert reader.readline().startswith(b"+OK")
        conn.sendall(f"USER {user}\r\n".encode())
        assert reader.readline().startswith(b"+OK")
        started = time.monotonic()
        conn.sendall(f"PASS {password}\r\n".encode())
        answer = reader.readline()
        elapsed = time.monotonic() - started
        conn.sendall(b"QUIT\r\n")
        reader.close()
    return elapsed, answer.rstrip(b"\r\n")


def test_wrong_passwords_slow_then_lock_out_the_address_but_not_the_device_elsewhere(
    gateway: GatewayProcess, ports: Ports, ctx: ssl.SSLContext, clean_mailboxes: None
) -> None:
    refused = b"-ERR [AUTH] invalid user name or password"
    guesses = [login(ports.implicit, ctx, "printer", f"guess-{n}", "127.0.0.1") for n in range(3)]
    assert [answer for _, answer in guesses] == [refused] * 3
    # 1 s, then doubled to 2 s (max_delay here).
    assert 1.0 <= guesses[0][0] < 1.9 and 2.0 <= guesses[1][0] and 2.0 <= guesses[2][0]
    log = gateway.wait_for_log("login lockout for 127.0.0.1: 3 failed logins")
    lockout = next(line for line in log.splitlines() if "login lockout" in line)
    assert "[gateway.penalties#warn] login lockout for 127.0.0.1: " in lockout
    assert fail2ban_hosts([lockout]) == ["127.0.0.1"]

    # Locked: the right password is refused like the wrong ones.
    _, answer = login(ports.implicit, ctx, "printer", "printer-pw", "127.0.0.1")
    assert answer == refused
    gateway.wait_for_log("from 127.0.0.1: address locked out")

    # The device from another address: in at once.
    elapsed, answer = login(ports.implicit, ctx, "printer", "printer-pw", "127.0.0.2")
    assert answer.startswith(b"+OK maildrop has") and elapsed < 0.9
    hosts = fail2ban_hosts(gateway.log_text().splitlines())
    assert set(hosts) == {"127.0.0.1"} and len(hosts) == 5  # 4 refusals and the lockout
