"""An SMTP sink that stores what arrives: the far end of relay tests and benchmarks.

Dovecot's submission service relays to a `submission_relay_host`; this sink is
that host. It runs aiosmtpd (in a thread, or as its own process with
``python -m tests.harness.smtp_sink``) and writes every message to a
directory as ``NNNNNN.eml`` (the bytes exactly as received, dot-stuffing
removed) plus ``NNNNNN.json`` (the envelope), the JSON last, so a reader never
sees half a message. Because it stores files, tests can read what arrived from
another process, and the sink survives the gateway being killed.

With `users` it also requires AUTH (PLAIN/LOGIN), which makes it a small
submission server of its own: the implicit-TLS (465) upstream of some tests.

Two things a stock aiosmtpd does not do and the tests need:

- Dovecot submission sends ``MAIL FROM:<x> AUTH=user`` (RFC 4954 section 5),
  which stock aiosmtpd refuses with 555; the sink accepts and records it.
- Failures on demand: `refuse` maps a recipient to the reply its RCPT gets
  (a 5xx for the bounce tests, a 4xx for retries), and `refuse_data` makes the
  end of DATA fail, so tests can make the real upstream refuse things.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import ssl
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.harness.gateway_process import free_port
from tests.helpers.waiting import wait_until

# Large enough for the 1 MiB benchmark messages and then some.
DATA_SIZE_LIMIT = 256 * 1024 * 1024


@dataclass(frozen=True)
class Received:
    """One stored message."""

    mail_from: str
    mail_options: tuple[str, ...]
    rcpt_tos: tuple[str, ...]
    content: bytes
    path: Path


class _SinkSMTP(SMTP):
    """aiosmtpd's server, accepting the MAIL parameter AUTH= (RFC 4954 section 5)."""

    def _getparams(self, params: Any) -> dict[str, str | bool] | None:
        result = super()._getparams(params)
        if result is not None:
            result.pop("AUTH", None)
        return result


class _Handler:
    def __init__(self, sink: SMTPSink) -> None:
        self._sink = sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self._sink.refuse.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self._sink.refuse_data is not None:
            return self._sink.refuse_data
        self._sink.store(envelope)
        return "250 2.0.0 stored"


class SMTPSink:
    """aiosmtpd on 127.0.0.1, storing messages under `directory`.

    `tls` with `implicit=True` makes it an SMTPS (465-style) server; with
    `implicit=False` it offers STARTTLS. Without `tls` it is plain SMTP, which
    is what Dovecot's relay connection uses.
    """

    def __init__(
        self,
        directory: Path,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        implicit: bool = False,
        users: dict[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.refuse: dict[str, str] = {}
        self.refuse_data: str | None = None
        self._lock = threading.Lock()
        existing = [int(p.stem) for p in self.directory.glob("*.json") if p.stem.isdigit()]
        self._numbers = itertools.count(max(existing, default=0) + 1)
        self.port = port or free_port()
        kwargs: dict[str, Any] = {
            "hostname": host,
            "port": self.port,
            "server_hostname": "sink.test",
            "decode_data": False,
            "data_size_limit": DATA_SIZE_LIMIT,
            "enable_SMTPUTF8": False,
        }
        if users is not None:
            # A submission server of its own (the 465 upstream of some tests).
            kwargs["authenticator"] = _Authenticator(users)
            kwargs["auth_require_tls"] = False
            kwargs["auth_required"] = True
        if tls is not None and implicit:
            kwargs["ssl_context"] = tls
        elif tls is not None:
            kwargs["tls_context"] = tls
            kwargs["require_starttls"] = False
        self._controller = _SinkController(_Handler(self), **kwargs)

    def start(self) -> SMTPSink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> SMTPSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- storage -----------------------------------------------------------

    def store(self, envelope: Envelope) -> None:
        with self._lock:
            number = next(self._numbers)
        stem = self.directory / f"{number:06d}"
        content = envelope.original_content or b""
        eml = stem.with_suffix(".eml")
        eml.write_bytes(content)
        meta = {
            "mail_from": envelope.mail_from,
            "mail_options": list(envelope.mail_options),
            "rcpt_tos": list(envelope.rcpt_tos),
            "received": time.time(),
        }
        tmp = stem.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, stem.with_suffix(".json"))

    def messages(self) -> list[Received]:
        return read_messages(self.directory)

    def clear(self) -> None:
        for path in self.directory.iterdir():
            path.unlink()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least `count` messages arrived; return them all."""
        return wait_for_messages(self.directory, count, timeout)


class _Authenticator:
    def __init__(self, users: dict[str, str]) -> None:
        self._users = users

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = data.login.decode(), data.password.decode()
        ok = self._users.get(login) == password
        return AuthResult(success=ok, handled=False, auth_data=login if ok else None)


class _SinkController(Controller):
    def factory(self) -> SMTP:
        with warnings.catch_warnings():
            # "AUTH without requiring TLS": the 465 role has TLS from the start,
            # which aiosmtpd's check does not see.
            warnings.simplefilter("ignore", UserWarning)
            return _SinkSMTP(self.handler, **self.SMTP_kwargs)


def read_messages(directory: Path) -> list[Received]:
    """Every complete message stored under `directory`, in arrival order."""
    found = []
    for meta_path in sorted(Path(directory).glob("*.json")):
        meta = json.loads(meta_path.read_text())
        eml = meta_path.with_suffix(".eml")
        found.append(
            Received(
                mail_from=meta["mail_from"],
                mail_options=tuple(meta["mail_options"]),
                rcpt_tos=tuple(meta["rcpt_tos"]),
                content=eml.read_bytes(),
                path=eml,
            )
        )
    return found


def wait_for_messages(directory: Path, count: int, timeout: float = 10.0) -> list[Received]:
    return wait_until(
        lambda: read_messages(directory),
        timeout,
        lambda found: f"{len(found)} of {count} messages arrived in {directory}",
        done=lambda found: len(found) >= count,
        interval=0.02,
    )


def main() -> None:
    """Run a sink as its own process (benchmarks): prints the port, runs until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--discard", action="store_true", help="accept but do not store")
    args = parser.parse_args()
    sink = SMTPSink(args.dir, port=args.port)
    if args.discard:
        sink.store = lambda envelope: None  # type: ignore[method-assign]
    sink.start()
    print(sink.port, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    sink.stop()


if __name__ == "__main__":
    main()
