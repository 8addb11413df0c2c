"""The real POP3 client programs devices embed (curl, mpop, fetchmail), run
against a gateway listener: each returns what it downloaded, and the tests
compare that with what the upstream held. poplib clients for the same
listeners are here too, as a fixture body."""

from __future__ import annotations

import os
import poplib
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEVICE = "printer"
DEVICE_PASSWORD = "printer-pw"

Connect = Callable[..., poplib.POP3_SSL]


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(args, capture_output=True, timeout=60, **kwargs)
    assert result.returncode == 0, (args[0], result.returncode, result.stderr.decode())
    return result


def curl(url: str, ca: Path, *extra: str) -> bytes:
    """curl's output for `url`, logged in as the printer device."""
    return run(
        [
            "curl",
            "-sS",
            "--max-time",
            "30",
            url,
            "-u",
            f"{DEVICE}:{DEVICE_PASSWORD}",
            "--cacert",
            str(ca),
            *extra,
        ]
    ).stdout


def mpop_download(port: int, ca: Path, work: Path) -> list[bytes]:
    """The messages mpop delivers (to a Maildir under `work`) from a STARTTLS
    listener, deleting them upstream."""
    maildir = work / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    run(
        [
            "mpop",
            "--quiet",
            "--host=localhost",
            f"--port={port}",
            "--tls=on",
            "--tls-starttls=on",
            f"--tls-trust-file={ca}",
            "--auth=user",
            f"--user={DEVICE}",
            f"--passwordeval=echo {DEVICE_PASSWORD}",
            f"--delivery=maildir,{maildir}",
            f"--uidls-file={work / 'uidls'}",
            "--keep=off",
            "--only-new=off",
        ]
    )
    return [p.read_bytes() for p in (maildir / "new").iterdir()]


def fetchmail_download(port: int, ca: Path, work: Path) -> list[bytes]:
    """The messages fetchmail hands its MDA (one file each under `work`) from an
    implicit-TLS listener, deleting them upstream."""
    out = work / "delivered"
    out.mkdir()
    rc = work / "fetchmailrc"
    rc.write_text(
        f"poll localhost protocol POP3 port {port} auth password\n"
        f'  user "{DEVICE}" there with password "{DEVICE_PASSWORD}" is "root" here\n'
        f'  ssl sslcertck sslcertfile "{ca}"\n'
        f"  mda \"/bin/sh -c 'cat > {out}/$$'\"\n"
    )
    rc.chmod(0o600)
    env = dict(os.environ, FETCHMAILHOME=str(work), HOME=str(work))
    result = subprocess.run(
        ["fetchmail", "-f", str(rc), "--nodetach", "--all", "--nokeep", "--nosyslog"],
        capture_output=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()
    return [p.read_bytes() for p in out.iterdir()]


def drop(client: poplib.POP3) -> None:
    """Cut the connection the way a crashing device does (poplib's makefile
    would keep the socket open after a plain close())."""
    try:
        client.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    client.sock.close()
    client.file.close()


@contextmanager
def logged_in_clients(port: int, ctx: ssl.SSLContext, timeout: float) -> Iterator[Connect]:
    """`connect(device)`: a poplib client on an implicit-TLS listener, logged in
    as `device` with its password `<device>-pw` (not logged in for None); every
    client still open at the end is cut."""
    clients: list[poplib.POP3_SSL] = []

    def connect(device: str | None = DEVICE) -> poplib.POP3_SSL:
        client = poplib.POP3_SSL("localhost", port, context=ctx, timeout=timeout)
        clients.append(client)
        if device is not None:
            client.user(device)
            client.pass_(f"{device}-pw")
        return client

    yield connect
    for client in clients:
        if client.sock is not None:  # None after QUIT
            drop(client)
