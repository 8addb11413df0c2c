"""Connection limits (gateway.limits) in both front ends, on in-memory
transports with the injected clock; the metric counted from their log line."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher

from gateway.admin.events import MetricsObserver
from gateway.config import load_config
from gateway.limits import CLOSE_GRACE, ConnectionLimits, address_key
from gateway.maildrop import Maildrop
from gateway.maildrop.memory import MemoryMaildrop
from gateway.model import Account, LimitSettings
from gateway.proxy_protocol import ProxyProtocolFactory
from tests.helpers.log_lines import captured_log, fail2ban_hosts
from tests.unit import test_config, test_pop3_server, test_smtp_server
from tests.unit.test_admin_metrics import new_metrics, value
from tests.unit.test_config import ca, config_dir, write  # noqa: F401 (fixtures)


def limits(**changes: Any) -> ConnectionLimits:
    return ConnectionLimits(lambda: dataclasses.replace(LimitSettings(), **changes))


def pop3_gateway(**changes: Any) -> test_pop3_server.Gateway:
    gw = test_pop3_server.Gateway()
    gw.factory.limits = limits(**changes)
    return gw


def raw_connect(factory: Any, peer: str) -> tuple[Any, StringTransport]:
    """A connection whose greeting is not checked: it may be a refusal."""
    proto = factory.buildProtocol(IPv4Address("TCP", peer, 40000))
    transport = test_pop3_server.TLSRecordingTransport(peerAddress=IPv4Address("TCP", peer, 40000))
    proto.makeConnection(transport)
    return proto, transport


# -- the counts themselves -------------------------------------------------------------


def test_counts_are_released_at_close_and_forget_an_address() -> None:
    counts = limits(max_connections_per_address=1, max_sessions_per_device=1)
    clock = MemoryReactorClock()
    first = counts.admit("pop3", "10.0.0.1", clock, lambda: None)
    assert first.refused is None
    assert counts.admit("smtp", "::ffff:10.0.0.1", clock, lambda: None).refused == (
        "too many connections from your address"
    )
    assert first.login("printer") is None
    assert first.login("printer") is None  # the same device again: counted once
    other = counts.admit("smtp", "10.0.0.2", clock, lambda: None)
    assert other.login("printer") == "too many sessions of this device"
    first.close()
    first.close()
    other.close()
    assert (counts.total, dict(counts.by_address), dict(counts.by_device)) == (0, {}, {})
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key("not an address") == "not an address"


def test_the_settings_are_read_at_each_connection() -> None:
    current = [LimitSettings(max_connections=1)]
    counts = ConnectionLimits(lambda: current[0])
    clock = MemoryReactorClock()
    assert counts.admit("pop3", "10.0.0.1", clock, lambda: None).refused is None
    assert counts.admit("pop3", "10.0.0.2", clock, lambda: None).refused is not None
    current[0] = LimitSettings(max_connections=2)  # a reload
    assert counts.admit("pop3", "10.0.0.2", clock, lambda: None).refused is None


# -- POP3 --------------------------------------------------------------------------------


def test_pop3_the_connection_over_the_address_limit_is_refused_and_closed() -> None:
    gw = pop3_gateway(max_connections_per_address=3)
    devices = [gw.connect("10.1.2.3") for _ in range(3)]
    with captured_log() as lines:
        proto, transport = raw_connect(gw.factory, "10.1.2.3")
        assert transport.value() == (
            b"-ERR [SYS/TEMP] too many connections from your address, closing connection\r\n"
        )
        assert transport.disconnecting
        proto.connectionLost(None)
    refusal = [line for line in lines if "refused" in line]
    assert len(refusal) == 1
    assert "pop3 connection from 10.1.2.3 refused: address limit of 3 reached" in refusal[0]
    assert fail2ban_hosts(lines) == []  # a busy address is not a password guesser
    assert any("outcome=" in line and "too many connections" in line for line in lines)
    # Another address is not affected; a closed connection frees its place.
    gw.connect("10.1.2.4")
    devices[0].drop()
    assert gw.connect("10.1.2.3").login().startswith(b"+OK maildrop")


def test_a_refused_peer_that_keeps_its_socket_open_is_cut_off() -> None:
    """Over TLS a clean close waits for the peer; a refused connection counts
    nowhere, so it must not stay open at the peer's pleasure."""
    gw = pop3_gateway(max_connections_per_address=1)
    gw.connect("10.1.2.3")
    proto, transport = raw_connect(gw.factory, "10.1.2.3")
    assert transport.disconnecting and not transport.disconnected
    gw.clock.advance(CLOSE_GRACE - 1)
    assert not transport.disconnected
    gw.clock.advance(1)
    assert transport.disconnected
    proto.connectionLost(None)


