"""`make demo`: the whole gateway in front of throwaway local servers.

Starts, all on 127.0.0.1 and under .demo/ in the working tree (nothing
touches /etc):

- a Dovecot with three mailboxes: one served to a device over POP3 with a
  password, one served from its IMAP INBOX, one that logs in with OAuth2
  bearer tokens (Dovecot asks the test authorization server about them);
- the test authorization server (code grant with PKCE, device grant);
- an SMTPS sink standing in for the provider's submission server: the
  gateway's relay delivers there and the demo prints what arrives;
- the gateway (`twistd -n gateway`) with POP3S, POP3+STLS and SMTPS
  listeners and the admin listener with the web console.

It prints how to connect, the console URL and an admin login, then follows
the gateway's log. Ctrl-C stops everything.

`python -m tests.harness.demo --check` brings the same up, drives one
message of each kind through (POP3 password account, IMAP-backed account,
the OAuth2 account after connecting it through the web console's code grant,
and a message through the SMTP relay into the sink), prints "demo check: ok"
and stops: the test suite runs that.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import logging
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from argon2 import PasswordHasher

from tests.harness.certs import TLSMaterial, make_tls_material
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import REPO_ROOT, GatewayProcess
from tests.harness.oauth_process import OAuthServerProcess
from tests.harness.smtp_sink import SMTPSink, read_messages
from tests.helpers.smtp_gateway import SMTPS_USERS, smtps_sink

DEVICE, DEVICE_PASSWORD = "printer", "printer-pw"
IMAP_DEVICE, IMAP_DEVICE_PASSWORD = "copier", "copier-pw"
OAUTH_DEVICE, OAUTH_DEVICE_PASSWORD = "fax", "fax-pw"
SMTP_DEVICE, SMTP_DEVICE_PASSWORD = "scanner", "scanner-pw"
ADMIN, ADMIN_PASSWORD = "admin", "admin-pw"
MAILBOX, MAILBOX_PASSWORD = "demo", "demo-mailbox-pw"
IMAP_MAILBOX, IMAP_PASSWORD = "imapdemo", "imap-mailbox-pw"
# Logs in with tokens only; Dovecot's password is never used by the gateway.
OAUTH_MAILBOX, OAUTH_UNUSED_PASSWORD = "oauthdemo", "unused-oauth-pw"
CLIENT_SECRET = "demo-client-secret"
[(RELAY_USER, RELAY_PASSWORD)] = SMTPS_USERS.items()

DEMO_MESSAGES = [
    b"From: scanner@example.com\nTo: demo@example.com\nSubject: Welcome to the gateway\n\n"
    b"This message sits in a throwaway Dovecot mailbox.\n.A line starting with a dot.\n",
    b"From: alarm@example.com\nTo: demo@example.com\nSubject: Zone 3 armed\n\nArmed at 07:00.\n",
    b"From: printer@example.com\nTo: demo@example.com\nSubject: Toner low\n\nCyan: 5%\n",
]
IMAP_MESSAGE = (
    b"From: boss@example.com\nTo: imapdemo@example.com\nSubject: From an IMAP folder\n\n"
    b"The copier reads this over POP3; the gateway takes it from IMAP.\n"
)
OAUTH_MESSAGE = (
    b"From: it@example.com\nTo: oauthdemo@example.com\nSubject: Fetched with OAuth2\n\n"
    b"The gateway logged in to this mailbox with a bearer token.\n"
)


def config_text(
    base: Path,
    certs: TLSMaterial,
    upstream_ca: Path,
    dovecot: Dovecot,
    idp: OAuthServerProcess,
    sink: SMTPSink,
    args: argparse.Namespace,
) -> str:
    hasher = PasswordHasher()
    secret = base / "client-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    secret.chmod(0o600)

    def device(name: str, password: str, account: str, protocol: str) -> str:
        return (
            f'[devices.{name}]\npassword_hash = "{hasher.hash(password)}"\n'
            f'account = "{account}"\nprotocols = ["{protocol}"]\n'
            'allow_from = ["127.0.0.0/8", "::1/128"]\n'
        )

    pop3 = f'pop3 = {{ host = "localhost", port = {dovecot.pop3s_port}, tls = "implicit" }}'
    return f"""\
