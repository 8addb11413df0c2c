"""Shared fixtures: TLS material, one real Dovecot per session, reactor hygiene."""

from __future__ import annotations

import ssl
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness.certs import TLSMaterial, make_tls_material
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import GatewayProcess
from tests.harness.postgres import PostgresCluster
from tests.harness.smtp_sink import SMTPSink
from tests.helpers.pop3 import Ports, gateway_config
from tests.helpers.smtp_gateway import SUBMISSION_USERS
from tests.helpers.state import migrated_database

UPSTREAM_USERS = {"alice": "alice-pw", "bob": "bob-pw"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_delayed_calls: the test may leave delayed calls on the global reactor",
    )


@pytest.fixture(scope="session")
def tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    """Certificate of the upstream Dovecot, from its own CA."""
    return make_tls_material(tmp_path_factory.mktemp("tls-upstream"))


@pytest.fixture(scope="session")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    """Certificate of the gateway's listeners; a different CA from the upstream's,
    so trusting the wrong one fails instead of passing by accident."""
    return make_tls_material(tmp_path_factory.mktemp("tls-gateway"))


@pytest.fixture(scope="session")
def dovecot(
    tmp_path_factory: pytest.TempPathFactory, tls_upstream: TLSMaterial
) -> Iterator[Dovecot]:
    """One real Dovecot for the whole session (users alice and bob); starting
    one costs ~0.1 s, sharing it keeps the suite fast."""
    with Dovecot(tmp_path_factory.mktemp("dovecot"), UPSTREAM_USERS, tls=tls_upstream) as server:
        yield server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One real PostgreSQL cluster for the whole session (under a second to
    start); tests take fresh databases from it. Tests that stop or crash the
    server start their own `PostgresCluster`."""
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture
def state_dsn(postgres: PostgresCluster) -> str:
    """A fresh database with the gateway's schema, for one test."""
    return migrated_database(postgres)


@pytest.fixture
def clean_mailboxes(dovecot: Dovecot) -> Dovecot:
    """The session Dovecot with alice's and bob's mailboxes empty."""
    for user in UPSTREAM_USERS:
        dovecot.clear(user)
    return dovecot


# -- the real gateway (twistd child) in front of the session Dovecot ------------


@pytest.fixture(scope="module")
def ports() -> Ports:
    return Ports()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    dovecot: Dovecot,
    tls_upstream: TLSMaterial,
    tls_gateway: TLSMaterial,
    ports: Ports,
) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("gateway")
    stranger = make_tls_material(base / "stranger")
    text = gateway_config(
        base / "state", ports, dovecot, tls_upstream, tls_gateway, stranger.ca_file
    )
    with GatewayProcess(base, text, [ports.implicit, ports.starttls, ports.legacy]) as gw:
        yield gw


# -- Dovecot's submission service (587, STARTTLS) relaying to an aiosmtpd sink -----------


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SMTPSink]:
    """Where Dovecot's submission service relays to (a module may override it)."""
    with SMTPSink(tmp_path_factory.mktemp("sink")) as server:
        yield server


@pytest.fixture(scope="module")
def submission(
    tmp_path_factory: pytest.TempPathFactory, sink: SMTPSink, tls_upstream: TLSMaterial
) -> Iterator[Dovecot]:
    """A Dovecot whose submission service takes SUBMISSION_USERS and relays to `sink`."""
    with Dovecot(
        tmp_path_factory.mktemp("dovecot-submission"),
        SUBMISSION_USERS,
        tls=tls_upstream,
        submission_relay_port=sink.port,
    ) as server:
        yield server


@pytest.fixture
def ctx(tls_gateway: TLSMaterial) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(tls_gateway.ca_file))


# -- reactor hygiene -----------------------------------------------------------
#
# trial fails a test that leaves delayed calls on the reactor; pytest-twisted
# does not, and a forgotten timeout then fires in some later, unrelated test.

_SETTLE_ROUNDS = 10
_SETTLE_STEP = 0.01  # seconds; lets callLater(0) clean-ups (TLS, tcp) finish


@pytest.fixture(autouse=True)
def no_leftover_delayed_calls(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves pending delayed calls it created on the global reactor.

    Calls pending before the test are ignored, and so are their reschedulings
    (a LoopingCall owned by a session fixture). Mark a test
    ``allow_delayed_calls`` to opt out.
    """
    reactor = _installed_reactor()
    if reactor is None or request.node.get_closest_marker("allow_delayed_calls"):
        yield
        return
    greenlet = _reactor_greenlet(request)
    before = list(reactor.getDelayedCalls())
    yield
    leftovers = _settle(reactor, greenlet, before)
    if leftovers:
        listing = "\n  ".join(repr(call) for call in leftovers)
        for call in leftovers:
            call.cancel()  # so they cannot fire inside the next test
        pytest.fail(f"test left {len(leftovers)} delayed call(s) on the reactor:\n  {listing}")


def _reactor_greenlet(request: pytest.FixtureRequest) -> Any | None:
    """The greenlet pytest-twisted runs the reactor in (its public session
    fixture), or None without the plugin."""
    try:
        return request.getfixturevalue("twisted_greenlet")
    except pytest.FixtureLookupError:
        return None


def _installed_reactor() -> Any | None:
    """The global reactor if someone installed it; importing it here would
    install one as a side effect."""
    if "twisted.internet.reactor" not in sys.modules:
        return None
    from twisted.internet import reactor

    return reactor


def _new_calls(reactor: Any, before: list[Any]) -> list[Any]:
    # A LoopingCall's next call is a new DelayedCall with the same func.
    old_funcs = [call.func for call in before]
    return [
        call
        for call in reactor.getDelayedCalls()
        if call.active() and call not in before and not _same_func(call.func, old_funcs)
    ]


def _same_func(func: Any, funcs: list[Any]) -> bool:
    try:
        return any(func == other for other in funcs)
    except Exception:  # an exotic __eq__ must not break the check
        return False


def _settle(reactor: Any, greenlet: Any | None, before: list[Any]) -> list[Any]:
    """New delayed calls that remain after letting the reactor run briefly."""
    leftovers = _new_calls(reactor, before)
    for _ in range(_SETTLE_ROUNDS):
        if not leftovers or not _spin(reactor, greenlet):
            break
        leftovers = _new_calls(reactor, before)
    return leftovers


def _spin(reactor: Any, greenlet: Any | None) -> bool:
    """Run the pytest-twisted reactor greenlet for one short step, if there is one."""
    if greenlet is None or greenlet.dead:
        return False
    try:
        import pytest_twisted
        from twisted.internet.task import deferLater
    except ImportError:
        return False
    pytest_twisted.blockon(deferLater(reactor, _SETTLE_STEP, lambda: None))
    return True
