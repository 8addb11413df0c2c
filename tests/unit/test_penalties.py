"""Login penalties: the book on its own, then through the real POP3 and SMTP
front ends and device authenticator, every pause measured on a memory clock."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher

from gateway.admin.events import MetricsObserver
from gateway.admin.metrics import GatewayMetrics
from gateway.config import ConfigError, load_config
from gateway.devices import DeviceAuthenticator
from gateway.locks import AccountLocks
from gateway.maildrop.memory import MemoryMaildrop
from gateway.model import Account, Device, Endpoint, Listener, PenaltySettings, Provider, Secret
from gateway.penalties import MemoryPenaltyBook, NoPenalties, penalty_book
from gateway.pop3.server import POP3ServerFactory
from gateway.smtp.server import SMTPServerFactory
from gateway.smtp.spool import Spool, SpoolDir
from tests.helpers.front_end import FAST_HASHER, run_now
from tests.helpers.log_lines import captured_log, fail2ban_hosts

OK = b"+OK maildrop has 1 messages"
REFUSED = b"-ERR [AUTH] invalid user name or password\r\n"


# -- the book ---------------------------------------------------------------------


def book(**settings: Any) -> tuple[MemoryPenaltyBook, Clock]:
    clock = Clock()
    return MemoryPenaltyBook(PenaltySettings(**settings), clock), clock


def test_each_failure_doubles_the_pause_up_to_the_maximum() -> None:
    penalties, _ = book(lockout_after=100)
    delays = []
    for n in range(7):
        delays.append(penalties.delay_for("10.0.0.1", "printer"))
        penalties.failed("10.0.0.1", "printer", b"guess%d" % n)
    assert delays == [0, 2, 4, 8, 15, 15, 15]


def test_lockout_after_failures_in_the_window_then_it_ends() -> None:
    penalties, clock = book(lockout_after=3, lockout_window=60, lockout_time=300)
    assert penalties.failed("10.0.0.1", "a", b"1") == ()
    clock.advance(59)
    assert penalties.failed("10.0.0.1", "b", b"2") == ()
    clock.advance(2)  # the first failure has left the window
    assert penalties.failed("10.0.0.1", "c", b"3") == ()
    assert not penalties.locked("10.0.0.1")
    (started,) = penalties.failed("10.0.0.1", "d", b"4")
    assert (started.kind, started.network, started.failures) == ("lockout", "10.0.0.1", 3)
    assert penalties.locked("10.0.0.1") and not penalties.locked("10.0.0.2")
    clock.advance(299)
    assert penalties.locked("10.0.0.1")
    clock.advance(1)
    assert not penalties.locked("10.0.0.1")


def test_a_repeated_attempt_counts_once() -> None:
    """Dovecot's rule: a device with a stale password does not lock its own address."""
    penalties, _ = book(lockout_after=3)
    for _ in range(20):
        assert penalties.failed("10.0.0.1", "printer", b"same") == ()
    assert not penalties.locked("10.0.0.1")
    assert penalties.delay_for("10.0.0.1", "printer") == 2


def test_success_clears_its_address_and_pair_but_not_another_name_there() -> None:
    penalties, _ = book()
    for n in range(3):
        penalties.failed("10.0.0.1", "printer", b"p%d" % n)
        penalties.failed("10.0.0.1", "ghost", b"g%d" % n)
    penalties.succeeded("10.0.0.1", "printer")
    assert penalties.delay_for("10.0.0.1", "printer") == 0
    # The address is clean, its guesses at "ghost" still slow "ghost" there.
    assert penalties.delay_for("10.0.0.1", "ghost") == 8


def test_ipv6_counts_by_network_and_ipv4_mapped_as_ipv4() -> None:
    penalties, _ = book()
    penalties.failed("2001:db8:1:2::1", "x", b"1")
    assert penalties.delay_for("2001:db8:1:2:ffff::9", "y") == 2
    assert penalties.delay_for("2001:db8:1:3::1", "y") == 0
    penalties.failed("::ffff:10.9.8.7", "x", b"1")
    assert penalties.delay_for("10.9.8.7", "y") == 2
    wide, _ = book(ipv6_prefix=48)
    wide.failed("2001:db8:1:2::1", "x", b"1")
    assert wide.delay_for("2001:db8:1:ffff::1", "y") == 2
    assert wide.network("2001:db8:1:2::1") == "2001:db8:1::/48"


def test_trusted_networks_are_exempt() -> None:
    penalties, _ = book(lockout_after=2, trusted=(ipaddress.ip_network("192.0.2.0/24"),))
    for n in range(10):
        assert penalties.failed("192.0.2.7", "printer", b"%d" % n) == ()
    assert penalties.delay_for("192.0.2.7", "printer") == 0
    assert not penalties.locked("192.0.2.7")


