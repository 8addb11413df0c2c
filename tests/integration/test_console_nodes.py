"""The web console of two real twistd nodes sharing PostgreSQL, over HTTP: a
login on one node holds on the other (as behind HAProxy, where each request
may land on either), and a logout on either ends it on both."""

from __future__ import annotations

import http.client
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.certs import TLSMaterial, make_tls_material
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.harness.postgres import PostgresCluster
from tests.helpers.pop3 import HASHER, Ports, gateway_config
from tests.helpers.state import state_toml

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "console-admin-pw"


class Node:
    def __init__(self, gateway: GatewayProcess, admin_port: int) -> None:
        self.gateway = gateway
        self.admin_port = admin_port

    def request(
        self, method: str, path: str, cookie: str | None = None, form: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], str]:
        """(status, headers in lower case, body); redirects are not followed."""
        connection = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=20)
        headers = {}
        if cookie is not None:
            headers["Cookie"] = f"gateway_console={cookie}"
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            connection.request(method, "/console" + path, body=body, headers=headers)
            response = connection.getresponse()
            text = response.read().decode("utf-8", "replace")
            return response.status, {k.lower(): v for k, v in response.getheaders()}, text
        finally:
            connection.close()


def _cookie(headers: dict[str, str]) -> str:
    found = re.search(r"gateway_console=([^;]+)", headers.get("set-cookie", ""))
    assert found is not None, headers
    return found.group(1)


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None, page
    return found.group(1)


@pytest.fixture
def nodes(
    tmp_path: Path,
    dovecot: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    state_dsn: str,
) -> Iterator[tuple[Node, Node]]:
    stranger = make_tls_material(tmp_path / "stranger")
    made = []
    for name in ("a", "b"):
        ports, admin = Ports(), free_port()
        text = gateway_config(
            tmp_path / name / "state", ports, dovecot, tls_upstream, tls_gateway, stranger.ca_file
        )
        text += (
            f'\n[admin]\naddress = "127.0.0.1"\nport = {admin}\n'
            f'[admin.users.root]\npassword_hash = "{HASHER.hash(ADMIN_PASSWORD)}"\n'
        )
        text += "\n" + state_toml(state_dsn, node=f"node-{name}")
        made.append(Node(GatewayProcess(tmp_path / name, text, [ports.implicit, admin]), admin))
    for node in made:
        node.gateway.start()
    try:
        yield made[0], made[1]
    finally:
        for node in made:
            node.gateway.stop()


def test_a_console_login_on_one_node_holds_on_the_other(
    nodes: tuple[Node, Node], postgres: PostgresCluster, state_dsn: str
) -> None:
    a, b = nodes
    status, headers, page = a.request("GET", "/login")
    assert status == 200
    form_cookie, csrf = _cookie(headers), _csrf(page)
    # The form from a, posted to b.
    status, headers, _ = b.request(
        "POST", "/login", form_cookie, {"csrf": csrf, "name": "root", "password": ADMIN_PASSWORD}
    )
    assert status == 303, headers
    cookie = _cookie(headers)
    assert cookie != form_cookie
    # Either node knows the session; neither the form's any more.
    for node in (a, b):
        status, _, page = node.request("GET", "/queue", cookie)
        assert status == 200 and "root" in page
        status, headers, _ = node.request("GET", "/queue", form_cookie)
        assert status == 303 and headers["location"] == "/console/login"
    # The database holds no cookie.
    rows = postgres.query(state_dsn, "SELECT * FROM gateway_console_sessions")
    assert rows and not any(cookie in repr(row) for row in rows)
    # Logout on a ends the session on b.
    status, _, page = a.request("GET", "/queue", cookie)
    status, _, _ = a.request("POST", "/logout", cookie, {"csrf": _csrf(page)})
    assert status == 303
    status, headers, _ = b.request("GET", "/queue", cookie)
    assert status == 303 and headers["location"] == "/console/login"