# Written by `make demo`; see etc/gateway.example.toml for every key.
state_dir = "{base / "state"}"

[tls]
certificate = "{certs.certificate}"
private_key = "{certs.private_key}"

[[pop3.listen]]
address = "127.0.0.1"
port = {args.pop3s_port}
tls = "implicit"

[[pop3.listen]]
address = "127.0.0.1"
port = {args.pop3_port}
tls = "starttls"

[[smtp.listen]]
address = "127.0.0.1"
port = {args.smtp_port}
tls = "implicit"

[admin]
address = "127.0.0.1"
port = {args.admin_port}

[admin.users.{ADMIN}]
password_hash = "{hasher.hash(ADMIN_PASSWORD)}"

[providers.local-dovecot]
{pop3}
imap = {{ host = "localhost", port = {dovecot.imaps_port}, tls = "implicit" }}
ca_file = "{upstream_ca}"

[providers.local-oauth]
{pop3}
ca_file = "{upstream_ca}"
sasl = "xoauth2"
oauth = {{ token_url = "{idp.url}/token", device_authorization_url = "{idp.url}/device", \
authorization_url = "{idp.url}/authorize", client_id = "gateway", \
client_secret_file = "{secret}", scopes = ["mail", "offline_access"] }}

[providers.local-sink]
smtp = {{ host = "localhost", port = {sink.port}, tls = "implicit" }}
ca_file = "{upstream_ca}"

[accounts.demo]
provider = "local-dovecot"
username = "{MAILBOX}"
password = "{MAILBOX_PASSWORD}"

[accounts.imap-demo]
provider = "local-dovecot"
username = "{IMAP_MAILBOX}"
password = "{IMAP_PASSWORD}"
mailbox = "imap"
on_delete = "keep"

[accounts.oauth-demo]
provider = "local-oauth"
username = "{OAUTH_MAILBOX}"
auth = "oauth2"
grant = "authorization_code"

[accounts.relay]
provider = "local-sink"
username = "{RELAY_USER}"
password = "{RELAY_PASSWORD}"

{device(DEVICE, DEVICE_PASSWORD, "demo", "pop3")}
{device(IMAP_DEVICE, IMAP_DEVICE_PASSWORD, "imap-demo", "pop3")}
{device(OAUTH_DEVICE, OAUTH_DEVICE_PASSWORD, "oauth-demo", "pop3")}
{device(SMTP_DEVICE, SMTP_DEVICE_PASSWORD, "relay", "smtp")}"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.demo")
    parser.add_argument("--dir", type=Path, default=REPO_ROOT / ".demo")
    parser.add_argument("--pop3s-port", type=int, default=1995)
    parser.add_argument("--pop3-port", type=int, default=1110)
    parser.add_argument("--smtp-port", type=int, default=1465)
    parser.add_argument("--admin-port", type=int, default=9925)
    parser.add_argument("--check", action="store_true", help="drive one message of each kind")
    args = parser.parse_args(argv)
    # The sink's aiosmtpd talks about its own settings; the tour has no use for it.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="aiosmtpd")
    warnings.filterwarnings("ignore", message="Session.login_data is deprecated")

    base: Path = args.dir.absolute()
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    upstream_tls = make_tls_material(base / "upstream-tls")
    gateway_tls = make_tls_material(base / "gateway-tls")
    idp = OAuthServerProcess(
        base / "idp", client_secret=CLIENT_SECRET, device_interval=1, consent_user=OAUTH_MAILBOX
    )
    users = {
        MAILBOX: MAILBOX_PASSWORD,
        IMAP_MAILBOX: IMAP_PASSWORD,
        OAUTH_MAILBOX: OAUTH_UNUSED_PASSWORD,
    }
    with idp, smtps_sink(base / "sink", upstream_tls) as sink:
        with Dovecot(
            base / "dovecot",
            users,
            tls=upstream_tls,
            oauth2_introspection_url=f"{idp.url}/introspect",
        ) as dovecot:
            for message in DEMO_MESSAGES:
                dovecot.deliver(MAILBOX, message)
            dovecot.deliver(IMAP_MAILBOX, IMAP_MESSAGE)
            dovecot.deliver(OAUTH_MAILBOX, OAUTH_MESSAGE)
            text = config_text(base, gateway_tls, upstream_tls.ca_file, dovecot, idp, sink, args)
            ports = [args.pop3s_port, args.pop3_port, args.smtp_port, args.admin_port]
            gateway = GatewayProcess(base / "gateway", text, ports)
            gateway.start()
            try:
                print(instructions(base, gateway_tls.ca_file, args, sink), flush=True)
                if args.check:
                    return check(gateway_tls.ca_file, args, sink, gateway)
                return follow(gateway, sink)
            finally:
                gateway.stop()