def test_disabled_penalties_are_none() -> None:
    assert isinstance(penalty_book(PenaltySettings(enabled=False), Clock()), NoPenalties)
    assert isinstance(penalty_book(PenaltySettings(), Clock()), MemoryPenaltyBook)


def test_many_unknown_names_and_addresses_stay_within_the_bound() -> None:
    penalties, clock = book(max_entries=100, lockout_after=1000)
    for n in range(5000):
        address = f"2001:db8:{n:x}::1"
        penalties.failed(address, f"guess-{n}-" + "x" * (n % 300), b"%d" % n)
    assert all(size <= 100 for size in penalties.sizes().values())
    # And all of it expires on the clock once the window has passed.
    clock.advance(601)
    penalties.failed("10.0.0.1", "one", b"1")
    assert penalties.sizes()["names"] == 1 and penalties.sizes()["addresses"] == 1


def test_spraying_one_name_from_many_addresses_slows_new_addresses_only() -> None:
    penalties, _ = book(device_slow_after=5)
    penalties.succeeded("10.0.0.5", "printer")  # the printer's own address
    started = [penalties.failed(f"172.16.0.{n}", "printer", b"%d" % n) for n in range(6)]
    assert [len(s) for s in started] == [0, 0, 0, 0, 1, 0]
    assert started[4][0].kind == "device_slowdown"
    assert penalties.delay_for("172.16.9.9", "printer") == 4
    assert penalties.delay_for("10.0.0.5", "printer") == 0
    assert penalties.delay_for("172.16.9.9", "copier") == 0
    # Slowed, never locked out.
    assert not any(penalties.locked(f"172.16.0.{n}") for n in range(6))


# -- through the front ends -------------------------------------------------------


class Front:
    """A POP3 front end with penalties, in memory, as make_service wires it."""

    def __init__(self, run_in_thread: Any = run_now, **settings: Any) -> None:
        self.clock = MemoryReactorClock()
        devices = {
            name: Device(name, Secret(FAST_HASHER.hash(f"{name}-pw")), account)
            for name, account in (("printer", "scanner"), ("copier", "copier"))
        }
        devices["far"] = Device(
            "far",
            Secret(FAST_HASHER.hash("far-pw")),
            "far",
            allow_from=(ipaddress.ip_network("192.0.2.0/24"),),
        )
        self.penalties = MemoryPenaltyBook(PenaltySettings(**settings), self.clock)
        self.factory = POP3ServerFactory(
            listener=Listener("pop3", 995, "implicit"),
            tls_options=None,
            authenticator=DeviceAuthenticator(
                devices, run_in_thread=run_in_thread, penalties=self.penalties, clock=self.clock
            ),
            accounts={
                d.account: Account(d.account, "corp", "x@example.com") for d in devices.values()
            },
            open_maildrop=self._open,
            locks=AccountLocks(),
            clock=self.clock,
        )

    async def _open(self, account: Account) -> MemoryMaildrop:
        return MemoryMaildrop([b"Subject: x\r\n\r\nx\r\n"])

    def send_pass(self, name: str, password: str, peer: str) -> tuple[Any, StringTransport]:
        """A fresh connection that has sent USER and PASS, its answers cleared."""
        address: Any = IPv6Address if ":" in peer else IPv4Address
        proto = self.factory.buildProtocol(address("TCP", peer, 40000))
        transport = StringTransport(peerAddress=address("TCP", peer, 40000))
        proto.makeConnection(transport)
        proto.dataReceived(b"USER " + name.encode() + b"\r\n")
        transport.clear()
        proto.dataReceived(b"PASS " + password.encode() + b"\r\n")
        return proto, transport

    def login(self, name: str, password: str, peer: str = "10.0.0.66") -> tuple[float, bytes]:
        """(seconds until the answer to PASS, the answer), on a fresh connection."""
        proto, transport = self.send_pass(name, password, peer)
        waited = 0.0
        while not transport.value():
            assert waited < 100, "no answer"
            self.clock.advance(0.5)
            waited += 0.5
        answer = transport.value()
        proto.dataReceived(b"QUIT\r\n")
        return waited, answer


