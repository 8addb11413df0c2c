"""The web console in a real browser (headless Chromium driven by Selenium)
against the real twistd gateway: Dovecot behind its POP3 account, an SMTPS
sink behind its relay, the test authorization server behind its OAuth2
accounts. Screenshots of each page land in the test's artifacts directory."""

from __future__ import annotations

import json
import poplib
import re
import smtplib
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium.common.exceptions import StaleElementReferenceException

from gateway.config import load_config
from gateway.oauth.admin import open_store
from tests.harness import browser as chromium
from tests.harness.browser import Browser
from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_config import config_head, listen, provider
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.harness.oauth_server import OAuthServerProcess
from tests.harness.smtp_sink import SMTPSink
from tests.helpers.pop3 import HASHER
from tests.helpers.smtp_gateway import SMTPS_USERS, smtps_sink, wait_for
from tests.helpers.waiting import wait_until

# scripts/ensure-deps.sh installs chromium and chromium-driver: without them
# these tests fail (at the browser fixture) rather than skip.
pytestmark = pytest.mark.integration

ADMIN = "root"
ADMIN_PASSWORD = "console-admin-pw"
CLIENT_SECRET = "console-client-secret-value"
REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "test-artifacts" / "console"


class Ports:
    def __init__(self) -> None:
        self.pop3 = free_port()
        self.smtp = free_port()
        self.admin = free_port()


def config_text(
    base: Path,
    ports: Ports,
    dovecot: Dovecot,
    sink_port: int,
    upstream: TLSMaterial,
    own: TLSMaterial,
    idp: OAuthServerProcess,
) -> str:
    secret = base / "client-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    secret.chmod(0o600)
    [(relay_user, relay_password)] = SMTPS_USERS.items()
    pop3 = f'pop3 = {{ host = "localhost", port = {dovecot.pop3s_port}, tls = "implicit" }}'
    return "\n".join(
        [
            *config_head(base / "state", own),
            "[admin]",
            f'address = "127.0.0.1"\nport = {ports.admin}\nsession_idle = 600',
            f"[admin.users.{ADMIN}]",
            f'password_hash = "{HASHER.hash(ADMIN_PASSWORD)}"',
            *listen("pop3", ports.pop3, "implicit"),
            *listen("smtp", ports.smtp, "implicit"),
            "[oauth]",
            "idle_refresh_interval = 86400",
            "[providers.dovecot]",
            pop3,
            f'ca_file = "{upstream.ca_file}"',
            "timeout = 5",
            "[providers.idp]",
            pop3,
            f'ca_file = "{upstream.ca_file}"',
            "timeout = 5",
            f'oauth = {{ token_url = "{idp.url}/token", '
            f'device_authorization_url = "{idp.url}/device", '
            f'authorization_url = "{idp.url}/authorize", revocation_url = "{idp.url}/revoke", '
            f'client_id = "gateway", client_secret_file = "{secret}", '
            'scopes = ["mail", "offline_access"] }',
            *provider("smtps", "smtp", sink_port, "implicit", upstream.ca_file, timeout=5),
            "[accounts.alice]",
            'provider = "dovecot"\nusername = "alice"\npassword = "alice-pw"',
            "[accounts.coded]",
            'provider = "idp"\nusername = "alice"\nauth = "oauth2"\ngrant = "authorization_code"',
            "[accounts.devcode]",
            'provider = "idp"\nusername = "alice"\nauth = "oauth2"\ngrant = "device_code"',
            "[accounts.relay]",
            f'provider = "smtps"\nusername = "{relay_user}"\npassword = "{relay_password}"',
            "[devices.printer]",
            f'password_hash = "{HASHER.hash("printer-pw")}"',
            'account = "alice"\nprotocols = ["pop3"]\nallow_from = ["127.0.0.0/8"]',
            "[devices.mailer]",
            f'password_hash = "{HASHER.hash("mailer-pw")}"',
            'account = "relay"\nprotocols = ["smtp"]\nallow_from = ["127.0.0.0/8"]',
        ]
    )


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OAuthServerProcess]:
    server = OAuthServerProcess(
        tmp_path_factory.mktemp("console-idp"),
        client_secret=CLIENT_SECRET,
        device_interval=1,
        consent_user="alice",
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory, tls_upstream: TLSMaterial) -> Iterator[SMTPSink]:
    with smtps_sink(tmp_path_factory.mktemp("console-smtps"), tls_upstream) as server:
        yield server


