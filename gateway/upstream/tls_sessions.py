"""TLS session resumption to upstreams: one kept session per (host, port, trust root).

Every device poll opens a new upstream connection; with a full handshake each
time the provider signs a handshake per login and the gateway verifies the
chain again (measured in memory with an ECDSA chain: ~0.8 ms of client CPU for
a full TLS 1.3 handshake against ~0.3 ms resumed). Here the session of the
last cleanly closed connection to an endpoint is offered on the next one.

Verification stays as strict as a full handshake:

- a session is only ever offered by the `ResumingTLS` of the very host name,
  port and trust root its full handshake was verified for (one object per
  key, and pyOpenSSL refuses a session from another `Context`); a provider
  entry naming the same server by another name (an IP address, an alias)
  gets its own full handshake;
- Twisted checks the host name in its verify callback, which OpenSSL only
  runs when it verifies a chain, not on resumption: `check_resumed` checks
  the name against the session's certificate again on a resumed connection,
  before any credential is sent;
- a chain is verified afresh at least every `MAX_AGE` seconds per endpoint
  (a resumed connection's new ticket inherits the age of the handshake it
  descends from), so an expired or replaced certificate is noticed;
- only the session of a connection whose TLS layer we shut down (close_notify
  sent: at QUIT/LOGOUT, and on an abort, where Twisted sends one too) is
  kept; a connection that broke at the TLS layer never is (OpenSSL marks
  such a session not resumable anyway).

TLS 1.3 tickets arrive after the handshake, so the session is taken when the
connection closes (at QUIT/LOGOUT), not when it opens. A server that does not
resume (a new process per connection, ticket keys per process) costs nothing
but the ticket in the ClientHello.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

from OpenSSL import SSL, crypto
from service_identity import VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from gateway.tls import client_options
from gateway.upstream.resolve import ip_literal

# Seconds after a full handshake (chain and name verified) during which its
# session, and the tickets of connections resumed from it, may be offered.
MAX_AGE = 3600.0


def _binding_session_reused() -> Callable[[SSL.Connection], bool] | None:
    # pyOpenSSL does not wrap SSL_session_reused (newer versions may, as a
    # method); the binding it is built on has it.
    try:
        from OpenSSL._util import lib
    except ImportError:
        return None
    reused = getattr(lib, "SSL_session_reused", None)
    if reused is None:
        return None
    return lambda connection: bool(reused(connection._ssl))


_session_reused = _binding_session_reused()


def session_reused(connection: SSL.Connection) -> bool:
    """Whether the handshake of `connection` resumed a session (True when
    that cannot be told, so the host name is checked once more)."""
    method = getattr(SSL.Connection, "session_reused", None)
    if method is not None:
        return bool(method(connection))
    if _session_reused is not None:
        return _session_reused(connection)
    return True


@implementer(IOpenSSLClientConnectionCreator)
class ResumingTLS:
    """Twisted's verified client options for one endpoint, offering the kept session."""

    def __init__(
        self,
        options: IOpenSSLClientConnectionCreator,
        host: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_age: float = MAX_AGE,
    ) -> None:
        self._options = options
        self._host = host
        self._clock = clock
        self._max_age = max_age
        self._session: SSL.Session | None = None
        self._verified_at = 0.0
        # The certificate (DER) a resumed connection last passed `check_resumed` with.
        self._checked: bytes | None = None
        # Connections offered a session -> when that session was verified.
        self._offered: WeakKeyDictionary[SSL.Connection, float] = WeakKeyDictionary()

    @property
    def host(self) -> str:
        return self._host

    @property
    def session(self) -> SSL.Session | None:
        """The session the next connection is offered, if any."""
        if self._session is not None and self._clock() - self._verified_at >= self._max_age:
            self._session = None
        return self._session

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        # Twisted's verify callback holds the TLS protocol until OpenSSL calls
        # it, which a resumed handshake never does, and pyOpenSSL keeps the
        # callback in a reference cycle: given only a weak proxy, the
        # protocol goes with its connection rather than at a full collection.
        protocol: Any = weakref.proxy(tlsProtocol)
        connection: SSL.Connection = self._options.clientConnectionForTLS(protocol)
        session = self.session
        if session is not None:
            try:
                connection.set_session(session)
            except (ValueError, SSL.Error):
                # Another Context (the options were rebuilt): a full handshake.
                self._session = None
            else:
                self._offered[connection] = self._verified_at
        return connection

    def check_resumed(self, connection: SSL.Connection) -> None:
        """On a resumed connection, check the host name against the certificate.

        Raises `VerificationError` (service_identity's) if it does not match.
        """
        if not session_reused(connection):
            return
        certificate = connection.get_peer_certificate()
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate) if certificate else None
        if der is not None and der == self._checked:
            # This very certificate passed the same check for this name before.
            return
        if ip_literal(self._host) is None:
            verify_hostname(connection, self._host)
        else:
            verify_ip_address(connection, self._host)
        self._checked = der

    def keep(self, connection: SSL.Connection) -> None:
        """The connection is over: keep its session if it ended cleanly."""
        offered_at = self._offered.pop(connection, None)
        if not connection.get_shutdown() & SSL.SENT_SHUTDOWN:
            return
        session = connection.get_session()
        if session is None:
            return
        if offered_at is not None and session_reused(connection):
            verified_at = offered_at
        else:
            verified_at = self._clock()
        if self._clock() - verified_at >= self._max_age:
            return
        self._session = session
        self._verified_at = verified_at


@functools.lru_cache(maxsize=256)
def resuming_options(host: str, port: int, ca_file: Path | None) -> ResumingTLS:
    """The options, with session resumption, for one upstream endpoint.

    Cached per (host, port, CA file) like `client_options`; a changed CA
    file needs a restart. Raises `TLSSetupError` for a CA file that cannot be used.
    """
    return ResumingTLS(client_options(host, ca_file), host)


__all__ = ["MAX_AGE", "ResumingTLS", "VerificationError", "resuming_options", "session_reused"]
