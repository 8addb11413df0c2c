"""Closed sessions leave nothing for the garbage collector.

The real gateway service (`make_service`, as twistd runs it) in this test's
reactor, in front of the real Dovecot (POP3, IMAP) and an aiosmtpd submission
server (the SMTP relay's upstream), with devices on both TLS paths: implicit
TLS, and STLS/STARTTLS on both legs. The cycle collector is switched off
after a warm-up, then 200 full sessions run; once they are closed, every
object of a gateway class, every TLS protocol, OpenSSL connection and
device-side TCP transport they created must already be gone, freed by
reference counting alone. A reference cycle anywhere in a session (a
callback that captures the server, a deadline that points back at it)
would leave one of each per session here.

What Twisted and its dependencies still leave per upstream connection, and
no gateway object in it (see the README, "Garbage"): the `tcp.Connector` ↔
`tcp.Client` and `_WrappingFactory` ↔ `tcp.Connector` pairs with the
endpoint's factories, pyOpenSSL's `_VerifyHelper` and zope.interface's
`Provides` declarations. Those classes are not counted. (Upstream hosts are
resolved once a minute, not per login, and connected to without
`HostnameEndpoint`, whose per-call class and name-lookup closure used to be
on that list.)
"""

from __future__ import annotations

import gc
import poplib
import smtplib
import ssl
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.application.service import MultiService
from twisted.internet import tcp
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOProtocol

from gateway.config import load_config
from gateway.service import make_service
from tests.harness.certs import TLSMaterial, make_tls_material
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import free_port
from tests.harness.smtp_sink import SMTPSink
from tests.helpers.imap import gateway_config_imap
from tests.helpers.pop3 import Ports, gateway_config, message
from tests.helpers.smtp_gateway import SMTPPorts, smtp_gateway_config, smtps_sink

pytestmark = pytest.mark.integration

SESSIONS = 200
WARM_UP = 3
# How long closed connections may take to finish closing (TLS close_notify,
# the upstream's QUIT, the relay's keep-alive) before what is left is a leak.
SETTLE = 15.0

# Besides every class from `gateway`: the objects of a TLS connection.
_TWISTED = (TLSMemoryBIOProtocol, SSL.Connection, tcp.Server)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _watched(cls: type) -> bool:
    module = cls.__module__
    return (isinstance(module, str) and module.startswith("gateway.")) or issubclass(cls, _TWISTED)


def census() -> Counter[str]:
    """Live objects of the watched classes, by class; collects nothing."""
    live = (type(o) for o in gc.get_objects())
    return Counter(f"{cls.__module__}.{cls.__qualname__}" for cls in live if _watched(cls))


def grown(before: Counter[str], after: Counter[str]) -> dict[str, int]:
    return {name: n - before[name] for name, n in after.items() if n > before[name]}


async def pause(seconds: float) -> None:
    await deferLater(_reactor(), seconds, lambda: None)


async def settled(check: Callable[[], bool], timeout: float = SETTLE) -> bool:
    """Whether `check()` becomes true within `timeout`, looked at every 50 ms."""
    for _ in range(int(timeout / 0.05)):
        if check():
            return True
        await pause(0.05)
    return check()


@pytest.fixture
def without_collector() -> Iterator[None]:
    """The cycle collector off for the test (on again afterwards, and run once)."""
    was_enabled = gc.isenabled()
    yield
    if was_enabled:
        gc.enable()
    gc.collect()


async def leftovers_after(
    sessions: Callable[[int], None], quiet: Callable[[], bool]
) -> dict[str, int]:
    """Run `sessions(n)` in a thread: WARM_UP sessions with the collector on,
    then SESSIONS with it off. The watched objects that remain once `quiet()`
    (nothing open any more) and the census stopped shrinking, by class."""
    await deferToThread(sessions, WARM_UP)  # caches, the first argon2 check
    assert await settled(quiet)
    gc.collect()
    gc.disable()
    before = census()
    await deferToThread(sessions, SESSIONS)
    assert await settled(quiet)
    await settled(lambda: not grown(before, census()))
    return grown(before, census())


async def started(config_text: str, base: Path) -> MultiService:
    path = base / "gateway.toml"
    path.write_text(config_text)
    (base / "state").mkdir(mode=0o700, exist_ok=True)
    top = make_service(load_config(path), _reactor())
    top.startService()
    return top


def _limits_total(top: MultiService) -> int:
    """Device connections the gateway still counts (its shared ConnectionLimits)."""
    for service in top:
        factory = getattr(service, "factory", None)
        while factory is not None and not hasattr(factory, "limits"):
            factory = getattr(factory, "wrappedFactory", None)
        if factory is not None:
            return int(factory.limits.total)
    raise AssertionError("no listener with connection limits")


def _open_upstreams() -> int:
    return sum(
        1
        for o in gc.get_objects()
        if type(o).__name__ in ("POP3Client", "SMTPClient") and not o.ended
    )