@pytest.fixture(scope="module")
def ports() -> Ports:
    return Ports()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    dovecot: Dovecot,
    sink: SMTPSink,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    idp: OAuthServerProcess,
    ports: Ports,
) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("console-gateway")
    text = config_text(base, ports, dovecot, sink.port, tls_upstream, tls_gateway, idp)
    with GatewayProcess(base, text, [ports.pop3, ports.smtp, ports.admin]) as gw:
        yield gw


@pytest.fixture(scope="module")
def web(gateway: GatewayProcess, ports: Ports) -> Iterator[Browser]:
    with chromium.browser(f"http://127.0.0.1:{ports.admin}", ARTIFACTS) as b:
        yield b


@pytest.fixture
def ctx(tls_gateway: TLSMaterial) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_gateway.ca_file))


# -- helpers -----------------------------------------------------------------------


def log_in(web: Browser, password: str = ADMIN_PASSWORD) -> float:
    web.open("/console/login")
    web.fill({"name": ADMIN, "password": password})
    form = web.find("#login-form")
    started = time.monotonic()
    web.click("#login")
    web.wait_until(lambda: _gone(form), timeout=30)
    took = time.monotonic() - started
    web.remember()
    return took


def _gone(element: Any) -> bool:
    """Whether the page that held `element` was replaced."""
    try:
        element.is_displayed()
    except StaleElementReferenceException:
        return True
    return False


def logged_in(web: Browser) -> None:
    web.open("/console/")
    if web.path.startswith("/console/login"):
        log_in(web)
    assert web.path == "/console/"


# The tokens the console's sign-ins stored, for the no-secret check.
TOKENS_SEEN: list[str] = []


def remember_tokens(gateway: GatewayProcess, account: str) -> None:
    store = open_store(load_config(gateway.config), create_key=False)
    assert store is not None
    record = store.load(account)
    assert record is not None and record.tokens is not None
    TOKENS_SEEN.append(record.tokens.access_token.reveal())
    if record.tokens.refresh_token is not None:
        TOKENS_SEEN.append(record.tokens.refresh_token.reveal())


def gateway_cli(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(gw.config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
    )


def queue_json(gw: GatewayProcess) -> list[dict[str, Any]]:
    result = gateway_cli(gw, "queue", "list", "--json")
    assert result.returncode == 0, result.stderr
    messages: list[dict[str, Any]] = json.loads(result.stdout)["messages"]
    return messages


def submit(port: int, ctx: ssl.SSLContext, recipient: str, mark: bytes) -> None:
    data = (
        b"From: relay@example.com\r\nTo: "
        + recipient.encode()
        + b"\r\nSubject: "
        + mark
        + b"\r\nMessage-ID: <"
        + mark
        + b"@example.com>\r\n\r\nhello\r\n"
    )
    with smtplib.SMTP_SSL("localhost", port, context=ctx, timeout=20) as client:
        client.login("mailer", "mailer-pw")
        client.sendmail("relay@example.com", [recipient], data)


class Session:
    """The browser's console session, for requests a browser would not make."""

    def __init__(self, web: Browser) -> None:
        self.base = web.base_url
        self.cookie = f"gateway_console={web.driver.get_cookie('gateway_console')['value']}"
        web.open("/console/queue")
        found = re.search(r'name="csrf" value="([^"]+)"', web.driver.page_source)
        assert found is not None
        self.csrf = found.group(1)

    def post(self, path: str, fields: dict[str, str], cookie: bool = True) -> int:
        request = urllib.request.Request(
            self.base + path, data=urllib.parse.urlencode(fields).encode(), method="POST"
        )
        if cookie:
            request.add_header("Cookie", self.cookie)
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(request, timeout=30) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as e:
            return e.code

    def connect(self, account: str) -> bool:
        """*Connect mailbox* for a code-grant account, following the redirects
        through the authorization server back to the console's callback."""
        request = urllib.request.Request(
            f"{self.base}/console/accounts/{account}/connect",
            data=urllib.parse.urlencode({"csrf": self.csrf}).encode(),
            method="POST",
        )
        request.add_header("Cookie", self.cookie)
        with urllib.request.urlopen(request, timeout=30) as answer:
            return "connected: tokens stored" in answer.read().decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any) -> None:
        return None


