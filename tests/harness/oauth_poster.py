"""The test authorization server as a `FormPoster`, in memory, for unit tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from tests.harness.oauth_server import AuthServer

DEVICE_PATHS = ("/device", "/devicecode", "/device/code")


class InMemoryPoster:
    """A `FormPoster` answered by an `AuthServer` directly, without sockets.

    With `hold` set, answers wait until `release()`, so a test can line up
    concurrent callers behind one request in flight. `requests` records the
    (path, fields) of every POST, for asserting what was sent.
    """

    def __init__(self, server: AuthServer) -> None:
        self.server = server
        self.hold = False
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._held: list[tuple[Deferred[None], Deferred[dict[str, Any]]]] = []
        # Raise this instead of answering (e.g. OAuthUnavailable), once each.
        self.raise_next: list[Exception] = []

    async def post_form(
        self, url: str, fields: Any, *, ca_file: Path | None = None
    ) -> dict[str, Any]:
        from gateway.oauth.http import check_endpoint_url, interpret_response

        check_endpoint_url(url)
        path = urlsplit(url).path
        form = dict(fields)
        self.requests.append((path, form))
        if self.hold:
            gate: Deferred[None] = Deferred()
            self._held.append((gate, Deferred()))
            await gate
        if self.raise_next:
            raise self.raise_next.pop(0)
        if path.endswith("/token"):
            status, body = self.server.token(form, path)
        elif path.endswith(DEVICE_PATHS):
            status, body = self.server.device_authorization(form, path)
        elif path.endswith("/revoke"):
            status, body = self.server.revocation(form, path)
            if status == 200:  # Google answers an empty body
                return interpret_response(url, status, b"")
        else:
            status, body = 404, {"error": "not_found"}
        return interpret_response(url, status, json.dumps(body).encode())

    @property
    def held(self) -> int:
        return len(self._held)

    def release(self) -> None:
        self.hold = False
        held, self._held = self._held, []
        for gate, _ in held:
            gate.callback(None)

    def count(self, path: str, grant: str | None = None) -> int:
        return sum(
            1
            for p, form in self.requests
            if p == path and (grant is None or form.get("grant_type") == grant)
        )
