"""Opening a connection to an upstream server, shared by the POP3, IMAP and SMTP clients.

The three clients connect the same way: verified TLS options for the host,
an endpoint (implicit TLS wrapped around it), a quiet factory and a connect
timeout of our own. They differ only in the protocol they speak and in the
exception a failure must become (a `MaildropError` for the maildrop clients,
`SMTPUpstreamError` for the relay), so those are parameters here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar
from typing import Protocol as TypingProtocol

from OpenSSL import SSL
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory

from gateway.model import Endpoint, Provider
from gateway.timing import protocol_of, timed_step
from gateway.tls import TLSSetupError
from gateway.upstream.errors import UpstreamError, UpstreamUnavailable, describe_error
from gateway.upstream.pipeline import PipelinedClient
from gateway.upstream.resolve import CachedHostEndpoint, cache_for
from gateway.upstream.tls_sessions import ResumingTLS, VerificationError, resuming_options
from gateway.upstream.tls_stream import wrap_client_tls

EndpointFactory: TypeAlias = Callable[[Any, str, int, float], IStreamClientEndpoint]
ErrorFactory: TypeAlias = Callable[[str], Exception]

_Client = TypeVar("_Client", bound="PipelinedClient[Any]", covariant=True)
_T = TypeVar("_T")


class Abortable(TypingProtocol):
    def abort(self, detail: str = ...) -> None: ...


# Greeting, capabilities and STARTTLS of one protocol, on a connected client.
SetUp: TypeAlias = Callable[[_Client, str, IOpenSSLClientConnectionCreator], Awaitable[object]]


class ClientFactory(TypingProtocol[_Client]):
    """How every upstream client class is built: `POP3Client`, `IMAPClient`, `SMTPClient`."""

    def __call__(self, clock: IReactorTime, timeout: float, *, peer: str) -> _Client: ...


def hostname_endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """The default: the host's addresses from a per-reactor cache (`gateway.upstream.resolve`).

    A name is resolved off the reactor thread at most once a minute rather
    than on every login; an IP address is connected to directly.
    """
    return CachedHostEndpoint(reactor, host, port, timeout, cache_for(reactor))


async def open_connection(
    provider: Provider,
    server: Endpoint,
    client: ClientFactory[_Client],
    *,
    reactor: Any,
    endpoint_factory: EndpointFactory,
    secure: SetUp[_Client],
    error: ErrorFactory = UpstreamUnavailable,
    passthrough: type[Exception] | tuple[type[Exception], ...] = UpstreamError,
    setup_error: ErrorFactory | None = None,
) -> _Client:
    """Connect to `server` of `provider` and return the client, set up and secured.

    What happens after the TCP (or implicit TLS) connection is up (greeting,
    capabilities, STARTTLS) is per protocol: `secure(client, server.tls,
    tls_options)`, given the verified TLS options for a STARTTLS on the same
    connection. If it fails, the client is dropped (`or_abort`).

    Failures to connect raise `error(detail)`; a TLS setup problem (a bad CA file) raises
    `setup_error(detail)` when given, as that is the administrator's to fix.
    Exceptions of the `passthrough` types (the protocol's own errors) and
    cancellation are raised as they are. `reactor` must provide IReactorTime
    (and whatever the endpoint needs).
    """
    peer = f"provider {provider.name} ({server.host}:{server.port})"
    try:
        tls = resuming_options(server.host, server.port, provider.ca_file)
    except TLSSetupError as e:
        raise (setup_error or error)(f"provider {provider.name}: {e}") from None
    endpoint = endpoint_factory(reactor, server.host, server.port, provider.timeout)
    if server.tls == "implicit":
        endpoint = wrap_client_tls(tls, endpoint, reactor)

    built: list[_Client] = []

    def build() -> _Client:
        protocol = client(reactor, provider.timeout, peer=peer)
        built.append(protocol)
        return protocol

    factory = Factory.forProtocol(build)
    factory.noisy = False  # one "Starting factory" log line per session says nothing
    connecting = endpoint.connect(factory)
    # Our own timer rather than Deferred.addTimeout: endpoints answer a
    # cancel with their own error types, and the message should say "timeout".
    timed_out = False

    def give_up() -> None:
        nonlocal timed_out
        timed_out = True
        connecting.cancel()

    timer = reactor.callLater(provider.timeout, give_up)
    step = protocol_of(provider, server)
    try:
        protocol = await timed_step(step, provider.name, "connect", connecting)
        # The same object, typed as the client class it was built from.
        connected = next(p for p in built if p is protocol)
        # The factory (reachable from Twisted's connector for as long as that
        # lives) must not keep the client and its session alive.
        built.clear()
    except Exception as e:
        if timed_out:
            raise error(
                f"cannot connect to {peer}: no connection within {provider.timeout:g} s"
            ) from None
        if isinstance(e, passthrough) or isinstance(e, CancelledError):
            raise
        raise error(f"cannot connect to {peer}: {describe_error(e)}") from None
    finally:
        if timer.active():
            timer.cancel()
    secured = timed_step(step, provider.name, "tls", secure(connected, server.tls, tls))
    await or_abort(connected, secured, "connection set-up failed")
    _resume_later(connected, tls, peer, error)
    return connected


def _resume_later(
    client: PipelinedClient[Any], tls: ResumingTLS, peer: str, error: ErrorFactory
) -> None:
    """After the handshake: check a resumed session's host name, and keep the
    connection's session for the next one once it is over (`gateway.upstream.tls_sessions`)."""
    get_handle = getattr(client.transport, "getHandle", None)
    handle = get_handle() if get_handle is not None else None
    if not isinstance(handle, SSL.Connection):
        return
    try:
        tls.check_resumed(handle)
    except VerificationError as e:
        client.abort("the resumed session's certificate does not match")
        raise error(f"cannot connect to {peer}: certificate verify failed: {e}") from None
    client.when_closed().addCallback(_keep_session, tls, handle)


def _keep_session(_: object, tls: ResumingTLS, handle: SSL.Connection) -> None:
    tls.keep(handle)


async def or_abort(client: Abortable, step: Awaitable[_T], why: str) -> _T:
    """Await a set-up `step` on `client`; if it fails, drop the client before the error goes on.

    A session that failed half-way set up (greeting, TLS, login, the first
    listing) is never handed out, and never left connected.
    """
    try:
        return await step
    except BaseException:
        client.abort(why)
        raise