@pytest.mark.parametrize("path", ["implicit TLS", "STLS on both legs"])
@pytest_twisted.ensureDeferred
async def test_pop3_sessions_leave_no_garbage(
    path: str,
    clean_mailboxes: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    tmp_path: Path,
    without_collector: None,
) -> None:
    dovecot = clean_mailboxes
    for user in ("alice", "bob"):
        dovecot.deliver(user, message(1))
    ports = Ports()
    stranger = make_tls_material(tmp_path / "stranger")
    text = gateway_config(
        tmp_path / "state", ports, dovecot, tls_upstream, tls_gateway, stranger.ca_file
    )
    top = await started(text, tmp_path)
    ctx = ssl.create_default_context(cafile=str(tls_gateway.ca_file))

    def sessions(n: int) -> None:
        for _ in range(n):
            if path == "implicit TLS":  # printer: alice, upstream POP3S
                client: poplib.POP3 = poplib.POP3_SSL(
                    "127.0.0.1", ports.implicit, context=ctx, timeout=10
                )
                device = "printer"
            else:  # scanner: bob, upstream STLS
                client = poplib.POP3("127.0.0.1", ports.starttls, timeout=10)
                client.stls(context=ctx)
                device = "scanner"
            client.user(device)
            client.pass_(f"{device}-pw")
            assert client.stat()[0] == 1
            client.uidl()
            client.retr(1)
            client.quit()

    try:
        left = await leftovers_after(
            sessions, lambda: _limits_total(top) == 0 and _open_upstreams() == 0
        )
    finally:
        gc.enable()
        await top.stopService()
    assert left == {}, f"left behind by {SESSIONS} POP3 sessions ({path}): {left}"


@pytest_twisted.ensureDeferred
async def test_imap_backed_sessions_leave_no_garbage(
    clean_mailboxes: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    tmp_path: Path,
    without_collector: None,
) -> None:
    """An IMAP-backed account: the device sessions share the kept upstream
    connection, which stays open (it was opened during the warm-up)."""
    dovecot = clean_mailboxes
    dovecot.deliver("alice", message(1))
    ports = {"implicit": free_port(), "starttls": free_port()}
    text = gateway_config_imap(tmp_path / "state", ports, dovecot, tls_upstream, tls_gateway)
    top = await started(text, tmp_path)
    ctx = ssl.create_default_context(cafile=str(tls_gateway.ca_file))

    def sessions(n: int) -> None:
        for _ in range(n):
            client = poplib.POP3_SSL("127.0.0.1", ports["implicit"], context=ctx, timeout=10)
            client.user("printer")
            client.pass_("printer-pw")
            assert client.stat()[0] == 1
            client.uidl()
            client.retr(1)
            client.quit()

    try:
        left = await leftovers_after(sessions, lambda: _limits_total(top) == 0)
    finally:
        gc.enable()
        await top.stopService()
    assert left == {}, f"left behind by {SESSIONS} IMAP-backed sessions: {left}"


@pytest.fixture
def smtps_upstream(tmp_path: Path, tls_upstream: TLSMaterial) -> Iterator[SMTPSink]:
    with smtps_sink(tmp_path / "smtps", tls_upstream) as server:
        yield server


@pytest_twisted.ensureDeferred
async def test_smtp_sessions_leave_no_garbage(
    smtps_upstream: SMTPSink,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    tmp_path: Path,
    without_collector: None,
) -> None:
    """STARTTLS from the device, the relay's upstream on implicit TLS (which
    it keeps open while messages keep coming, then closes)."""
    ports = SMTPPorts()
    text = smtp_gateway_config(
        tmp_path / "state",
        ports,
        submission_port=free_port(),  # the Dovecot submission provider is not used
        smtps_port=smtps_upstream.port,
        upstream=tls_upstream,
        own=tls_gateway,
    )
    top = await started(text, tmp_path)
    ctx = ssl.create_default_context(cafile=str(tls_gateway.ca_file))
    sent = 0

    def sessions(n: int) -> None:
        nonlocal sent
        for i in range(n):
            with smtplib.SMTP("127.0.0.1", ports.submission, timeout=10) as client:
                client.starttls(context=ctx)
                client.login("direct-dev", "direct-dev-pw")
                client.sendmail(
                    "relay@example.com",
                    ["someone@example.org"],
                    b"Subject: garbage %d\r\n\r\nhello\r\n" % i,
                )
            sent += 1

    def quiet() -> bool:
        return (
            _limits_total(top) == 0
            and len(smtps_upstream.messages()) == sent
            and _open_upstreams() == 0
        )

    try:
        left = await leftovers_after(sessions, quiet)
    finally:
        gc.enable()
        await top.stopService()
    assert left == {}, f"left behind by {SESSIONS} SMTP sessions: {left}"