def test_brute_force_slows_then_locks_its_address_not_the_device_elsewhere() -> None:
    front = Front()
    with captured_log() as text:
        answers = [front.login("printer", f"guess-{n}") for n in range(10)]
        locked = [front.login("printer", "printer-pw"), front.login("printer", "wrong")]
        elsewhere = front.login("printer", "printer-pw", peer="10.0.0.5")
    # The refusal's own second first, then Dovecot's doubling, up to 15 s.
    assert [waited for waited, _ in answers] == [1, 2, 4, 8, 15, 15, 15, 15, 15, 15]
    assert all(answer == REFUSED for _, answer in answers)
    # Locked: the right password is refused like a wrong one, after the same pause.
    assert locked[0] == locked[1] and locked[0][1] == REFUSED
    # The device from its own address: no pause at all.
    assert elsewhere[0] == 0 and elsewhere[1].startswith(OK)
    lockouts = [line for line in text if "login lockout" in line]
    assert len(lockouts) == 1
    assert "[gateway.penalties#warn] login lockout for 10.0.0.66: 10 failed logins" in lockouts[0]
    assert sum(": address locked out\n" in line for line in text) == 2
    # The filter finds the ten refusals, the lockout and the two refusals after it.
    assert fail2ban_hosts("".join(text).splitlines()) == ["10.0.0.66"] * 13


def test_a_success_waits_the_same_pause_and_then_clears_it() -> None:
    front = Front()
    for n in range(3):
        front.login("printer", f"guess-{n}")
    waited, answer = front.login("printer", "printer-pw")
    assert waited == 8 and answer.startswith(OK)  # no early answer for a right guess
    assert front.login("printer", "guess-x")[0] == 1


def test_hanging_up_during_the_pause_still_counts_the_failure() -> None:
    front = Front()
    proto, _ = front.send_pass("printer", "guess", "10.0.0.66")
    proto.connectionLost(None)  # gone before the answer
    front.clock.advance(5)
    assert front.login("printer", "guess 2")[0] == 2


