"""Worker processes sharing the embedded state: real twistd parents with
three workers on one port, against the session Dovecot."""

from __future__ import annotations

import poplib
import ssl
from pathlib import Path

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.helpers.pop3 import device
from tests.helpers.waiting import wait_until
from tests.integration.test_workers import (
    config_text,
    pids_that_logged,
    wait_for_workers,
)

pytestmark = pytest.mark.integration


# -- locks -----------------------------------------------------------------------------


def test_in_use_holds_across_workers(
    tmp_path: Path,
    clean_mailboxes: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
) -> None:
    """One device holds alice's mailbox in one worker; logins of another device
    of alice's account get [IN-USE] in every worker (seen from >= 2 pids)."""
    port = free_port()
    text = config_text(
        tmp_path / "state",
        port,
        clean_mailboxes,
        tls_upstream,
        tls_gateway,
        workers=3,
        extra=(device("copier", "alice"),),
    )
    ctx = ssl.create_default_context(cafile=str(tls_gateway.ca_file))
    with GatewayProcess(tmp_path / "gw", text, [port]) as gateway:
        workers = wait_for_workers(gateway, 3)
        holder = poplib.POP3_SSL("localhost", port, context=ctx, timeout=20)
        holder.user("printer")
        holder.pass_("printer-pw")
        try:

            def refused_once() -> set[int]:
                client = poplib.POP3_SSL("localhost", port, context=ctx, timeout=20)
                try:
                    client.user("copier")
                    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
                        client.pass_("copier-pw")
                finally:
                    client.quit()
                return pids_that_logged(gateway.log_text(), "account alice is in use")

            refusing = wait_until(
                refused_once,
                60,
                lambda pids: f"[IN-USE] only from {pids} of {workers}",
                done=lambda pids: len(pids) >= 2,
            )
            assert refusing <= set(workers.values())
        finally:
            holder.quit()
        # Released at QUIT: the other device gets in, whichever worker it meets.
        for _ in range(6):
            client = poplib.POP3_SSL("localhost", port, context=ctx, timeout=20)
            client.user("copier")
            client.pass_("copier-pw")
            client.quit()
