"""The web console's parts without a browser: `[admin.users]` in the config,
admin logins and their penalty, sessions and their idle expiry, the login
window of the overview, and the routes' guards (login redirect, CSRF, no
secret) on twisted.web's own request objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.web import http
from twisted.web.test.requesthelper import DummyRequest

from gateway.admin.console.app import COOKIE, Console, ConsoleState
from gateway.admin.console.auth import AdminLogins, Sessions
from gateway.admin.console.connect import AccountActions
from gateway.admin.metrics import GatewayMetrics, LoginWindow
from gateway.config import ConfigError, load_config
from gateway.devices import DeviceAuthenticator
from gateway.model import AdminUser, Config, PenaltySettings, Secret
from gateway.penalties import MemoryPenaltyBook
from tests.harness.certs import make_tls_material
from tests.helpers.pop3 import HASHER

ADMIN_HASH = HASHER.hash("admin-pw")
CONFIG = f"""\
state_dir = "state"
[tls]
certificate = "tls/cert-chain.pem"
private_key = "tls/key.pem"
[[pop3.listen]]
port = 1995
tls = "implicit"
[providers.up]
pop3 = {{ host = "pop.example.com", port = 995, tls = "implicit" }}
[accounts.a]
provider = "up"
username = "a"
password = "a-pw"
[devices.d]
password_hash = "{HASHER.hash("d-pw")}"
account = "a"
[admin]
"""


def write(tmp_path: Path, text: str) -> Path:
    if not (tmp_path / "tls").exists():
        make_tls_material(tmp_path / "tls")
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def test_admin_users_and_session_idle_in_the_config(tmp_path: Path) -> None:
    text = CONFIG + f'session_idle = 120\n[admin.users.root]\npassword_hash = "{ADMIN_HASH}"\n'
    config = load_config(write(tmp_path, text))
    assert config.admin is not None
    assert config.admin.users == {"root": AdminUser("root", Secret(ADMIN_HASH))}
    assert config.admin.session_idle == 120.0
    assert "admin-pw" not in repr(config) and ADMIN_HASH not in repr(config)


def test_no_admin_users_by_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, CONFIG))
    assert config.admin is not None and config.admin.users == {}
    assert config.admin.session_idle == 1800.0


@pytest.mark.parametrize(
    ("extra", "path", "words"),
    [
        (
            '[admin.users.root]\npassword_hash = "admin-pw"\n',
            "admin.users.root.password_hash",
            "not an argon2 hash",
        ),
        ("[admin.users.root]\n", "admin.users.root.password_hash", "required"),
        (
            f'[admin.users.root]\npassword_hash = "{ADMIN_HASH}"\nrole = "x"\n',
            "admin.users.root.role",
            "unknown key",
        ),
        ("session_idle = 5\n", "admin.session_idle", "between 60 and 86400"),
    ],
)
def test_bad_admin_users_are_reported(tmp_path: Path, extra: str, path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, CONFIG + extra))
    [problem] = info.value.problems
    assert problem.path == path and words in problem.message
    assert "admin-pw" not in str(info.value)


def _logins(clock: Clock, settings: PenaltySettings | None = None) -> AdminLogins:
    def now(f: Any, *args: Any) -> Deferred[Any]:
        return succeed(f(*args))

    book = MemoryPenaltyBook(settings or PenaltySettings(), clock)
    authenticator = DeviceAuthenticator({}, run_in_thread=now, penalties=book, clock=clock)
    return AdminLogins({"root": AdminUser("root", Secret(ADMIN_HASH))}, authenticator, clock)


def attempt(logins: AdminLogins, clock: Clock, password: str, peer: str) -> tuple[float, Any]:
    """How long the answer took on the clock, and the answer."""
    d = Deferred.fromCoroutine(logins.check("root", password, peer))
    waited = 0.0
    while not d.called:
        clock.advance(0.5)
        waited += 0.5
    return waited, d.result


def test_admin_logins_get_the_device_login_penalties() -> None:
    clock = Clock()
    logins = _logins(clock, PenaltySettings(lockout_after=5))
    # Each new wrong password doubles the pause: 1 (the refusal's own), 2, 4 s.
    for n, pause in enumerate((1.0, 2.0, 4.0)):
        assert attempt(logins, clock, f"wrong-{n}", "192.0.2.1") == (pause, None)
    # Another address pays only for its own failures.
    assert attempt(logins, clock, "wrong-x", "192.0.2.2") == (1.0, None)
    # The right password still waits out the address's penalty, then clears it.
    assert attempt(logins, clock, "admin-pw", "192.0.2.1") == (8.0, "root")
    assert attempt(logins, clock, "admin-pw", "192.0.2.1") == (0.0, "root")
    # Enough failures lock the address out: even the right password is refused.
    for n in range(5):
        attempt(logins, clock, f"again-{n}", "192.0.2.1")
    assert attempt(logins, clock, "admin-pw", "192.0.2.1")[1] is None


def test_sessions_expire_when_idle_and_end_on_logout() -> None:
    clock = Clock()
    sessions = Sessions(clock, idle=60)
    session = sessions.new("root")
    clock.advance(59)
    assert sessions.get(session.id) is session
    clock.advance(59)
    assert sessions.get(session.id) is session  # used: the timer restarted
    clock.advance(61)
    assert sessions.get(session.id) is None
    other = sessions.new("root")
    sessions.end(other)
    assert sessions.get(other.id) is None
    assert sessions.get(None) is None and sessions.get("made-up") is None
    assert session.csrf_ok(session.csrf) and not session.csrf_ok("x") and not session.csrf_ok(None)


def test_the_login_window_keeps_one_hour() -> None:
    window = LoginWindow()
    # One-minute buckets: 960 and 1000 share minute 16, 1100 is in minute 18.
    window.add(960.0, "success")
    window.add(1000.0, "wrong_password")
    window.add(1100.0, "success")
    assert window.counts(1100.0) == {"success": 2, "wrong_password": 1}
    assert window.counts(960.0 + 3600.0) == {"success": 1}
    assert window.counts(1100.0 + 3700.0) == {}


# -- the routes, in-process -----------------------------------------------------------


class _Config:
    def __init__(self, config: Config) -> None:
        self.config = config

    def __call__(self) -> Config:
        return self.config


def console(tmp_path: Path) -> tuple[Console, Clock]:
    text = CONFIG + f'[admin.users.root]\npassword_hash = "{ADMIN_HASH}"\n'
    config = load_config(write(tmp_path, text))
    assert config.admin is not None
    clock = Clock()
    metrics = GatewayMetrics(devices=lambda: ["d"], listeners=lambda: [], process=False)
    state = ConsoleState(
        config=_Config(config),
        clock=clock,
        metrics=metrics,
        watches=list,
        spool=None,
        uses_tls=True,
    )
    actions = AccountActions(
        _Config(config),
        reactor=clock,
        clock=clock,
        poster=None,  # type: ignore[arg-type]
        tokens=lambda: None,
        audit=lambda *_: None,
    )
    return Console(state, _logins(clock), Sessions(clock, 1800), actions), clock


class Req(DummyRequest):
    """`DummyRequest` with twisted.web's own cookie handling."""

    addCookie = http.Request.addCookie

    def __init__(self, postpath: list[bytes]) -> None:
        super().__init__(postpath)
        self.cookies: list[bytes] = []
        self.received_cookies: dict[bytes, bytes] = {}

    def getCookie(self, key: bytes) -> bytes | None:
        return self.received_cookies.get(key)


