"""OAuth HTTP over real loopback sockets: treq against the test authorization
server, TLS verification, timeouts, redirects refused, failures sorted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.internet.ssl import PrivateCertificate
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource
from twisted.web.server import Site

from gateway.oauth.errors import InsecureEndpoint, OAuthEndpointError, OAuthUnavailable
from gateway.oauth.http import TreqPoster, check_endpoint_url, interpret_response
from tests.harness.certs import make_tls_material
from tests.harness.oauth_server import AuthServer

FORM = {"grant_type": "client_credentials", "client_id": "gateway", "client_secret": "cs"}


@pytest.fixture
def server() -> Iterator[AuthServer]:
    auth = AuthServer(client_secret="cs", client_credentials_user="alice")
    port = auth.listen(reactor)
    yield auth
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def poster() -> TreqPoster:
    return TreqPoster(reactor, timeout=5)


# -- pure classification ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "kind", "code"),
    [
        (
            400,
            {"error": "invalid_grant", "error_description": "AADSTS70008 expired"},
            OAuthEndpointError,
            "invalid_grant",
        ),
        (401, {"error": "invalid_client"}, OAuthEndpointError, "invalid_client"),
        (400, {"error": "temporarily_unavailable"}, OAuthUnavailable, None),
        (500, {"error": "server_error"}, OAuthUnavailable, None),
        (503, {}, OAuthUnavailable, None),
        (429, {}, OAuthUnavailable, None),
        (404, {}, OAuthEndpointError, "http_404"),
        (302, {}, OAuthEndpointError, "http_302"),
        (200, [], OAuthUnavailable, None),
    ],
)
def test_answers_are_sorted(
    status: int, body: Any, kind: type[Exception], code: str | None
) -> None:
    with pytest.raises(kind) as info:
        interpret_response("https://id.example/token?x=1", status, json.dumps(body).encode())
    if code is not None:
        assert info.value.code == code  # type: ignore[attr-defined]
    assert "x=1" not in str(info.value)


def test_provider_words_are_bounded_and_printable() -> None:
    body = {"error": "invalid_grant", "error_description": "line\r\nbreak" + "x" * 1000}
    with pytest.raises(OAuthEndpointError) as info:
        interpret_response("https://id.example/token", 400, json.dumps(body).encode())
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://login.microsoftonline.com/x/token", True),
        ("http://127.0.0.1:8080/token", True),
        ("http://[::1]:8080/token", True),
        ("http://localhost/token", True),
        ("http://login.example.com/token", False),
        ("http://10.0.0.1/token", False),
        ("ftp://127.0.0.1/token", False),
        ("https:///token", False),
    ],
)
def test_only_https_except_loopback(url: str, ok: bool) -> None:
    if ok:
        check_endpoint_url(url)
    else:
        with pytest.raises(InsecureEndpoint):
            check_endpoint_url(url)


# -- real sockets -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_token_request_over_loopback(server: AuthServer, poster: TreqPoster) -> None:
    answer = await poster.post_form(f"{server.base_url}/token", FORM)
    assert answer["token_type"] == "Bearer" and answer["access_token"] in server.access
    assert server.counts["token:client_credentials"] == 1


@pytest_twisted.ensureDeferred
async def test_oauth_error_over_loopback(server: AuthServer, poster: TreqPoster) -> None:
    with pytest.raises(OAuthEndpointError) as info:
        await poster.post_form(f"{server.base_url}/token", {**FORM, "client_secret": "wrong"})
    assert info.value.code == "invalid_client"
    assert "wrong" not in str(info.value)


@pytest_twisted.ensureDeferred
async def test_plain_http_elsewhere_is_never_contacted(poster: TreqPoster) -> None:
    with pytest.raises(InsecureEndpoint):
        await poster.post_form("http://login.example.com/token", FORM)


@pytest_twisted.ensureDeferred
async def test_timeout_covers_a_server_that_never_answers(server: AuthServer) -> None:
    server.hold = True
    poster = TreqPoster(reactor, timeout=0.3)
    with pytest.raises(OAuthUnavailable, match=r"no answer within 0\.3 s"):
        await poster.post_form(f"{server.base_url}/token", FORM)
    server.release()


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_temporary(poster: TreqPoster) -> None:
    from tests.harness.gateway_process import free_port

    with pytest.raises(OAuthUnavailable) as info:
        await poster.post_form(f"http://127.0.0.1:{free_port()}/token", FORM)
    assert "127.0.0.1" in str(info.value)


class _Redirect(Resource):
    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        request.setResponseCode(307)
        request.setHeader(b"location", b"http://127.0.0.1:9/elsewhere")
        return b""


class _Huge(Resource):
    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return b'{"access_token": "' + b"x" * (1024 * 1024) + b'"}'


@pytest.fixture
def odd_site() -> Iterator[str]:
    root = Resource()
    root.putChild(b"redirect", _Redirect())
    root.putChild(b"huge", _Huge())
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}"
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_redirect_is_not_followed(odd_site: str, poster: TreqPoster) -> None:
    with pytest.raises(OAuthEndpointError) as info:
        await poster.post_form(f"{odd_site}/redirect", FORM)
    assert info.value.code == "http_307"


@pytest_twisted.ensureDeferred
async def test_oversized_answer_is_refused(odd_site: str, poster: TreqPoster) -> None:
    with pytest.raises(OAuthUnavailable, match="larger than"):
        await poster.post_form(f"{odd_site}/huge", FORM)


# -- TLS -------------------------------------------------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """The test authorization server behind TLS, with a certificate for localhost."""
    material = make_tls_material(tmp_path / "idp", names=("localhost",))
    stranger = make_tls_material(tmp_path / "stranger", names=("localhost",))
    pem = material.certificate.read_bytes() + material.private_key.read_bytes()
    options = PrivateCertificate.loadPEM(pem).options()
    auth = AuthServer(client_secret="cs", client_credentials_user="alice")
    site: Factory = Site(auth.resource())
    port = reactor.listenTCP(0, TLSMemoryBIOFactory(options, False, site), interface="127.0.0.1")
    yield f"https://localhost:{port.getHost().port}", material.ca_file, stranger.ca_file
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_https_verified_against_the_providers_ca(tls_server: Any) -> None:
    url, ca_file, _ = tls_server
    answer = await TreqPoster(reactor, timeout=5).post_form(f"{url}/token", FORM, ca_file=ca_file)
    assert answer["token_type"] == "Bearer"


@pytest_twisted.ensureDeferred
async def test_https_from_another_ca_is_refused(tls_server: Any) -> None:
    url, _, stranger = tls_server
    with pytest.raises(OAuthUnavailable):
        await TreqPoster(reactor, timeout=5).post_form(f"{url}/token", FORM, ca_file=stranger)
