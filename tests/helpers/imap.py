"""Shared by the IMAP-backed maildrop tests: providers and accounts on the session
Dovecot, messages that exercise the wire form, and an oracle that reads the same
messages through Dovecot's own POP3 service."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.testing import StringTransport

from gateway.maildrop.pop3 import open_pop3_maildrop
from gateway.model import Account, Endpoint, Provider, Secret
from tests.harness.certs import TLSMaterial
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_config import config_head, listen, provider
from tests.helpers.pop3 import device


def reactor() -> Any:
    from twisted.internet import reactor as global_reactor

    return global_reactor


def imap_provider(dovecot: Dovecot, ca: TLSMaterial, tls: str = "implicit", **kw: Any) -> Provider:
    port = dovecot.imaps_port if tls == "implicit" else dovecot.imap_port
    assert port is not None
    pop3 = Endpoint("localhost", dovecot.pop3s_port or 0, "implicit")
    return Provider(
        "dovecot",
        imap=Endpoint("localhost", port, tls),  # type: ignore[arg-type]
        pop3=pop3,
        ca_file=ca.ca_file,
        timeout=kw.pop("timeout", 10.0),
        **kw,
    )


def imap_account(user: str = "alice", **kw: Any) -> Account:
    kw.setdefault("password", Secret(f"{user}-pw"))
    return Account(user, "dovecot", user, mailbox="imap", **kw)


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def varied_messages() -> list[bytes]:
    """Messages whose wire form is easy to get wrong (LF line ends, as delivered)."""
    eight_bit = bytes(b for b in range(1, 256) if b not in (0x0A, 0x0D))
    dots = b"\n".join([b".", b"..", b".starts with a dot", b"...three", b"", b"."])
    return [
        b"From: a@example.test\nSubject: eight bit\nMessage-ID: <8bit@example.test>\n\n"
        + b"\n".join(eight_bit[i : i + 60] for i in range(0, len(eight_bit), 60))
        + b"\n"
        + dots
        + b"\n",
        b"From: a@example.test\nSubject: long lines\nMessage-ID: <long@example.test>\n\n"
        + b"x" * 200_000
        + b"\n.y"
        + b"z" * 5000
        + b"\nshort\n",
        # Many lines starting with ".", about 1 MiB: lines cross every chunk boundary.
        b"From: a@example.test\nSubject: dots\nMessage-ID: <dots@example.test>\n\n"
        + b"".join(b".line %06d of the dotted message\n" % i for i in range(30_000)),
        b"From: a@example.test\nSubject: no final newline\nMessage-ID: <nofinal@example.test>\n"
        b"\nbody line 1\n.body line 2",
        b"From: a@example.test\nSubject: empty body\nMessage-ID: <empty@example.test>\n\n",
        b"Subject: folded\n  header\nMessage-ID:\n <folded@example.test>\n\n1\n2\n3\n4\n",
    ]


Top = tuple[int, int]  # (message number, lines)


class Oracle:
    """The same Dovecot read through its own POP3 service: the bytes a device
    would get from a POP3 mailbox, in wire form (dot-stuffed, no terminator)."""

    def __init__(self, dovecot: Dovecot, ca: TLSMaterial, user: str = "alice") -> None:
        self._provider = imap_provider(dovecot, ca)
        self._account = Account(user, "dovecot", user, password=Secret(f"{user}-pw"))

    async def read(
        self, tops: tuple[int, ...] = ()
    ) -> tuple[list[bytes], dict[tuple[int, int], bytes]]:
        maildrop = await open_pop3_maildrop(self._account, self._provider, reactor=reactor())
        try:
            whole = []
            top: dict[Top, bytes] = {}
            for n in range(1, len(maildrop.sizes) + 1):
                whole.append(await retrieve(maildrop, n))
                for lines in tops:
                    top[(n, lines)] = await retrieve(maildrop, n, lines)
        finally:
            maildrop.abort()
        return whole, top


async def retrieve(maildrop: Any, n: int, lines: int | None = None) -> bytes:
    sink = StringTransport()
    await maildrop.retrieve(n, sink, lines)
    assert sink.producer is None, "the maildrop left its producer registered"
    return sink.value()


# -- a gateway configuration with IMAP-backed accounts ------------------------------------


def gateway_config_imap(
    state: Path,
    ports: dict[str, int],
    dovecot: Dovecot,
    upstream: TLSMaterial,
    own: TLSMaterial,
) -> str:
    """Listeners on `ports["implicit"]` and `ports["starttls"]`; accounts for each
    DELE policy on alice's INBOX, bob over STARTTLS, and a wrong password."""

    def account(name: str, provider: str, user: str, extra: str = "", pw: str = "") -> str:
        return (
            f'[accounts.{name}]\nprovider = "{provider}"\nusername = "{user}"\n'
            f'password = "{pw or user + "-pw"}"\nmailbox = "imap"\n{extra}'
        )

    return "\n".join(
        [
            *config_head(state, own),
            *listen("pop3", ports["implicit"], "implicit"),
            *listen("pop3", ports["starttls"], "starttls"),
            *provider("imap", "imap", dovecot.imaps_port, "implicit", upstream.ca_file, timeout=5),
            *provider(
                "imap-stls", "imap", dovecot.imap_port, "starttls", upstream.ca_file, timeout=5
            ),
            account("alice-imap", "imap", "alice"),
            account("alice-move", "imap", "alice", 'on_delete = "move"\nmove_to = "Archive"\n'),
            account("alice-keep", "imap", "alice", 'on_delete = "keep"\nmark_seen = true\n'),
            account("bob-imap", "imap-stls", "bob", 'folder = "INBOX"\n'),
            account("alice-badpw", "imap", "alice", pw="not-alices-password"),
            device("printer", "alice-imap"),
            device("copier", "alice-imap"),
            device("mover", "alice-move"),
            device("keeper", "alice-keep"),
            device("scanner", "bob-imap"),
            device("misconfigured", "alice-badpw"),
        ]
    )