def follow(gateway: GatewayProcess, sink: SMTPSink) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"Gateway log: {gateway.logfile}  (Ctrl-C stops the demo)\n", flush=True)
    stop = threading.Event()
    watcher = threading.Thread(target=show_arrivals, args=(sink.directory, stop), daemon=True)
    watcher.start()
    tail = subprocess.Popen(["tail", "-n", "+1", "-f", str(gateway.logfile)])
    try:
        assert gateway.process is not None
        gateway.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        tail.terminate()
        tail.wait()
    return 0


def show_arrivals(directory: Path, stop: threading.Event) -> None:
    """Print each message the sink receives, as the provider would get it."""
    seen = 0
    while not stop.wait(0.5):
        arrived = read_messages(directory)
        for message in arrived[seen:]:
            subject = re.search(rb"^Subject: (.*)$", message.content, re.M)
            title = subject.group(1).decode(errors="replace") if subject else "(no subject)"
            print(
                f"\n>>> sink received: {message.mail_from} -> {', '.join(message.rcpt_tos)}: "
                f"{title}\n",
                flush=True,
            )
        seen = len(arrived)


def instructions(base: Path, ca: Path, args: argparse.Namespace, sink: SMTPSink) -> str:
    pop3s, pop3, smtp = args.pop3s_port, args.pop3_port, args.smtp_port
    return f"""
The gateway is running in front of throwaway local servers (files under {base}).

Web console:  http://127.0.0.1:{args.admin_port}/console/
  admin name: {ADMIN}
  password:   {ADMIN_PASSWORD}
  On Accounts, click "Connect mailbox" for oauth-demo: the local authorization
  server signs you in at once and sends the browser back to the console.
  (Or in a terminal: .venv/bin/gateway --config {base}/gateway/gateway.toml \\
     oauth authorize oauth-demo)

Devices (CA certificate: {ca})
  {DEVICE} / {DEVICE_PASSWORD}  POP3, password account "demo" (3 messages)
  {IMAP_DEVICE} / {IMAP_DEVICE_PASSWORD}    POP3, account "imap-demo": an IMAP INBOX
  {OAUTH_DEVICE} / {OAUTH_DEVICE_PASSWORD}          POP3, OAuth2 "oauth-demo" (connect first)
  {SMTP_DEVICE} / {SMTP_DEVICE_PASSWORD}  SMTP, the relay into the sink {sink.directory}

List a mailbox over POP3S and fetch message 1:
  curl pop3s://127.0.0.1:{pop3s}/ -u {DEVICE}:{DEVICE_PASSWORD} --cacert {ca}
  curl pop3s://127.0.0.1:{pop3s}/1 -u {IMAP_DEVICE}:{IMAP_DEVICE_PASSWORD} --cacert {ca}
  curl pop3s://127.0.0.1:{pop3s}/1 -u {OAUTH_DEVICE}:{OAUTH_DEVICE_PASSWORD} --cacert {ca}

Plain POP3 with STLS, the way many printers do it:
  curl pop3://127.0.0.1:{pop3}/ --ssl-reqd -u {DEVICE}:{DEVICE_PASSWORD} --cacert {ca}

Send a message through the relay (the demo prints it when the sink gets it):
  printf 'Subject: scan\\r\\n\\r\\nhello\\r\\n' | curl smtps://127.0.0.1:{smtp} \\
    -u {SMTP_DEVICE}:{SMTP_DEVICE_PASSWORD} --cacert {ca} \\
    --mail-from {RELAY_USER} --mail-rcpt someone@example.org -T -

Talk POP3 by hand:
  openssl s_client -connect 127.0.0.1:{pop3s} -CAfile {ca} -crlf -quiet
  then: USER {DEVICE} / PASS {DEVICE_PASSWORD} / STAT / LIST / RETR 1 / QUIT
"""


