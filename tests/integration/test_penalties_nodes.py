"""Login penalties across two real twistd gateway nodes sharing PostgreSQL:
guesses spread over the nodes are counted once, and an address locked out on
one node is refused on the other about a second later."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.penalties.shared import REFRESH
from tests.harness.certs import TLSMaterial, make_tls_material
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import GatewayProcess
from tests.harness.postgres import PostgresCluster
from tests.helpers.pop3 import Ports, gateway_config
from tests.helpers.state import state_toml
from tests.helpers.waiting import wait_until
from tests.integration.test_penalties_gateway import login

pytestmark = pytest.mark.integration

PENALTIES = "[penalties]\nlockout_after = 3\nmax_delay = 2\n"
REFUSED = b"-ERR [AUTH] invalid user name or password"


@pytest.fixture
def nodes(
    tmp_path: Path,
    dovecot: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    state_dsn: str,
) -> Iterator[tuple[tuple[GatewayProcess, Ports], tuple[GatewayProcess, Ports]]]:
    stranger = make_tls_material(tmp_path / "stranger")
    made = []
    for name in ("a", "b"):
        ports = Ports()
        text = gateway_config(
            tmp_path / name / "state", ports, dovecot, tls_upstream, tls_gateway, stranger.ca_file
        )
        text += "\n" + PENALTIES + "\n" + state_toml(state_dsn, node=f"node-{name}")
        made.append((GatewayProcess(tmp_path / name, text, [ports.implicit]), ports))
    for gateway, _ in made:
        gateway.start()
    try:
        for gateway, _ in made:
            gateway.wait_for_log("state backend postgresql: schema version", timeout=20)
        yield made[0], made[1]
    finally:
        for gateway, _ in made:
            gateway.stop()


def test_guesses_over_two_nodes_lock_the_address_out_on_both(
    nodes: tuple[tuple[GatewayProcess, Ports], tuple[GatewayProcess, Ports]],
    ctx: ssl.SSLContext,
    postgres: PostgresCluster,
    state_dsn: str,
    clean_mailboxes: None,
) -> None:
    (a, a_ports), (b, b_ports) = nodes
    # Two guesses on a, then one on b: b counts a's two (its pause doubled)
    # and its own guess is the third, which locks the address out.
    first = [login(a_ports.implicit, ctx, "printer", f"guess-{n}", "127.0.0.1") for n in (1, 2)]
    assert [answer for _, answer in first] == [REFUSED] * 2

    def failures_shared() -> bool:
        rows = postgres.query(
            state_dsn, "SELECT count(*) FROM gateway_penalty_events WHERE kind = 'failure'"
        )
        return rows == [(2,)]

    wait_until(failures_shared, 5.0, "a's failures never reached the database")
    # b looks at the database every REFRESH seconds: the promise under test.
    time.sleep(REFRESH + 0.5)
    elapsed, answer = login(b_ports.implicit, ctx, "printer", "guess-3", "127.0.0.1")
    assert answer == REFUSED and elapsed >= 2.0  # the pause of a third failure
    b.wait_for_log("login lockout for 127.0.0.1: 3 failed logins")

    # a learns of the lockout within a second or so: the right password is refused there.
    started = time.monotonic()
    while True:
        _, answer = login(a_ports.implicit, ctx, "printer", "printer-pw", "127.0.0.1")
        if answer == REFUSED:
            break
        assert time.monotonic() - started < 3.0, "node a never saw b's lockout"
    a.wait_for_log("from 127.0.0.1: address locked out")
    # Elsewhere the device still logs in at once, on either node.
    for ports in (a_ports, b_ports):
        elapsed, answer = login(ports.implicit, ctx, "printer", "printer-pw", "127.0.0.2")
        assert answer.startswith(b"+OK") and elapsed < 1.0

