"""The admin resource tree and the readiness checks, without a socket."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.web.test.requesthelper import DummyRequest

from gateway.admin.health import (
    Readiness,
    directory_writable,
    listeners_bound,
    spool_open,
    token_store_usable,
)
from gateway.admin.metrics import GatewayMetrics
from gateway.admin.site import AdminSite
from gateway.smtp.spool import SpoolDir


def get(site: AdminSite, path: bytes, headers: dict[bytes, bytes] | None = None) -> DummyRequest:
    segments = path.lstrip(b"/").split(b"/")
    request = DummyRequest(segments)
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    resource: Any = site.root
    while request.postpath and not resource.isLeaf:
        segment = request.postpath.pop(0)
        request.prepath.append(segment)
        resource = resource.getChildWithDefault(segment, request)
    body = resource.render(request)
    if isinstance(body, bytes):  # else the resource wrote it (NOT_DONE_YET)
        request.write(body)
    return request


def body_of(request: DummyRequest) -> bytes:
    return b"".join(request.written)


class Watch:
    def __init__(self, name: str, bound: bool, error: str | None = None) -> None:
        self.name, self.bound, self.error = name, bound, error


def site_with(checks: dict[str, Any]) -> AdminSite:
    metrics = GatewayMetrics(devices=lambda: ("printer",), listeners=lambda: (), process=False)
    return AdminSite(metrics.registry, Readiness(checks))


def test_metrics_in_prometheus_text_and_openmetrics() -> None:
    site = site_with({})
    request = get(site, b"/metrics")
    assert request.responseCode in (None, 200)
    content_type = request.responseHeaders.getRawHeaders(b"content-type")[0]
    assert content_type.startswith(b"text/plain; version=0.0.4")
    assert b'gateway_device_last_login_outcome{device="printer",outcome="none"} 1.0' in body_of(
        request
    )
    request = get(site, b"/metrics", {b"accept": b"application/openmetrics-text; version=1.0.0"})
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(
        b"application/openmetrics-text"
    )
    assert body_of(request).endswith(b"# EOF\n")


def test_healthz_is_alive_whatever_readiness_says() -> None:
    request = get(site_with({"broken": lambda: "down"}), b"/healthz")
    assert request.responseCode in (None, 200)
    assert json.loads(body_of(request)) == {"status": "alive", "failed": []}


def test_readyz_names_what_failed_with_503() -> None:
    site = site_with(
        {
            "listeners": listeners_bound(
                lambda: [
                    Watch("pop3-implicit-0.0.0.0-995", True),
                    Watch("smtp-starttls-0.0.0.0-587", False, "Address already in use"),
                ]
            ),
            "fine": lambda: None,
            "exploding": lambda: 1 // 0,
        }
    )
    request = get(site, b"/readyz")
    assert request.responseCode == 503
    body = json.loads(body_of(request))
    assert body["status"] == "not ready"
    assert body["failed"] == ["listeners", "exploding"]
    assert body["checks"]["fine"] == {"ok": True}
    assert body["checks"]["listeners"]["error"] == (
        "smtp-starttls-0.0.0.0-587: Address already in use"
    )
    assert "ZeroDivisionError" in body["checks"]["exploding"]["error"]


def test_readyz_200_when_every_check_passes() -> None:
    request = get(site_with({"a": lambda: None}), b"/readyz")
    assert request.responseCode == 200
    assert json.loads(body_of(request)) == {
        "status": "ready",
        "failed": [],
        "checks": {"a": {"ok": True}},
    }


def test_the_index_lists_the_endpoints_and_unknown_paths_are_404() -> None:
    site = site_with({})
    assert b"/readyz" in body_of(get(site, b"/"))
    assert get(site, b"/nothing").responseCode == 404


def test_state_directory_check(tmp_path: Path) -> None:
    check = directory_writable(tmp_path / "state")
    assert "No such file or directory" in (check() or "")
    (tmp_path / "state").mkdir()
    assert check() is None
    assert list((tmp_path / "state").iterdir()) == []


def test_spool_check(tmp_path: Path) -> None:
    spool = SpoolDir(tmp_path / "spool")
    check = spool_open(spool)
    assert "not open" in (check() or "")
    spool.prepare()
    spool.lock()
    try:
        assert check() is None
        spool.queue.rmdir()
        assert "missing" in (check() or "")
    finally:
        spool.unlock()


class FakeStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory


class FakeManager:
    def __init__(self, problem: str | None, store: FakeStore | None) -> None:
        self.store_problem, self.store = problem, store


def test_token_store_check(tmp_path: Path) -> None:
    def problem(manager: FakeManager) -> str | None:
        return token_store_usable(manager)()  # type: ignore[arg-type]

    assert problem(FakeManager("key file must be 0600", None)) == "key file must be 0600"
    assert problem(FakeManager(None, None)) == "token store not opened yet"
    assert "No such file" in (problem(FakeManager(None, FakeStore(tmp_path / "gone"))) or "")
    assert problem(FakeManager(None, FakeStore(tmp_path))) is None
