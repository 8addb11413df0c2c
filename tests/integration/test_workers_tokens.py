"""Worker processes share the embedded token store: 30 devices of one OAuth2
account log in at once through three workers with an expired token; one
refresh is made at the authorization server, and every worker uses it.

Runs the fixtures of tests/integration/test_oauth_gateway.py (the test
authorization server, Dovecot introspecting its tokens)."""

from __future__ import annotations

import poplib
import ssl
import threading
from pathlib import Path

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.harness.oauth_server import OAuthServerProcess
from tests.integration import test_oauth_gateway as oauth
from tests.integration.test_oauth_gateway import idp, oauth_dovecot  # noqa: F401 - fixtures
from tests.integration.test_workers import WORKER_LINE, wait_for_workers

pytestmark = pytest.mark.integration


def test_thirty_logins_expired_token_one_refresh_across_workers(
    tmp_path: Path,
    oauth_dovecot: Dovecot,  # noqa: F811 - the fixture imported above
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    idp: OAuthServerProcess,  # noqa: F811 - the fixture imported above
) -> None:
    port = free_port()
    base = tmp_path / "gw"
    base.mkdir()
    text = "workers = 3\n" + oauth.config_text(
        base,
        port,
        oauth_dovecot,
        tls_upstream,
        tls_gateway,
        idp,
    )
    ctx = ssl.create_default_context(cafile=str(tls_gateway.ca_file))
    with GatewayProcess(base, text, [port]) as gateway:
        workers = wait_for_workers(gateway, 3)
        oauth.authorize_directly(base / "state", idp, expired=True)
        idp.control("reset_counts")
        oauth.deliver_one(oauth_dovecot)
        answers: list[str] = []
        barrier = threading.Barrier(30)

        def login(n: int) -> None:
            barrier.wait()
            try:
                oauth.device_login(port, ctx, f"crowd{n:02d}").quit()
                answers.append("ok")
            except poplib.error_proto as e:
                answers.append(e.args[0].decode())

        threads = [threading.Thread(target=login, args=(n,)) for n in range(30)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(answers) == 30 and "ok" in answers
        assert all(a == "ok" or a.startswith("-ERR [IN-USE]") for a in answers), answers
        # The logins met more than one worker, and one refresh was made in all.
        logged = {
            int(m.group(3))
            for m in WORKER_LINE.finditer(gateway.log_text())
            if "crowd" in m.group(4)
        }
        assert len(logged) >= 2, (logged, workers)
        assert idp.count(oauth.REFRESH) == 1
        # Every later login, in any worker, uses the refreshed token.
        for _ in range(6):
            oauth.device_login(port, ctx).quit()
        assert idp.count(oauth.REFRESH) == 1
