"""The admin service in the gateway's service tree, on a MemoryReactor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory

from gateway.admin.listeners import CountingFactory, RecordingEndpoint
from gateway.admin.service import AdminService, admin_services
from gateway.admin.site import AdminSite
from gateway.config import load_config
from gateway.service import make_service
from tests.unit.test_admin_site import body_of, get
from tests.unit.test_service import write_config


def config_with_admin(tmp_path: Path, admin: str) -> Path:
    path = write_config(tmp_path)
    path.write_text(path.read_text() + "\n[admin]\n" + admin)
    return path


def admin_of(top: Any) -> AdminService:
    [admin] = [s for s in top if isinstance(s, AdminService)]
    return admin


def test_without_admin_section_nothing_is_added(tmp_path: Path) -> None:
    top = make_service(load_config(write_config(tmp_path)), MemoryReactorClock())
    assert "admin" not in [s.name for s in top]
    assert not any(isinstance(getattr(s, "factory", None), CountingFactory) for s in top)


def test_the_admin_service_watches_the_listeners_and_serves_plain_http_on_loopback(
    tmp_path: Path,
) -> None:
    reactor = MemoryReactorClock()
    top = make_service(load_config(config_with_admin(tmp_path, "port = 19925\n")), reactor)
    names = [s.name for s in top]
    assert names.index("admin") > names.index("smtp-starttls-0.0.0.0-5870")
    listeners = [
        s for s in top if s.name in ("pop3-implicit-0.0.0.0-9950", "smtp-starttls-0.0.0.0-5870")
    ]
    assert all(isinstance(s.factory, CountingFactory) for s in listeners)
    assert all(isinstance(s.endpoint, RecordingEndpoint) for s in listeners)
    [http] = admin_of(top)
    assert isinstance(http.factory, AdminSite)

    # Everything but the host name lookup, which wants a real thread pool.
    started = [s for s in top if s.name != "smtp-hostname"]
    for service in started:
        service.privilegedStartService()
        service.startService()
    try:
        ports = {port: interface for port, _factory, _backlog, interface in reactor.tcpServers}
        assert ports[19925] == "127.0.0.1"
        request = get(http.factory, b"/readyz")
        body = json.loads(body_of(request))
        assert request.responseCode == 200, body
        assert sorted(body["checks"]) == ["listeners", "spool", "state_dir"]
    finally:
        for service in reversed(started):
            service.stopService()


def test_https_off_loopback_with_the_gateway_certificate(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    config = load_config(config_with_admin(tmp_path, 'address = "0.0.0.0"\nport = 19926\n'))
    top = make_service(config, reactor)
    [http] = admin_of(top)
    assert isinstance(http.factory, TLSMemoryBIOFactory)


def test_the_observer_is_attached_only_while_running(tmp_path: Path) -> None:
    publisher = LogPublisher()
    config = load_config(config_with_admin(tmp_path, "port = 19927\n"))
    from gateway.runtime import Runtime

    runtime = Runtime(
        config=config, reactor=MemoryReactorClock(), identity=None, authenticator=None
    )  # type: ignore[arg-type]
    [admin] = admin_services(runtime, [], publisher=publisher)
    assert isinstance(admin, AdminService)
    event = {
        "log_namespace": "gateway.smtp.relay",
        "delivery": "deferred",
        "log_format": "",
    }
    publisher(event)
    assert not config.state_dir.exists()
    admin.startService()
    # Made at start (0700), so /readyz can check it before anything else needs it.
    assert config.state_dir.stat().st_mode & 0o777 == 0o700
    publisher(event)
    admin.stopService()
    publisher(event)
    assert (
        admin.metrics.registry.get_sample_value(
            "gateway_relay_deliveries_total", {"outcome": "deferred"}
        )
        == 1
    )