def test_pop3_the_global_limit_counts_every_address() -> None:
    gw = pop3_gateway(max_connections=2)
    gw.connect("10.0.0.1")
    gw.connect("10.0.0.2")
    _, transport = raw_connect(gw.factory, "10.0.0.3")
    assert transport.value() == (
        b"-ERR [SYS/TEMP] too many connections to the gateway, closing connection\r\n"
    )
    assert transport.disconnecting


def test_pop3_the_device_limit_is_checked_at_login() -> None:
    gw = pop3_gateway(max_sessions_per_device=1)
    first = gw.connect()
    assert first.login().startswith(b"+OK maildrop")
    second = gw.connect()
    second.send(b"USER printer")
    with captured_log() as lines:
        assert second.send(b"PASS printer-pw") == (
            b"-ERR [SYS/TEMP] too many sessions of this device, closing connection\r\n"
        )
    assert any(
        "pop3 login of device printer from 10.1.2.3 refused: device limit of 1 reached" in line
        for line in lines
    )
    assert fail2ban_hosts(lines) == []
    assert second.closed
    assert len(gw.maildrops) == 1  # no upstream session for the refused one
    second.proto.connectionLost(None)
    first.send(b"QUIT")
    first.proto.connectionLost(None)
    assert gw.connect().login().startswith(b"+OK maildrop")


def test_pop3_a_session_over_its_lifetime_is_dropped_and_deletes_nothing() -> None:
    gw = pop3_gateway(max_session_lifetime=1000)
    dev = gw.connect()
    dev.login()  # 2 s (the helper lets 1 s pass per command)
    dev.send(b"DELE 1")
    for _ in range(3):  # never idle
        gw.clock.advance(300)
        assert dev.send(b"NOOP") == b"+OK\r\n"
    assert gw.clock.seconds() < 1000 and not dev.closed
    gw.clock.advance(1000 - gw.clock.seconds())
    assert dev.read() == b"-ERR [SYS/TEMP] session lifetime exceeded, closing connection\r\n"
    assert dev.closed
    dev.send(b"QUIT")  # too late: the session is over
    dev.proto.connectionLost(None)
    drop = gw.maildrops[0]
    assert drop.aborted and drop.committed is None
    assert dev.proto.record.outcome == "session lifetime exceeded"


def test_pop3_the_lifetime_in_the_middle_of_a_command_cuts_the_connection() -> None:
    """No -ERR inside an answer that may be half sent: the connection is cut,
    and the maildrop that arrives afterwards is dropped, not committed."""
    gw = pop3_gateway(max_session_lifetime=100)
    opening: Deferred[MemoryMaildrop] = Deferred()

    async def open_maildrop(account: Account) -> Maildrop:
        return await opening

    gw.factory.open_maildrop = open_maildrop
    dev = gw.connect()
    dev.send(b"USER printer")
    assert dev.send(b"PASS printer-pw") == b""  # waiting for the upstream
    gw.clock.advance(100)
    assert dev.transport.disconnected and dev.read() == b""
    dev.proto.connectionLost(None)
    drop = MemoryMaildrop([test_pop3_server.MSG1])
    opening.callback(drop)
    assert drop.aborted and drop.committed is None
    assert dev.proto.record.outcome == "session lifetime exceeded"


def test_pop3_the_lifetime_deadline_stops_with_the_connection() -> None:
    gw = pop3_gateway(max_session_lifetime=1000)
    dev = gw.connect()
    dev.send(b"QUIT")
    dev.proto.connectionLost(None)
    assert gw.clock.getDelayedCalls() == []


# -- SMTP --------------------------------------------------------------------------------


def smtp_gateway(tmp_path: Path, **changes: Any) -> test_smtp_server.Gateway:
    gw = test_smtp_server.Gateway(tmp_path)
    gw.factory.limits = limits(**changes)
    return gw


def test_smtp_the_connection_over_the_address_limit_gets_421(tmp_path: Path) -> None:
    gw = smtp_gateway(tmp_path, max_connections_per_address=1)
    gw.connect("10.1.2.3")
    proto, transport = raw_connect(gw.factory, "10.1.2.3")
    assert transport.value() == (
        b"421 4.7.0 too many connections from your address, closing connection\r\n"
    )
    assert transport.disconnecting
    proto.connectionLost(None)
    assert proto.record.outcome == "too many connections from your address"


def test_smtp_the_device_limit_is_checked_at_auth(tmp_path: Path) -> None:
    gw = smtp_gateway(tmp_path, max_sessions_per_device=1)
    gw.connect().login()
    second = gw.connect()
    second.send(b"EHLO dev.local")
    reply = second.send(
        b"AUTH PLAIN " + test_smtp_server.b64(b"\0printer\0printer-pw"),
        b"MAIL FROM:<a@scan.example.com>",
    )
    assert reply == b"421 4.7.0 too many sessions of this device, closing connection\r\n"
    assert second.closed


