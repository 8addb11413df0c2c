"""`make demo`: the gateway in front of a throwaway local Dovecot.

Starts a Dovecot with one mailbox holding a few messages, writes a gateway
configuration for it (one device, one account), runs `twistd -n gateway` in
the foreground and prints how to connect. Ctrl-C stops both. Everything lives
under .demo/ in the working tree; nothing touches /etc.

`python -m tests.harness.demo --check` does the same, fetches the mailbox once
through the gateway with curl, and exits: the test suite runs that.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from argon2 import PasswordHasher

from tests.harness.certs import make_tls_material
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import REPO_ROOT, GatewayProcess

DEVICE, DEVICE_PASSWORD = "printer", "printer-pw"
MAILBOX, MAILBOX_PASSWORD = "demo", "demo-mailbox-pw"

DEMO_MESSAGES = [
    b"From: scanner@example.com\nTo: demo@example.com\nSubject: Welcome to the gateway\n\n"
    b"This message sits in a throwaway Dovecot mailbox.\n.A line starting with a dot.\n",
    b"From: alarm@example.com\nTo: demo@example.com\nSubject: Zone 3 armed\n\nArmed at 07:00.\n",
    b"From: printer@example.com\nTo: demo@example.com\nSubject: Toner low\n\nCyan: 5%\n",
]


def config_text(state: Path, certs, upstream_ca: Path, dovecot: Dovecot, pop3s: int, pop3: int):
    device_hash = PasswordHasher().hash(DEVICE_PASSWORD)
    return f"""\
# Written by `make demo`; see etc/gateway.example.toml for every key.
state_dir = "{state}"

[tls]
certificate = "{certs.certificate}"
private_key = "{certs.private_key}"

[[pop3.listen]]
address = "127.0.0.1"
port = {pop3s}
tls = "implicit"

[[pop3.listen]]
address = "127.0.0.1"
port = {pop3}
tls = "starttls"

[providers.local-dovecot]
pop3 = {{ host = "localhost", port = {dovecot.pop3s_port}, tls = "implicit" }}
ca_file = "{upstream_ca}"

[accounts.demo]
provider = "local-dovecot"
username = "{MAILBOX}"
password = "{MAILBOX_PASSWORD}"

[devices.{DEVICE}]
password_hash = "{device_hash}"
account = "demo"
allow_from = ["127.0.0.0/8", "::1/128"]
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness.demo")
    parser.add_argument("--dir", type=Path, default=REPO_ROOT / ".demo")
    parser.add_argument("--pop3s-port", type=int, default=1995)
    parser.add_argument("--pop3-port", type=int, default=1110)
    parser.add_argument("--check", action="store_true", help="fetch once with curl and exit")
    args = parser.parse_args(argv)

    base: Path = args.dir.absolute()
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    upstream_tls = make_tls_material(base / "upstream-tls")
    gateway_tls = make_tls_material(base / "gateway-tls")
    with Dovecot(base / "dovecot", {MAILBOX: MAILBOX_PASSWORD}, tls=upstream_tls) as dovecot:
        for message in DEMO_MESSAGES:
            dovecot.deliver(MAILBOX, message)
        text = config_text(
            base / "state",
            gateway_tls,
            upstream_tls.ca_file,
            dovecot,
            args.pop3s_port,
            args.pop3_port,
        )
        gateway = GatewayProcess(base / "gateway", text, [args.pop3s_port, args.pop3_port])
        gateway.start()
        try:
            print(instructions(base, gateway_tls.ca_file, args.pop3s_port, args.pop3_port))
            if args.check:
                return check(gateway_tls.ca_file, args.pop3s_port)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            print(f"Gateway log: {gateway.logfile}  (Ctrl-C stops the demo)\n", flush=True)
            follow = subprocess.Popen(["tail", "-n", "+1", "-f", str(gateway.logfile)])
            try:
                assert gateway.process is not None
                gateway.process.wait()
            except KeyboardInterrupt:
                pass
            finally:
                follow.terminate()
        finally:
            gateway.stop()
    return 0


def instructions(base: Path, ca: Path, pop3s: int, pop3: int) -> str:
    return f"""
The gateway is running in front of a throwaway Dovecot (files under {base}).

  device user name: {DEVICE}
  device password:  {DEVICE_PASSWORD}
  CA certificate:   {ca}

List the mailbox over POP3S (implicit TLS) and fetch message 1:
  curl pop3s://127.0.0.1:{pop3s}/ -u {DEVICE}:{DEVICE_PASSWORD} --cacert {ca}
  curl pop3s://127.0.0.1:{pop3s}/1 -u {DEVICE}:{DEVICE_PASSWORD} --cacert {ca}

Plain POP3 with STLS, the way many printers do it:
  curl pop3://127.0.0.1:{pop3}/ --ssl-reqd -u {DEVICE}:{DEVICE_PASSWORD} --cacert {ca}

Talk POP3 by hand:
  openssl s_client -connect 127.0.0.1:{pop3s} -CAfile {ca} -crlf -quiet
  openssl s_client -connect 127.0.0.1:{pop3} -starttls pop3 -CAfile {ca} -crlf -quiet
  then: USER {DEVICE} / PASS {DEVICE_PASSWORD} / STAT / LIST / RETR 1 / QUIT
"""


def check(ca: Path, port: int) -> int:
    result = subprocess.run(
        [
            "curl",
            "-sS",
            f"pop3s://127.0.0.1:{port}/1",
            "-u",
            f"{DEVICE}:{DEVICE_PASSWORD}",
            "--cacert",
            str(ca),
        ],
        capture_output=True,
        timeout=30,
    )
    ok = result.returncode == 0 and b"Welcome to the gateway" in result.stdout
    print("demo check:", "ok" if ok else f"FAILED {result.stderr.decode(errors='replace')}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