# -- tests -------------------------------------------------------------------------


def test_a_page_without_a_session_goes_to_the_login(web: Browser) -> None:
    web.driver.delete_all_cookies()
    for page in ("/console/", "/console/devices", "/console/accounts", "/console/queue"):
        web.open(page)
        assert web.path == "/console/login"
    web.open("/")
    assert web.path == "/console/login"
    web.screenshot("login")


def test_wrong_password_is_refused_and_slowed_then_the_right_one_works(
    web: Browser, gateway: GatewayProcess
) -> None:
    web.driver.delete_all_cookies()
    took = log_in(web, "not-the-password")
    assert web.path == "/console/login"
    assert "wrong name or password" in web.text("#login-error")
    assert took >= 1.0, took
    took = log_in(web)
    assert web.path == "/console/", web.text()
    assert took < 5.0
    assert "Overview" in web.text("h1")
    log = gateway.wait_for_log(f"console action=login admin={ADMIN} ")
    assert "console action=login-refused" in log
    cookie = web.driver.get_cookie("gateway_console")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"


def test_a_post_without_the_csrf_token_is_refused(web: Browser, gateway: GatewayProcess) -> None:
    logged_in(web)
    session = Session(web)
    assert session.post("/console/accounts/coded/check", {}) == 403
    assert session.post("/console/accounts/coded/check", {"csrf": "forged"}) == 403
    assert session.post("/console/logout", {}) == 403
    # The right token but no session cookie: refused too.
    assert session.post("/console/accounts/coded/check", {"csrf": session.csrf}, False) == 403
    assert "console action=check" not in gateway.log_text()
    # And with both it works (the session is still there).
    assert session.post("/console/accounts/alice/check", {"csrf": session.csrf}) == 303


def test_a_device_appears_after_a_pop3_login(
    web: Browser, ports: Ports, ctx: ssl.SSLContext, clean_mailboxes: Dovecot
) -> None:
    logged_in(web)
    web.open("/console/devices")
    assert "none since the gateway started" in web.text("#device-printer")
    with pytest.raises(poplib.error_proto):
        client = poplib.POP3_SSL("localhost", ports.pop3, context=ctx, timeout=30)
        client.user("printer")
        client.pass_("wrong-pw")
    client = poplib.POP3_SSL("localhost", ports.pop3, context=ctx, timeout=30)
    client.user("printer")
    client.pass_("printer-pw")
    client.stat()
    client.quit()
    row = web.wait_until(
        lambda: (
            "success" in web.text("#device-printer .last-login") and web.text("#device-printer")
        ),
        reload=True,
    )
    assert "127.0.0.1" in row and "pop3" in row and "TLSv1.3" in row
    assert "wrong password" in web.text("#device-printer .refusals")
    web.screenshot("devices")


def test_connect_a_mailbox_with_the_code_grant(
    web: Browser, gateway: GatewayProcess, idp: OAuthServerProcess
) -> None:
    logged_in(web)
    web.open("/console/accounts")
    assert "not_authorized" in web.text("#account-coded .token")
    web.click("#account-coded button.connect")
    # To the authorization server, which consents at once and sends the
    # browser back to the console's callback, which goes on to the accounts.
    web.wait_until(
        lambda: (
            web.path.startswith("/console/accounts") and web.text("#account-coded .state") == "ok"
        ),
        timeout=20,
    )
    assert "connected: tokens stored" in web.text("#account-coded")
    assert idp.count("authorize") >= 1
    gateway.wait_for_log("console action=connected admin=root target=coded")
    status = gateway_cli(gateway, "oauth", "status", "--json")
    [entry] = [a for a in json.loads(status.stdout)["accounts"] if a["account"] == "coded"]
    assert entry["state"] == "ok" and entry["grant"] == "authorization_code"
    remember_tokens(gateway, "coded")
    web.screenshot("accounts-code-grant")


