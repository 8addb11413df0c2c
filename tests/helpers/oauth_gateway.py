"""What the real-twistd OAuth2 tests (one gateway, a PostgreSQL-backed one, a
cluster) each needed: the authorization server and a Dovecot that introspects
its tokens as module fixtures, the provider's TOML lines, devices logging in on
poplib (one, or a crowd at once) and the admin's `gateway oauth` command as a
child process. Kept here so that the tests differ only in what they test."""

from __future__ import annotations

import poplib
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import REPO_ROOT, GatewayProcess
from tests.harness.oauth_server import OAuthServerProcess
from tests.helpers.pop3 import crlf, message


def idp_fixture(client_secret: str, **settings: Any) -> Any:
    """A module-scoped fixture: the test authorization server as a child
    process, taking `client_secret` (and `settings`, as OAuthServerProcess)."""

    @pytest.fixture(scope="module")
    def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OAuthServerProcess]:
        base = tmp_path_factory.mktemp("idp")
        with OAuthServerProcess(base, client_secret=client_secret, **settings) as server:
            yield server

    return idp


def introspecting_dovecot(name: str, users: dict[str, str]) -> Any:
    """A module-scoped fixture: a Dovecot with `users` whose oauth2 passdb
    introspects bearer tokens at the module's `idp` fixture."""

    @pytest.fixture(scope="module")
    def oauth_dovecot(
        tmp_path_factory: pytest.TempPathFactory,
        tls_upstream: TLSMaterial,
        idp: OAuthServerProcess,
    ) -> Iterator[Dovecot]:
        with Dovecot(
            tmp_path_factory.mktemp(name),
            users,
            tls=tls_upstream,
            oauth2_introspection_url=f"{idp.url}/introspect",
        ) as server:
            yield server

    return oauth_dovecot


def secret_file(base: Path, secret: str) -> Path:
    """The OAuth client secret in a file only its owner reads, as the gateway wants it."""
    path = base / "client-secret"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def oauth_provider(
    name: str,
    idp: OAuthServerProcess,
    dovecot: Dovecot,
    upstream: TLSMaterial,
    secret: Path,
    *extra: str,
    authorization_url: bool = True,
) -> list[str]:
    """A `[providers.NAME]` table: POP3 at `dovecot` (implicit TLS), OAuth2 at
    `idp` with the device grant (and the code grant unless told not to)."""
    code_grant = f'authorization_url = "{idp.url}/authorize", ' if authorization_url else ""
    return [
        f"[providers.{name}]",
        f'pop3 = {{ host = "localhost", port = {dovecot.pop3s_port}, tls = "implicit" }}',
        f'ca_file = "{upstream.ca_file}"',
        *extra,
        f'oauth = {{ token_url = "{idp.url}/token", '
        f'device_authorization_url = "{idp.url}/device", {code_grant}client_id = "gateway", '
        f'client_secret_file = "{secret}", scopes = ["mail", "offline_access"] }}',
    ]


def oauth_account(name: str, provider: str, username: str, grant: str | None = None) -> list[str]:
    """An `[accounts.NAME]` table signing in to `provider` with OAuth2."""
    lines = f'provider = "{provider}"\nusername = "{username}"\nauth = "oauth2"'
    if grant is not None:
        lines += f'\ngrant = "{grant}"'
    return [f"[accounts.{name}]", lines]


def pop3_login(port: int, ctx: ssl.SSLContext, device: str) -> poplib.POP3_SSL:
    """`device` logged in at the gateway with its local password ("DEVICE-pw")."""
    client = poplib.POP3_SSL("localhost", port, context=ctx, timeout=30)
    client.user(device)
    client.pass_(f"{device}-pw")
    return client


def deliver_one(dovecot: Dovecot, user: str = "alice") -> bytes:
    """A message delivered to `user`, as a POP3 RETR gives it back."""
    dovecot.deliver(user, message(1))
    return crlf(dovecot.messages(user)[0])


def retrieve_all(client: poplib.POP3_SSL) -> list[bytes]:
    count, _ = client.stat()
    return [b"\r\n".join(client.retr(i)[1]) + b"\r\n" for i in range(1, count + 1)]


class Crowd:
    """Devices logging in at once (they meet at a barrier first), each in a
    thread: `session` runs on each logged-in client before it quits. Every
    answer is "ok" or the gateway's refusal."""

    def __init__(
        self,
        port: int,
        ctx: ssl.SSLContext,
        devices: list[str],
        session: Callable[[poplib.POP3_SSL], object] = lambda _client: None,
    ) -> None:
        self.port = port
        self.ctx = ctx
        self.session = session
        self.answers: list[str] = []
        self._barrier = threading.Barrier(len(devices))
        self._threads = [threading.Thread(target=self._one, args=(d,)) for d in devices]

    def _one(self, device: str) -> None:
        self._barrier.wait()
        try:
            client = pop3_login(self.port, self.ctx, device)
            self.session(client)
            self.answers.append("ok")
            client.quit()
        except poplib.error_proto as e:
            self.answers.append(e.args[0].decode())

    def start(self) -> Crowd:
        for thread in self._threads:
            thread.start()
        return self

    def join(self, timeout: float = 60) -> list[str]:
        for thread in self._threads:
            thread.join(timeout)
        return self.answers


@contextmanager
def running_gateway(base: Path, text: str, port: int) -> Iterator[dict[str, Any]]:
    """A twistd gateway with configuration `text` in `base`, listening on
    `port`, as the tests pass it around: the process, its port, state
    directory and base directory."""
    gateway = GatewayProcess(base, text, [port])
    gateway.start()
    try:
        yield {"gateway": gateway, "port": port, "state": base / "state", "base": base}
    finally:
        gateway.stop()


def gateway_command(
    config: Path, *args: str, stdin: int = subprocess.DEVNULL
) -> subprocess.Popen[str]:
    """The admin's `gateway --config CONFIG ARGS...`, as a child process."""
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=stdin,
        text=True,
        cwd=REPO_ROOT,
    )


def authorize_on_the_command_line(
    config: Path, idp: OAuthServerProcess, account: str, username: str = "alice"
) -> tuple[str, str, str]:
    """`gateway oauth authorize ACCOUNT` with the device grant, the admin
    signing in as `username` with the code it prints; it must succeed.
    Returns what it printed up to the code, what it printed after, its stderr."""
    process = gateway_command(config, "oauth", "authorize", account)
    assert process.stdout is not None
    seen = ""
    while "enter the code" not in seen:
        line = process.stdout.readline()
        assert line, process.communicate()[1]
        seen += line
    user_code = seen.split("enter the code")[1].split()[0]
    idp.control("approve", user_code=user_code, username=username)
    out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    return seen, out, err