def test_a_right_guess_in_flight_when_the_lockout_starts_is_refused() -> None:
    """Parallel attempts from one address are all checked (as in Dovecot), but
    one that ends after the lockout began is refused, right or wrong."""
    pending: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

    def later(f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        pending.append((d, f, args))
        return d

    front = Front(run_in_thread=later, lockout_after=2)
    attempts = [
        front.send_pass("printer", password, "10.0.0.66")
        for password in ("guess-1", "guess-2", "printer-pw")
    ]
    while pending:
        d, f, args = pending.pop(0)
        d.callback(f(*args))
    front.clock.advance(20)
    assert [transport.value() for _, transport in attempts] == [REFUSED] * 3
    assert front.penalties.locked("10.0.0.66")


def test_a_refusal_takes_as_long_with_the_right_password_as_with_a_wrong_one() -> None:
    front = Front()
    front.login("far", "guess")
    front.login("far", "other guess")
    right = front.login("far", "far-pw")  # refused: not in allow_from
    wrong = front.login("far", "third guess")
    assert right == (4, REFUSED) and wrong == (8, REFUSED)
    # Both paused for their count of failures, not for their password.
    front2 = Front()
    front2.login("far", "guess")
    front2.login("far", "other guess")
    assert front2.login("far", "third guess") == right


def test_a_password_spray_from_many_addresses_is_slowed() -> None:
    front = Front(device_slow_after=5)
    front.login("printer", "printer-pw", peer="10.0.0.5")
    with captured_log() as text:
        sprayed = [front.login("printer", f"spray-{n}", peer=f"172.16.0.{n}") for n in range(8)]
    # One try per address: each answers after the plain second at first...
    assert [waited for waited, _ in sprayed[:5]] == [1] * 5
    # ... then the name is slowed for every address it never logged in from.
    assert [waited for waited, _ in sprayed[5:]] == [2, 4, 8]
    assert front.login("printer", "printer-pw", peer="10.0.0.5")[0] == 0
    assert front.login("printer", "printer-pw", peer="172.16.1.1")[0] == 15
    assert any("login slowdown for device printer: 5 failed logins" in t for t in text)
    assert fail2ban_hosts("".join(text).splitlines()) == [f"172.16.0.{n}" for n in range(8)]


def test_trusted_addresses_keep_the_plain_second() -> None:
    front = Front(trusted=(ipaddress.ip_network("10.0.0.0/24"),), lockout_after=2)
    waits = [front.login("printer", f"guess-{n}")[0] for n in range(5)]
    assert waits == [1] * 5
    assert front.login("printer", "printer-pw")[1].startswith(OK)


def test_smtp_gets_the_same_penalties(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    devices = {"printer": Device("printer", Secret(FAST_HASHER.hash("printer-pw")), "scanner")}
    penalties = MemoryPenaltyBook(PenaltySettings(lockout_after=3), clock)
    factory = SMTPServerFactory(
        listener=Listener("smtp", 465, "implicit"),
        tls_options=None,
        authenticator=DeviceAuthenticator(
            devices, run_in_thread=run_now, penalties=penalties, clock=clock
        ),
        devices=devices,
        accounts={"scanner": Account("scanner", "corp", "scanner@example.com")},
        providers={"corp": Provider("corp", smtp=Endpoint("smtp.example.com", 587))},
        spool=Spool(SpoolDir(tmp_path / "spool").prepare(), run_in_thread=run_now),
        on_queued=lambda entry: None,
        clock=clock,
        hostname="gw.test",
    )

    def auth(password: str) -> tuple[float, bytes]:
        peer = IPv4Address("TCP", "10.0.0.66", 40000)
        proto = factory.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        proto.dataReceived(b"EHLO dev\r\n")
        transport.clear()
        token = base64.b64encode(b"\0printer\0" + password.encode())
        proto.dataReceived(b"AUTH PLAIN " + token + b"\r\n")
        waited = 0.0
        while not transport.value():
            clock.advance(0.5)
            waited += 0.5
        return waited, transport.value()

    refused = b"535 5.7.8 authentication credentials invalid\r\n"
    assert [auth(f"guess-{n}") for n in range(3)] == [(1, refused), (2, refused), (4, refused)]
    assert penalties.locked("10.0.0.66")
    assert auth("printer-pw") == (8, refused)


def test_the_metrics_count_penalties() -> None:
    metrics = GatewayMetrics(devices=lambda: ["printer"], listeners=lambda: [], process=False)
    observer = MetricsObserver(metrics)
    front = Front(lockout_after=2, device_slow_after=3)
    globalLogPublisher.addObserver(observer)
    try:
        front.login("printer", "a")
        front.login("printer", "b")
        front.login("printer", "c", peer="10.0.0.67")
        front.login("printer", "d")
    finally:
        globalLogPublisher.removeObserver(observer)

    def value(name: str, **labels: str) -> float:
        found = metrics.registry.get_sample_value(name, labels)
        return found or 0.0

    assert value("gateway_login_penalties_total", kind="lockout") == 1
    assert value("gateway_login_penalties_total", kind="device_slowdown") == 1
    assert (
        value("gateway_logins_total", protocol="pop3", outcome="failure", reason="locked_out") == 1
    )


def test_a_dual_stack_listener_counts_ipv4_mapped_peers_as_their_ipv4_address() -> None:
    front = Front()
    front.login("printer", "guess", peer="::ffff:10.0.0.66")
    assert front.login("printer", "guess 2", peer="10.0.0.66")[0] == 2


# -- configuration and the fail2ban filter -----------------------------------------


def load(tmp_path: Path, penalties: str) -> Any:
    (tmp_path / "state").mkdir(mode=0o700, exist_ok=True)
    path = tmp_path / "gateway.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n[penalties]\n{penalties}')
    path.chmod(0o600)
    return load_config(path)


def test_the_penalties_section_and_its_defaults(tmp_path: Path) -> None:
    assert load(tmp_path, "").penalties == PenaltySettings()
    config = load(
        tmp_path,
        'enabled = false\nmax_delay = 30\nlockout_after = 5\nipv6_prefix = 48\ntrusted = ["::1"]\n',
    )
    assert config.penalties == PenaltySettings(
        enabled=False,
        max_delay=30.0,
        lockout_after=5,
        ipv6_prefix=48,
        trusted=(ipaddress.ip_network("::1"),),
    )


def test_penalty_settings_that_make_no_sense_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as failure:
        load(tmp_path, 'ipv6_prefix = 8\nlockout_after = 0\ntrusted = ["0.0.0.0/0"]\n')
    problems = " / ".join(str(p) for p in failure.value.problems)
    assert "penalties.ipv6_prefix" in problems and "penalties.lockout_after" in problems
    assert "write enabled = false" in problems


def test_the_filter_never_takes_an_address_from_a_quoted_value() -> None:
    """A value a client chose is quoted when it holds a space, so a `] ` in it
    has a quote before it: the filter's prefix stops at the first quote."""
    forged = [
        '2026-12-05T21:38:26+0000 [gateway.smtp#info] smtp sender <"x] login lockout for '
        '10.7.7.7: y"> refused for device printer (account scanner)',
        '2026-12-05T21:38:26+0000 [gateway.pop3#info] pop3 session device="] pop3 login '
        'refused for device a from 10.7.7.8: x" peer=10.1.2.3',
    ]
    assert fail2ban_hosts(forged) == []
    real = (
        "2026-12-05T21:38:26+0000 [gateway.penalties#warn] login lockout for 2001:db8::1: "
        "10 failed logins within 600 s from 2001:db8::/64, refused for 900 s"
    )
    assert fail2ban_hosts([real]) == ["2001:db8::1"]