# -- --check: one message of each kind ------------------------------------------------


def check(ca: Path, args: argparse.Namespace, sink: SMTPSink, gateway: GatewayProcess) -> int:
    steps = [
        ("pop3 password account", lambda: fetch(ca, args, DEVICE, DEVICE_PASSWORD, b"Welcome")),
        (
            "imap-backed account",
            lambda: fetch(ca, args, IMAP_DEVICE, IMAP_DEVICE_PASSWORD, b"From an IMAP folder"),
        ),
        ("connect oauth-demo in the console", lambda: connect_in_console(args)),
        (
            "oauth2 account",
            lambda: fetch(ca, args, OAUTH_DEVICE, OAUTH_DEVICE_PASSWORD, b"Fetched with OAuth2"),
        ),
        ("smtp relay into the sink", lambda: relay(ca, args, sink)),
    ]
    for title, step in steps:
        problem = step()
        print(f"  {title}: {'ok' if problem is None else 'FAILED ' + problem}", flush=True)
        if problem is not None:
            print("demo check: FAILED; gateway log:\n" + gateway.log_text()[-4000:])
            return 1
    print("demo check: ok", flush=True)
    return 0


def curl(*argv: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", *argv], input=data, capture_output=True, timeout=60, check=False
    )


def fetch(
    ca: Path, args: argparse.Namespace, device: str, password: str, want: bytes
) -> str | None:
    url = f"pop3s://127.0.0.1:{args.pop3s_port}/1"
    result = curl(url, "-u", f"{device}:{password}", "--cacert", str(ca))
    if result.returncode == 0 and want in result.stdout:
        return None
    return result.stderr.decode(errors="replace").strip() or "message 1 is not the expected one"


def connect_in_console(args: argparse.Namespace) -> str | None:
    """Log in to the console and click "Connect mailbox" for oauth-demo, as
    a browser would (cookies kept, redirects followed through the local
    authorization server and back to the console's callback)."""
    base = f"http://127.0.0.1:{args.admin_port}/console"
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
    )

    def page(path: str, form: dict[str, str] | None = None) -> str:
        data = urllib.parse.urlencode(form).encode() if form is not None else None
        with opener.open(base + path, data=data, timeout=30) as answer:
            return str(answer.read().decode())

    def csrf(html: str) -> str:
        found = re.search(r'name="csrf" value="([^"]+)"', html)
        assert found is not None, html
        return found.group(1)

    try:
        login = page("/login")
        overview = page("/login", {"csrf": csrf(login), "name": ADMIN, "password": ADMIN_PASSWORD})
        if "Overview" not in overview:
            return "the console refused the admin login"
        done = page("/accounts/oauth-demo/connect", {"csrf": csrf(overview)})
    except OSError as e:
        return str(e)
    if "connected: tokens stored" not in done:
        return "the sign-in did not finish: " + re.sub(r"<[^>]+>", " ", done)[:500]
    return None


def relay(ca: Path, args: argparse.Namespace, sink: SMTPSink) -> str | None:
    mark = f"demo-{time.time_ns()}"
    message = f"From: {RELAY_USER}\r\nTo: someone@example.org\r\nSubject: {mark}\r\n\r\nhi\r\n"
    result = curl(
        f"smtps://127.0.0.1:{args.smtp_port}",
        "-u",
        f"{SMTP_DEVICE}:{SMTP_DEVICE_PASSWORD}",
        "--cacert",
        str(ca),
        "--mail-from",
        RELAY_USER,
        "--mail-rcpt",
        "someone@example.org",
        "-T",
        "-",
        data=message.encode(),
    )
    if result.returncode != 0:
        return result.stderr.decode(errors="replace").strip()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if any(mark.encode() in m.content for m in read_messages(sink.directory)):
            return None
        time.sleep(0.1)
    return "the message did not reach the sink"


if __name__ == "__main__":
    raise SystemExit(main())
