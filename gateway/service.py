"""Turns a loaded configuration into running Twisted services.

Listening happens inside services so that twistd binds low ports (110, 995)
before it drops privileges with --uid/--gid.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from gateway.devices import DeviceAuthenticator
from gateway.locks import AccountLocks
from gateway.maildrop import Maildrop
from gateway.model import Account, Config, Listener
from gateway.pop3.server import POP3ServerFactory
from gateway.tls import load_server_identity, server_context_factory
from gateway.upstream.pop3_maildrop import open_pop3_maildrop

log = Logger(namespace="gateway.service")


def listen_endpoint(reactor: Any, listener: Listener) -> IStreamServerEndpoint:
    address = ipaddress.ip_address(listener.address)
    endpoint = TCP6ServerEndpoint if address.version == 6 else TCP4ServerEndpoint
    return endpoint(reactor, listener.port, interface=listener.address)


def make_service(config: Config, reactor: Any) -> MultiService:
    top = MultiService()
    top.setName("gateway")
    locks = AccountLocks()
    authenticator = DeviceAuthenticator(config.devices)

    async def open_maildrop(account: Account) -> Maildrop:
        provider = config.providers[account.provider]
        return await open_pop3_maildrop(account, provider, reactor=reactor)

    identity = load_server_identity(config.tls) if config.tls else None
    for listener in config.pop3.listeners:
        assert identity is not None, "config validation requires [tls] for listeners"
        tls_options = server_context_factory(identity, listener)
        factory = POP3ServerFactory(
            listener=listener,
            tls_options=tls_options if listener.tls == "starttls" else None,
            authenticator=authenticator,
            accounts=config.accounts,
            open_maildrop=open_maildrop,
            locks=locks,
            clock=reactor,
            idle_timeout=config.pop3.idle_timeout,
        )
        wrapped = (
            TLSMemoryBIOFactory(tls_options, False, factory)
            if listener.tls == "implicit"
            else factory
        )
        service = StreamServerEndpointService(listen_endpoint(reactor, listener), wrapped)
        service.setName(f"pop3-{listener.tls}-{listener.address}-{listener.port}")
        service.setServiceParent(top)
        log.info(
            "pop3 listener on {address}:{port} tls={tls} min_tls={min_tls}",
            address=listener.address,
            port=listener.port,
            tls=listener.tls,
            min_tls=listener.min_tls,
        )
    return top