def test_connect_a_mailbox_with_the_device_code(
    web: Browser, gateway: GatewayProcess, idp: OAuthServerProcess
) -> None:
    logged_in(web)
    web.open("/console/accounts")
    web.click("#account-devcode button.connect")
    code = web.wait_until(lambda: web.text("#account-devcode .user-code"), reload=True)
    assert f"{idp.url}/verify" in web.text("#account-devcode")
    web.screenshot("accounts-device-code")
    idp.control("approve", user_code=code, username="alice")  # the admin signs in
    # The page reloads itself (meta refresh) while the console polls.
    web.wait_until(lambda: web.text("#account-devcode .state") == "ok", timeout=20)
    assert "connected: tokens stored" in web.text("#account-devcode")
    remember_tokens(gateway, "devcode")


def test_check_an_account(web: Browser) -> None:
    logged_in(web)
    web.open("/console/accounts")
    web.click("#account-alice button.check-button")
    result = web.wait_until(lambda: web.text("#account-alice .check-result"), reload=True)
    assert result == "check passed", web.text("#account-alice")


def test_retry_a_queued_message_and_delete_a_dead_letter(
    web: Browser, gateway: GatewayProcess, ports: Ports, ctx: ssl.SSLContext, sink: SMTPSink
) -> None:
    logged_in(web)
    later, gone = b"later-" + uuid.uuid4().hex.encode(), b"gone-" + uuid.uuid4().hex.encode()
    sink.refuse["later@example.org"] = "451 4.3.0 try again later"
    sink.refuse["gone@example.org"] = "550 5.1.1 no such user here"
    try:
        submit(ports.smtp, ctx, "later@example.org", later)
        submit(ports.smtp, ctx, "gone@example.org", gone)
        web.open("/console/queue")
        web.wait_until(
            lambda: (
                "try again later" in web.text("#queued-messages")
                and "no such user here" in web.text("#dead-messages")
            ),
            reload=True,
            timeout=20,
        )
    finally:
        sink.refuse.clear()
    web.screenshot("queue")
    [queued] = [m for m in queue_json(gateway) if m["status"] == "queued"]
    [dead] = [m for m in queue_json(gateway) if m["status"] == "dead"]
    assert queued["attempts"] >= 1 and queued["next_attempt"] > time.time()
    web.click(f"#message-{queued['id']} button.retry")
    assert "retry requested" in web.text(".notice")
    [got] = wait_for(sink.directory, b"Subject: " + later, timeout=20)
    assert got.rcpt_tos == ("later@example.org",)
    web.wait_until(lambda: not web.find_all(f"#message-{queued['id']}"), reload=True)
    web.click(f"#message-{dead['id']} button.delete")
    web.wait_until(lambda: not web.find_all(f"#message-{dead['id']}"), reload=True)
    assert dead["id"] not in {m["id"] for m in queue_json(gateway)}
    log = gateway.log_text()
    assert f"console action=queue-retry admin=root target={queued['id']}" in log
    assert f"console action=queue-delete admin=root target={dead['id']}" in log


def test_the_overview(web: Browser) -> None:
    logged_in(web)
    web.open("/console/")
    logins = web.text("#logins")
    assert "success" in logins and "wrong_password" in logins
    assert "pop3-implicit-127.0.0.1" in web.text("#listeners")
    # Both OAuth2 accounts were connected in the console: none needs the admin.
    assert web.text("#attention-none") == "None."
    web.screenshot("overview")


def test_forget_tokens(web: Browser, gateway: GatewayProcess) -> None:
    logged_in(web)
    web.open("/console/accounts")
    web.click("#account-devcode button.forget")
    assert "tokens forgotten (at the provider: revoked)" in web.text(".notice")
    assert web.text("#account-devcode .state") == "revoked"
    web.open("/console/")
    assert "devcode" in web.text("#attention")


