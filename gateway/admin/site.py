"""The admin listener's resource tree, built in one place.

`/metrics` (Prometheus exposition, or OpenMetrics when the scraper asks for
it), `/healthz` and `/readyz` (JSON). The web console adds its pages to the
same root (`AdminSite.root.putChild`), so one listener, one TLS setting and
one place decide what the admin side serves.

Everything here runs in the reactor thread: a scrape reads the gateway's
state objects, which only that thread may touch.
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from twisted.web.http import Request as HTTPRequest
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from gateway.admin.health import Readiness

ENDPOINTS = {
    "/metrics": "Prometheus metrics",
    "/healthz": "the process runs (200)",
    "/readyz": "the gateway can serve devices (200), or what is wrong (503)",
}


def _json(request: Request, status: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, sort_keys=True).encode() + b"\n"


class MetricsPage(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"content-type", content_type.encode())
        request.setHeader(b"cache-control", b"no-store")
        output: bytes = encoder(self._registry)
        return output


class HealthPage(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, {"status": "alive", "failed": []})


class ReadyPage(Resource):
    isLeaf = True

    def __init__(self, readiness: Readiness) -> None:
        super().__init__()
        self._readiness = readiness

    def render_GET(self, request: Request) -> bytes:
        ready, body = self._readiness.report()
        return _json(request, 200 if ready else 503, body)


class Index(Resource):
    """`/`: what is here, for an admin who opens the address in a browser;
    with the web console, the browser goes there."""

    console = False

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"":
            return self
        return notFound()

    def render_GET(self, request: Request) -> bytes:
        if self.console:
            request.setResponseCode(303)
            request.setHeader(b"location", b"/console/")
            return b""
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        lines = ["mail gateway admin listener", ""]
        lines += [f"{path}  {what}" for path, what in ENDPOINTS.items()]
        return ("\n".join(lines) + "\n").encode()


class AdminSite(Site):
    """The HTTP factory of the admin listener. Requests are not logged: a
    scrape every few seconds would fill the gateway's log with them."""

    noisy = False

    def __init__(self, registry: CollectorRegistry, readiness: Readiness) -> None:
        self.root = Index()
        self.root.putChild(b"metrics", MetricsPage(registry))
        self.root.putChild(b"healthz", HealthPage())
        self.root.putChild(b"readyz", ReadyPage(readiness))
        super().__init__(self.root)
        self.displayTracebacks = False

    def add_console(self, console: IResource) -> None:
        """Serve the web console (`gateway.admin.console`) at `/console/`."""
        self.root.putChild(b"console", console)
        self.root.console = True

    def log(self, request: HTTPRequest) -> None:
        pass