def request(path: bytes, method: bytes = b"GET", **form: str) -> Req:
    r = Req(path.strip(b"/").split(b"/"))
    r.client = IPv4Address("TCP", "127.0.0.1", 50000)
    r.method = method
    r.uri = b"/console/" + path
    r.args = {k.encode(): [v.encode()] for k, v in form.items()}
    return r


def test_pages_need_a_session_and_posts_a_csrf_token(tmp_path: Path) -> None:
    c, _ = console(tmp_path)
    r = request(b"queue")
    c.queue(r)
    assert r.responseCode == 303 and r.responseHeaders.getRawHeaders(b"location") == [
        b"/console/login"
    ]
    r = request(b"queue/20260101000000-abcdef01/delete", b"POST")
    c.queue_action(r, "20260101000000-abcdef01", "delete")
    assert r.responseCode == 403
    session = c.sessions.new("root")
    r = request(b"queue/20260101000000-abcdef01/delete", b"POST", csrf="forged")
    r.received_cookies[COOKIE] = session.id.encode()
    c.queue_action(r, "20260101000000-abcdef01", "delete")
    assert r.responseCode == 403


def test_the_login_cookie_is_secure_httponly_and_samesite_strict(tmp_path: Path) -> None:
    c, _ = console(tmp_path)
    r = request(b"login")
    page = c.login_form(r).decode()
    [cookie] = r.cookies
    assert b"Secure" in cookie and b"HttpOnly" in cookie and b"SameSite=strict" in cookie
    assert b"Path=/console" in cookie
    assert 'name="csrf"' in page and "$argon2" not in page


def test_a_login_with_the_right_password_gets_a_new_session(tmp_path: Path) -> None:
    c, _ = console(tmp_path)
    r = request(b"login")
    c.login_form(r)
    before = r.cookies[0].split(b";")[0].split(b"=", 1)[1].decode()
    session = c.sessions.get(before)
    assert session is not None and session.admin is None
    r = request(b"login", b"POST", csrf=session.csrf, name="root", password="admin-pw")
    r.received_cookies[COOKIE] = before.encode()
    d = Deferred.fromCoroutine(c.login(r))
    assert d.called and r.responseCode == 303
    after = r.cookies[0].split(b";")[0].split(b"=", 1)[1].decode()
    assert after != before and c.sessions.get(before) is None
    new = c.sessions.get(after)
    assert new is not None and new.admin == "root"
