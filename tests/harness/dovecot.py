"""A real, throwaway Dovecot 2.3 on 127.0.0.1 for tests, benchmarks and the demo.

Fakes drift from the servers devices and providers really talk to; this harness
runs the packaged ``dovecot`` binary from a self-contained configuration under
one directory, on free high ports, so tests exercise real POP3/IMAP/submission
behaviour (CRLF sizes, lock errors, dropped sessions) without touching /etc,
/run or the system instance.

As root, Dovecot refuses to run mail processes as uid 0, so the packaged
``dovecot`` user owns the mail and ``dovenull`` runs the login processes. As any
other user, everything runs as that user and nothing is chrooted.

Configuration, log and state stay in ``base_dir``. What unprivileged Dovecot
processes must reach (mail, passwd-file, sockets) goes to ``data_dir``: that is
``base_dir`` itself unless its path is too long for Unix sockets or, as root,
one of its parents is closed to other users. pytest's temporary root is such a
parent: it is mode 0700 and every pytest run resets it to 0700, so granting
access there would break whenever another pytest starts. ``data_dir`` is then a
private directory under the system temp dir, and ``base_dir/mail`` links to it.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.harness.certs import TLSMaterial
from tests.helpers.waiting import wait_until

DOVECOT = shutil.which("dovecot", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/dovecot"
DOVEADM = shutil.which("doveadm", path="/usr/bin:/usr/sbin:/bin:/sbin") or "/usr/bin/doveadm"

# Unix socket paths are limited to 108 bytes and Dovecot puts sockets two
# levels below its base_dir, so a deep pytest tmp_path cannot hold the run dir.
_MAX_RUN_DIR_LEN = 70

# Services whose packaged defaults chroot; chroot needs root.
_CHROOTED_SERVICES = (
    "aggregator",
    "anvil",
    "director",
    "imap-login",
    "imap-urlauth-login",
    "ipc",
    "old-stats",
    "pop3-login",
    "submission-login",
)

# DOVEADM_EX_NOTFOUND (sysexits EX_NOHOST): doveadm kick found no session.
_DOVEADM_EX_NOTFOUND = 68

_GREETINGS = {"pop3": b"+OK", "imap": b"* OK", "smtp": b"220"}


class DovecotError(RuntimeError):
    """Dovecot did not start or a doveadm call failed; the text carries its log."""


@dataclass(frozen=True)
class _Accounts:
    """Which system users the Dovecot processes run as."""

    internal_user: str
    internal_group: str
    login_user: str
    mail_uid: int
    mail_gid: int
    as_root: bool

    @classmethod
    def for_current_user(cls) -> _Accounts:
        if os.geteuid() == 0:
            mail = pwd.getpwnam("dovecot")
            return cls(
                internal_user="dovecot",
                internal_group=grp.getgrgid(mail.pw_gid).gr_name,
                login_user="dovenull",
                mail_uid=mail.pw_uid,
                mail_gid=mail.pw_gid,
                as_root=True,
            )
        me = pwd.getpwuid(os.geteuid())
        return cls(
            internal_user=me.pw_name,
            internal_group=grp.getgrgid(os.getegid()).gr_name,
            login_user=me.pw_name,
            mail_uid=me.pw_uid,
            mail_gid=os.getegid(),
            as_root=False,
        )


class _MaildirClock:
    """Hands out strictly increasing (seconds, microseconds) stamps.

    Dovecot numbers new maildir files by the time in their names, so two
    deliveries within one microsecond must still get distinct, ordered names.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next_stamp(self) -> tuple[int, int]:
        with self._lock:
            now = max(time.time_ns() // 1000, self._last + 1)
            self._last = now
        return divmod(now, 1_000_000)


_clock = _MaildirClock()
_sequence = iter(range(1, 1 << 62))


class Dovecot:
    """One Dovecot instance under ``base_dir``; ports are chosen by ``start()``.

    Dovecot treats a client whose address equals the listening address as
    "secured" and then allows USER/PASS before STLS. Clients on loopback come
    from 127.0.0.1, so listening on ``host="127.0.0.2"`` (with a certificate for
    that name) makes Dovecot refuse plaintext logins like a real provider.

    ``real_auth_delays=False`` (the default) removes Dovecot's failure delays so
    a test with a wrong password costs milliseconds rather than seconds; keep at
    least one test with ``True`` so the gateway is proven against the real ones.
    """

    def __init__(
        self,
        base_dir: Path,
        users: Mapping[str, str],
        *,
        tls: TLSMaterial,
        pop3_lock_session: bool = False,
        real_auth_delays: bool = False,
        oauth2_introspection_url: str | None = None,
        submission_relay_port: int | None = None,
        startup_timeout: float = 10.0,
        host: str = "127.0.0.1",
    ) -> None:
        for name, password in users.items():
            _check_passwd_field(name)
            _check_passwd_field(password)
        self.host = host
        self.base_dir = Path(base_dir).absolute()
        self.users = dict(users)
        self.tls = tls
        self.pop3_lock_session = pop3_lock_session
        self.real_auth_delays = real_auth_delays
        self.oauth2_introspection_url = oauth2_introspection_url
        self.submission_relay_port = submission_relay_port
        self.startup_timeout = startup_timeout
        self.config_file = self.base_dir / "dovecot.conf"
        self.log_file = self.base_dir / "dovecot.log"
        self._data_dir: Path | None = None
        self.pop3_port: int | None = None
        self.pop3s_port: int | None = None
        self.imap_port: int | None = None
        self.imaps_port: int | None = None
        self.submission_port: int | None = None
        self._accounts = _Accounts.for_current_user()
        self._process: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Dovecot:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Dovecot:
        """Start and block until every listener greets, like a client would see it.

        A port being open is not enough: login processes accept before the
        auth process is up. Ports are picked just before starting, so another
        process can steal one; that case is retried with fresh ports.
        """
        if self.running:
            return self
        attempts = 3
        for attempt in range(attempts):
            try:
                self._start_once()
                return self
            except DovecotError:
                stolen = "Address already in use" in self._startup_output()
                self.stop()
                if not stolen or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Terminate Dovecot and every session; safe to call twice.

        SIGTERM goes to the whole process group (Dovecot runs in its own
        session): every process then shuts down gracefully at once, where the
        master alone takes about a second to reap its children.
        """
        process, self._process = self._process, None
        if process is not None:
            atexit.unregister(self.stop)
            _terminate_group(process)

    def _start_once(self) -> None:
        self._prepare_directories()
        self._choose_ports()
        self.config_file.write_text(self.render_config())
        with (self.base_dir / "dovecot.stderr").open("wb") as stderr:
            self._process = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=subprocess.STDOUT,
                # Keep a terminal's Ctrl-C for the test runner, which then
                # stops Dovecot in order through stop().
                start_new_session=True,
            )
        atexit.register(self.stop)
        self._wait_for_greetings()

    # -- configuration -----------------------------------------------------

    def render_config(self) -> str:
        """The complete dovecot.conf; public so a failing test can print it."""
        assert self.pop3_port is not None
        acc = self._accounts
        protocols = "pop3 imap" + (" submission" if self.submission_relay_port else "")
        lines = [
            "# Written by tests.harness.dovecot; rewritten at every start.",
            f"instance_name = gateway-test-{os.getpid()}-{id(self):x}",
            f"base_dir = {self.run_dir}",
            f"state_dir = {self.base_dir / 'state'}",
            f"log_path = {self.log_file}",
            f"info_log_path = {self.log_file}",
            f"listen = {self.host}",
            f"protocols = {protocols}",
            "hostname = localhost",
            "login_trusted_networks =",
            "auth_verbose = yes",
            "ssl = yes",
            f"ssl_cert = <{self.tls.certificate}",
            f"ssl_key = <{self.tls.private_key}",
            f"default_internal_user = {acc.internal_user}",
            f"default_internal_group = {acc.internal_group}",
            f"default_login_user = {acc.login_user}",
            f"mail_uid = {acc.mail_uid}",
            f"mail_gid = {acc.mail_gid}",
            f"first_valid_uid = {acc.mail_uid}",
            f"first_valid_gid = {acc.mail_gid}",
            f"mail_location = maildir:{self.mail_dir}/%u",
            f"pop3_lock_session = {'yes' if self.pop3_lock_session else 'no'}",
            f"auth_mechanisms = {self._auth_mechanisms()}",
            *self._passdb_blocks(),
            "userdb {",
            "  driver = passwd-file",
            f"  args = username_format=%u {self._users_file}",
            "}",
            *self._service_blocks(),
        ]
        return "\n".join(lines) + "\n"

    @property
    def data_dir(self) -> Path:
        """Where the unprivileged processes read and write (see the module doc)."""
        if self._data_dir is None:
            self._data_dir = self._choose_data_dir()
        return self._data_dir

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    @property
    def run_dir(self) -> Path:
        """Dovecot's own ``base_dir``: sockets and pid file."""
        return self.data_dir / "run"

    @property
    def _users_file(self) -> Path:
        return self.data_dir / "users"

    @property
    def _oauth2_file(self) -> Path:
        return self.data_dir / "dovecot-oauth2.conf.ext"

    def _auth_mechanisms(self) -> str:
        if self.oauth2_introspection_url:
            return "plain login xoauth2 oauthbearer"
        return "plain login"

    def _passdb_blocks(self) -> list[str]:
        blocks: list[str] = []
        if not self.real_auth_delays:
            # Authenticates nobody; only adds "nodelay" to every request, which
            # removes auth_failure_delay from the answer to a wrong password.
            blocks += [
                "passdb {",
                "  driver = static",
                "  args = nopassword=y noauthenticate=y nodelay=y",
                "}",
            ]
        blocks += [
            "passdb {",
            "  driver = passwd-file",
            f"  args = scheme=PLAIN username_format=%u {self._users_file}",
        ]
        if self.oauth2_introspection_url:
            blocks += [
                "  mechanisms = plain login",
                "}",
                "passdb {",
                "  driver = oauth2",
                "  mechanisms = xoauth2 oauthbearer",
                f"  args = {self._oauth2_file}",
            ]
        blocks.append("}")
        return blocks

    def _service_blocks(self) -> list[str]:
        assert self.pop3_port and self.pop3s_port and self.imap_port and self.imaps_port
        blocks = [
            *_service(
                "pop3-login",
                _listener("pop3", self.pop3_port) + _listener("pop3s", self.pop3s_port, tls=True),
            ),
            *_service(
                "imap-login",
                _listener("imap", self.imap_port) + _listener("imaps", self.imaps_port, tls=True),
            ),
        ]
        if self.submission_relay_port:
            assert self.submission_port
            blocks += [
                "submission_relay_host = 127.0.0.1",
                f"submission_relay_port = {self.submission_relay_port}",
                "submission_relay_ssl = no",
                *_service("submission-login", _listener("submission", self.submission_port)),
            ]
        if not self.real_auth_delays:
            # Without this, every failed login delays every later login from
            # 127.0.0.1 (2, 4, 8, 15 s), successful ones included.
            blocks += _service("anvil", ["unix_listener anvil-auth-penalty {", "  mode = 0", "}"])
        if not self._accounts.as_root:
            for name in _CHROOTED_SERVICES:
                blocks += _service(name, ["chroot ="])
        return blocks

    # -- filesystem --------------------------------------------------------

    def _choose_data_dir(self) -> Path:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self._usable_in_place():
            return self.base_dir
        data_dir = Path(tempfile.mkdtemp(prefix="gateway-dovecot-"))
        data_dir.chmod(0o755)
        # Removed when this object goes away (or at exit), not at stop():
        # the mail must survive a restart.
        weakref.finalize(self, shutil.rmtree, str(data_dir), True)
        link = self.base_dir / "mail"
        if not link.exists() and not link.is_symlink():
            link.symlink_to(data_dir / "mail")
        return data_dir

    def _usable_in_place(self) -> bool:
        if len(str(self.base_dir / "run")) > _MAX_RUN_DIR_LEN:
            return False
        if not self._accounts.as_root:
            return True
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in self.base_dir.parents)

    def _prepare_directories(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        (self.base_dir / "state").mkdir(exist_ok=True)
        self._ensure_mail_dir()
        self._write_users_file()
        if self.oauth2_introspection_url:
            self._write_oauth2_file()
        # Start from an empty run dir: a stale anvil-auth-penalty socket from
        # an earlier run stalls authentication for seconds.
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(mode=0o755)

    def _write_users_file(self) -> None:
        # passwd-file lines: user:password:uid:gid:gecos:home:shell:extra
        text = "".join(f"{user}:{{PLAIN}}{pw}::::::\n" for user, pw in self.users.items())
        self._users_file.write_text(text)
        if self._accounts.as_root:
            # The auth process reads it as the internal user, not as root.
            os.chown(self._users_file, 0, self._accounts.mail_gid)
        self._users_file.chmod(0o640 if self._accounts.as_root else 0o600)

    def _write_oauth2_file(self) -> None:
        self._oauth2_file.write_text(
            "introspection_mode = post\n"
            f"introspection_url = {self.oauth2_introspection_url}\n"
            "username_attribute = username\n"
            "active_attribute = active\n"
            "active_value = true\n"
            "username_format = %u\n"
        )
        if self._accounts.as_root:
            os.chown(self._oauth2_file, 0, self._accounts.mail_gid)
        self._oauth2_file.chmod(0o640 if self._accounts.as_root else 0o600)

    def _give_to_mail_user(self, path: Path, mode: int) -> None:
        if self._accounts.as_root:
            os.chown(path, self._accounts.mail_uid, self._accounts.mail_gid)
        path.chmod(mode)

    def _choose_ports(self) -> None:
        ports = _free_ports(self.host, 5)
        self.pop3_port, self.pop3s_port, self.imap_port, self.imaps_port = ports[:4]
        self.submission_port = ports[4] if self.submission_relay_port else None

    # -- readiness ---------------------------------------------------------

    def _listeners(self) -> list[tuple[int, str, bool]]:
        """(port, protocol, implicit TLS) of every listener that must greet."""
        found = [
            (self.pop3_port, "pop3", False),
            (self.pop3s_port, "pop3", True),
            (self.imap_port, "imap", False),
            (self.imaps_port, "imap", True),
            (self.submission_port, "smtp", False),
        ]
        return [(port, proto, tls) for port, proto, tls in found if port]

    def _wait_for_greetings(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        context = ssl.create_default_context(cafile=str(self.tls.ca_file))
        context.check_hostname = False  # readiness only; the names are the tests' business
        for port, protocol, implicit_tls in self._listeners():
            self._wait_for_greeting(port, protocol, context if implicit_tls else None, deadline)

    def _wait_for_greeting(
        self, port: int, protocol: str, context: ssl.SSLContext | None, deadline: float
    ) -> None:
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise DovecotError(self._failure_text("Dovecot exited during startup"))
            try:
                line = _read_greeting(self.host, port, context)
            except (OSError, ssl.SSLError) as e:
                last_error = e
                time.sleep(0.02)
                continue
            if line.startswith(_GREETINGS[protocol]):
                return
            last_error = ValueError(f"unexpected greeting {line!r}")
            time.sleep(0.02)
        raise DovecotError(
            self._failure_text(f"no {protocol} greeting on port {port}: {last_error!r}")
        )

    def _startup_output(self) -> str:
        stderr = self.base_dir / "dovecot.stderr"
        text = stderr.read_text(errors="replace") if stderr.exists() else ""
        return text + self.log_text()

    def _failure_text(self, headline: str) -> str:
        tail = "\n".join(self._startup_output().splitlines()[-30:])
        return f"{headline}\n--- dovecot output ({self.base_dir}) ---\n{tail}"

    # -- mailboxes ---------------------------------------------------------

    def maildir(self, user: str) -> Path:
        return self.mail_dir / user

    def deliver(self, user: str, message: bytes, *, when: float | None = None) -> Path:
        """Store ``message`` the way an MDA would, and return the file's path.

        Dovecot keeps LF line endings on disk and converts to CRLF on the wire,
        so a test compares ``RETR`` output with the CRLF form. ``when`` (a Unix
        time) back- or forward-dates the arrival, which sets the POP3 order of
        messages Dovecot has not numbered yet.
        """
        self._check_user(user)
        data = message.replace(b"\r\n", b"\n")
        maildir = self._ensure_maildir(user)
        name = _maildir_name(when, len(data))
        staged = maildir / "tmp" / name
        staged.write_bytes(data)
        self._give_to_mail_user(staged, 0o600)
        final = maildir / "new" / name
        # rename() is the maildir protocol: readers never see a partial file.
        staged.rename(final)
        return final

    def message_files(self, user: str) -> list[Path]:
        """The user's message files in the order Dovecot's POP3 LIST numbers them.

        Dovecot numbers messages by UID. Files it has seen carry a UID in
        ``dovecot-uidlist``; files it has not seen get the next UIDs in the
        order of the time stamp in their names (seconds, then the ``M``
        microseconds, then the rest of the name), just as it will assign them.
        """
        maildir = self.maildir(user)
        files = _list_maildir(maildir)
        uids = _read_uidlist(maildir / "dovecot-uidlist")
        known = sorted((base for base in files if base in uids), key=uids.__getitem__)
        unseen = sorted((base for base in files if base not in uids), key=_arrival_key)
        return [files[base] for base in known + unseen]

    def messages(self, user: str) -> list[bytes]:
        """Stored message contents (LF line endings), in POP3 LIST order.

        A session that just ended may still be moving files from new/ to cur/,
        so a file that vanishes between listing and reading restarts the read.
        """
        for _ in range(50):
            try:
                return [path.read_bytes() for path in self.message_files(user)]
            except FileNotFoundError:
                time.sleep(0.01)
        raise DovecotError(f"{user}'s maildir kept changing while being read")

    def clear(self, user: str) -> None:
        """Remove the user's whole maildir, indexes and UID list included, so the
        next test starts from an empty, never-seen mailbox."""
        self._check_user(user)
        shutil.rmtree(self.maildir(user), ignore_errors=True)

    def kick(self, user: str, *, retry_for: float = 0.0) -> bool:
        """Drop the user's live sessions, as a provider's maintenance would.

        Returns False when the user had no session (doveadm exits 68 then).
        A session is known to doveadm only once its mail process has told
        Dovecot's anvil, a moment after the client saw its login succeed: a
        caller that knows a session is open gives `retry_for` seconds, and the
        kick is tried again (every 50 ms) until it finds one.
        """
        deadline = time.monotonic() + retry_for
        while True:
            if self.doveadm("kick", user, ok_codes=(0, _DOVEADM_EX_NOTFOUND)) != "":
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def doveadm(self, *args: str, ok_codes: tuple[int, ...] = (0,)) -> str:
        """Run doveadm against this instance (never the system one); return its output."""
        result = subprocess.run(
            [DOVEADM, "-c", str(self.config_file), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode == _DOVEADM_EX_NOTFOUND and result.returncode in ok_codes:
            return ""
        if result.returncode not in ok_codes:
            raise DovecotError(
                f"doveadm {' '.join(args)} exited {result.returncode}: "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result.stdout

    def log_text(self) -> str:
        """Everything Dovecot logged since the base dir was created."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def session_end(self, user: str, login: str = "", timeout: float = 10) -> str:
        """The log line for the end of the user's latest session (its latest
        login line that also contains `login`, e.g. "imap-login: ")."""
        logins = [
            x for x in self.log_text().splitlines() if login in x and f"Login: user=<{user}>" in x
        ]
        found = re.search(r"session=<([^>]+)>", logins[-1])
        assert found is not None, logins[-1]
        session = found.group(1)

        def end() -> str | None:
            for line in self.log_text().splitlines():
                if f"<{session}>: " in line and "Disconnected" in line:
                    return line
            return None

        line = wait_until(end, timeout, lambda _: self.log_text()[-3000:])
        assert line is not None
        return line

    def _check_user(self, user: str) -> None:
        if user not in self.users:
            raise KeyError(f"{user!r} is not a user of this Dovecot")

    def _ensure_mail_dir(self) -> None:
        if self._accounts.as_root:
            self.data_dir.chmod(0o755)
        if not self.mail_dir.is_dir():
            self.mail_dir.mkdir()
            self._give_to_mail_user(self.mail_dir, 0o750)

    def _ensure_maildir(self, user: str) -> Path:
        self._ensure_mail_dir()
        maildir = self.maildir(user)
        for path in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
            if not path.is_dir():
                path.mkdir(exist_ok=True)
                self._give_to_mail_user(path, 0o700)
        return maildir


def _terminate_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole group, then SIGKILL whatever is left after a moment.

    The children exit within milliseconds of SIGTERM; the master then often
    idles for a further second before exiting, which is not worth waiting for.
    """
    for sig, grace in ((signal.SIGTERM, 0.3), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _service(name: str, body: list[str]) -> list[str]:
    return [f"service {name} {{", *(f"  {line}" for line in body), "}"]


def _listener(name: str, port: int, *, tls: bool = False) -> list[str]:
    return [
        f"inet_listener {name} {{",
        f"  port = {port}",
        f"  ssl = {'yes' if tls else 'no'}",
        "}",
    ]


def _check_passwd_field(value: str) -> None:
    if not value or any(c in value for c in ":\n\r\0"):
        raise ValueError(f"cannot store {value!r} in a passwd-file")


def _free_ports(host: str, count: int) -> list[int]:
    """Distinct free ports: all sockets stay bound until every port is known."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


def _read_greeting(host: str, port: int, context: ssl.SSLContext | None) -> bytes:
    with socket.create_connection((host, port), timeout=1.0) as raw:
        if context is None:
            return raw.makefile("rb").readline()
        with context.wrap_socket(raw) as wrapped:
            return wrapped.makefile("rb").readline()


def _maildir_name(when: float | None, size: int) -> str:
    if when is None:
        secs, usecs = _clock.next_stamp()
    else:
        secs, usecs = divmod(round(when * 1_000_000), 1_000_000)
    return f"{secs}.M{usecs}P{os.getpid()}Q{next(_sequence)}.gateway-test,S={size}"


def _arrival_key(name: str) -> tuple[int, int, str]:
    """Dovecot's maildir_filename_sort_cmp() as a sort key."""
    secs_text, _, rest = name.partition(".")
    unique = rest.split(".", 1)[0]
    usecs = 0
    if "M" in unique:
        digits = unique.split("M", 1)[1]
        digits = digits[: len(digits) - len(digits.lstrip("0123456789"))]
        usecs = int(digits or 0)
    secs = int(secs_text) if secs_text.isdigit() else 0
    return (secs, usecs, rest)


def _list_maildir(maildir: Path) -> dict[str, Path]:
    """Base name (without the ``:2,FLAGS`` part) -> current path of each message.

    new/ is listed before cur/ so a file Dovecot moves in between is seen
    twice rather than missed; the cur/ entry wins.
    """
    files: dict[str, Path] = {}
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(maildir / sub):
                files[entry.name.split(":", 1)[0]] = Path(entry.path)
    return files


def _read_uidlist(path: Path) -> dict[str, int]:
    """Base file name -> UID from a dovecot-uidlist (version 3) file.

    After the header, each line is ``UID [EXT ...] :FILENAME``.
    """
    try:
        lines = path.read_text(errors="replace").splitlines()[1:]
    except FileNotFoundError:
        return {}
    uids: dict[str, int] = {}
    for line in lines:
        head, sep, filename = line.partition(":")
        fields = head.split()
        if sep and fields and fields[0].isdigit():
            uids[filename.split(":", 1)[0]] = int(fields[0])
    return uids