def test_pop3_and_smtp_count_together(tmp_path: Path) -> None:
    shared = limits(max_sessions_per_device=1)
    smtp = smtp_gateway(tmp_path)
    pop3 = pop3_gateway()
    smtp.factory.limits = pop3.factory.limits = shared
    smtp.connect().login()
    dev = pop3.connect()
    dev.send(b"USER printer")
    assert dev.send(b"PASS printer-pw").startswith(b"-ERR [SYS/TEMP] too many sessions")


def test_smtp_a_session_over_its_lifetime_gets_421(tmp_path: Path) -> None:
    gw = smtp_gateway(tmp_path, max_session_lifetime=600)
    client = gw.connect()
    client.login()
    client.send(b"MAIL FROM:<a@scan.example.com>", b"RCPT TO:<b@example.org>", b"DATA")
    for _ in range(3):  # never idle
        client.raw(b"Subject: half a message\r\n")
        gw.clock.advance(190)
    assert not client.closed
    gw.clock.advance(600 - (gw.clock.seconds() - client.proto.record.started))
    assert client.read() == b"421 4.7.0 session lifetime exceeded, closing connection\r\n"
    assert client.closed
    client.proto.connectionLost(None)
    assert gw.queued == []  # no 250 was sent: nothing kept


# -- the metric ---------------------------------------------------------------------------


def test_each_refusal_is_counted_by_protocol_and_limit(tmp_path: Path) -> None:
    m = new_metrics()
    observe = MetricsObserver(m)
    gw = pop3_gateway(max_connections_per_address=1)
    gw.connect("10.0.0.1")
    globalLogPublisher.addObserver(observe)
    try:
        raw_connect(gw.factory, "10.0.0.1")
        raw_connect(gw.factory, "10.0.0.1")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert value(m, "gateway_connections_refused_total", protocol="pop3", limit="address") == 2
    observe(
        {
            "log_namespace": "gateway.limits",
            "log_level": LogLevel.warn,
            "protocol": "x\ny",
            "limit": "made-up",
        }
    )
    assert value(m, "gateway_connections_refused_total", protocol="other", limit="other") == 1
    assert value(m, "gateway_metrics_observer_errors_total") == 0


# -- [limits] in the configuration file ------------------------------------------------


def test_limits_section_and_its_defaults(config_dir: Path) -> None:  # noqa: F811
    assert load_config(write(config_dir, test_config.VALID)).limits == LimitSettings()
    text = test_config.VALID + (
        "\n[limits]\nmax_connections = 50\nmax_connections_per_address = 5\n"
        "max_sessions_per_device = 2\nmax_session_lifetime = 900\n"
    )
    assert load_config(write(config_dir, text)).limits == LimitSettings(50, 5, 2, 900.0)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("max_connections = 0", "limits.max_connections: must be between 1 and 1000000 (got 0)"),
        ("max_connections_per_address = -1", "limits.max_connections_per_address: must be"),
        ('max_sessions_per_device = "4"', "limits.max_sessions_per_device: expected an integer"),
        ("max_session_lifetime = 0", "limits.max_session_lifetime: must be a finite number"),
        ("max_sessions = 4", "limits.max_sessions: unknown"),
    ],
)
def test_limits_problems(config_dir: Path, entry: str, expected: str) -> None:  # noqa: F811
    found = test_config.all_problems(config_dir, test_config.VALID + f"\n[limits]\n{entry}\n")
    assert len(found) == 1 and found[0].startswith(expected), found


# -- behind a load balancer --------------------------------------------------------------


def test_the_proxy_protocol_address_is_the_one_counted() -> None:
    gw = pop3_gateway(max_connections_per_address=1)
    proxied = ProxyProtocolFactory(
        gw.factory,
        trusted=(ipaddress.ip_network("10.0.0.0/8"),),
        clock=gw.clock,
        header_timeout=10,
        name="pop3 0.0.0.0:995",
    )

    def via_balancer(client: str) -> bytes:
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.9.9.9", 40000))
        wrapper = proxied.buildProtocol(transport.getPeer())
        assert wrapper is not None
        wrapper.makeConnection(transport)
        wrapper.dataReceived(f"PROXY TCP4 {client} 10.1.1.1 5555 995\r\n".encode())
        answer: bytes = transport.value()
        return answer

    # All from the balancer's address, but each from its own device.
    assert via_balancer("192.0.2.7") == b"+OK POP3 gateway ready\r\n"
    assert via_balancer("192.0.2.8") == b"+OK POP3 gateway ready\r\n"
    assert via_balancer("192.0.2.7").startswith(b"-ERR [SYS/TEMP] too many connections from")