def test_no_secret_in_any_page(web: Browser, gateway: GatewayProcess) -> None:
    logged_in(web)
    for page in ("/console/", "/console/devices", "/console/accounts", "/console/queue"):
        web.open(page)
    secrets = [ADMIN_PASSWORD, CLIENT_SECRET, "printer-pw", "mailer-pw", "alice-pw", "relay-pw"]
    assert len(TOKENS_SEEN) >= 4  # access and refresh tokens of both sign-ins
    secrets += TOKENS_SEEN
    assert len(web.pages) > 20
    for html in web.pages:
        assert "$argon2" not in html
        for secret in secrets:
            assert secret not in html


def test_logout(web: Browser) -> None:
    logged_in(web)
    web.click("#logout")
    assert web.path == "/console/login"
    web.open("/console/queue")
    assert web.path == "/console/login"


def test_console_and_cli_at_once_keep_the_store_and_the_spool_whole(
    web: Browser, gateway: GatewayProcess, ports: Ports, ctx: ssl.SSLContext, sink: SMTPSink
) -> None:
    """The console signs an account in and forgets it, and retries and deletes
    queued messages, while `gateway oauth revoke` and `gateway queue` do the
    same to the same account and messages."""
    logged_in(web)
    session = Session(web)
    sink.refuse["race@example.org"] = "451 4.3.0 try again later"
    try:
        for n in range(6):
            submit(ports.smtp, ctx, "race@example.org", f"race-{n}".encode())
        wait_until(
            lambda: len([m for m in queue_json(gateway) if m["attempts"] >= 1]) >= 6,
            20,
            "fewer than 6 messages tried",
            interval=0.2,
        )
        ids = [m["id"] for m in queue_json(gateway)]
        errors: list[str] = []

        def console() -> None:
            for n in range(4):
                for message_id in ids[n % 2 :: 2]:
                    status = session.post(
                        f"/console/queue/{message_id}/retry", {"csrf": session.csrf}
                    )
                    if status != 303:
                        errors.append(f"queue {status}")
                # Connect: to the authorization server and back to the callback.
                if not session.connect("coded"):
                    errors.append("connect did not finish")
                status = session.post("/console/accounts/coded/forget", {"csrf": session.csrf})
                if status != 303:
                    errors.append(f"forget {status}")

        worker = threading.Thread(target=console)
        worker.start()
        for n in range(4):
            for message_id in ids[n % 2 :: 2]:
                gateway_cli(gateway, "queue", "retry", message_id)
            result = gateway_cli(gateway, "oauth", "revoke", "coded")
            assert result.returncode == 0, result.stderr
        worker.join(120)
        assert errors == []
        # The spool is whole: every message still listed, each once, readable.
        listed = queue_json(gateway)
        assert sorted(m["id"] for m in listed) == sorted(ids)
        assert all(m["status"] == "queued" for m in listed)
        # Both delete half of them at once.
        worker = threading.Thread(
            target=lambda: [
                session.post(f"/console/queue/{i}/delete", {"csrf": session.csrf}) for i in ids[::2]
            ]
        )
        worker.start()
        for message_id in ids[:3]:
            gateway_cli(gateway, "queue", "delete", message_id)
        worker.join(60)
        wait_until(
            lambda: (
                {m["id"] for m in queue_json(gateway)} == set(ids) - set(ids[::2]) - set(ids[:3])
            ),
            20,
            lambda _: str(queue_json(gateway)),
            interval=0.2,
        )
    finally:
        sink.refuse.clear()
    # The rest is delivered once the upstream takes it (a retry from the console).
    for message_id in [m["id"] for m in queue_json(gateway)]:
        session.post(f"/console/queue/{message_id}/retry", {"csrf": session.csrf})
    wait_until(
        lambda: not queue_json(gateway), 30, lambda _: str(queue_json(gateway)), interval=0.3
    )
    # The token file is whole and says what the last writer wrote.
    status = gateway_cli(gateway, "oauth", "status", "--json")
    assert status.returncode == 0, status.stderr
    [entry] = [a for a in json.loads(status.stdout)["accounts"] if a["account"] == "coded"]
    assert entry["state"] in ("ok", "revoked")
    assert "Traceback" not in gateway.log_text()
    assert "unreadable" not in gateway.log_text()
