"""The device-facing side: `[tls]`, the `[[pop3.listen]]` / `[[smtp.listen]]`
tables, the check that no two listeners want one port, and that a listener
expecting a PROXY protocol header has proxies to trust."""

from __future__ import annotations

import ipaddress
from typing import Final

from OpenSSL import crypto

from gateway.config.reader import Reader, Table
from gateway.config.secrets import check_secret_file
from gateway.model import (
    TLS_MODES,
    TLS_VERSIONS,
    DeviceProtocol,
    Listener,
    ProxySettings,
    TLSFiles,
    UpstreamProtocol,
    field_default,
)
from gateway.tls import ServerIdentity, TLSSetupError, load_server_identity

# Well-known ports, so that an endpoint or listener needs a port only when it
# is unusual.
DEFAULT_PORTS: Final[dict[tuple[UpstreamProtocol, str], int]] = {
    ("pop3", "implicit"): 995,
    ("pop3", "starttls"): 110,
    ("imap", "implicit"): 993,
    ("imap", "starttls"): 143,
    ("smtp", "implicit"): 465,
    ("smtp", "starttls"): 587,
}


def default_port(protocol: UpstreamProtocol, tls: str | None) -> int | None:
    return DEFAULT_PORTS.get((protocol, tls)) if tls is not None else None


def tls_section(root: Table, *, wanted_by: int) -> TLSFiles | None:
    if not root.has("tls"):
        if wanted_by:
            root.problem("tls", "missing: listeners need certificate and private_key")
        return None
    table = root.table("tls")
    certificate = table.existing_file("certificate")
    private_key = table.existing_file("private_key")
    table.finish()
    if certificate is None or private_key is None:
        return None
    check_secret_file(table, "private_key", private_key)
    files = TLSFiles(certificate=certificate, private_key=private_key)
    try:
        identity = load_server_identity(files)
    except TLSSetupError as e:
        # gateway.tls already names the key; its messages never show key material.
        key, _, message = str(e).partition(": ")
        table.reader.add(key if key.startswith("tls.") else "tls", message or str(e))
        return None
    if not _key_matches_certificate(identity):
        table.problem("private_key", f"{private_key}: does not match the certificate")
        return None
    return files


def _key_matches_certificate(identity: ServerIdentity) -> bool:
    """A swapped key file would otherwise surface as every handshake failing."""
    certificate_key = identity.certificate.get_pubkey()
    return crypto.dump_publickey(crypto.FILETYPE_ASN1, certificate_key) == crypto.dump_publickey(
        crypto.FILETYPE_ASN1, identity.key
    )


def listeners(table: Table, protocol: DeviceProtocol) -> tuple[Listener, ...]:
    built = []
    for entry in table.tables("listen"):
        listener = _listener(entry, protocol)
        if listener is not None:
            table.reader.listeners.append((entry.path, listener))
            built.append(listener)
    return tuple(built)


def _listener(table: Table, protocol: DeviceProtocol) -> Listener | None:
    mark = table.reader.mark()
    tls = table.choice("tls", TLS_MODES)
    port = table.integer("port", default_port(protocol, tls), low=1, high=65535)
    address = table.string("address", field_default(Listener, "address"))
    if address is not None and not is_ip_address(address):
        table.problem("address", f"{address!r} is not an IP address (0.0.0.0 or :: means all)")
    min_tls = table.choice("min_tls", TLS_VERSIONS, field_default(Listener, "min_tls"))
    plaintext = table.boolean(
        "allow_plaintext_auth", field_default(Listener, "allow_plaintext_auth")
    )
    proxy_protocol = table.boolean("proxy_protocol", field_default(Listener, "proxy_protocol"))
    table.finish()
    if (
        not table.reader.clean_since(mark)
        or tls is None
        or port is None
        or address is None
        or min_tls is None
        or plaintext is None
        or proxy_protocol is None
    ):
        return None
    return Listener(
        protocol=protocol,
        port=port,
        tls=tls,
        address=address,
        min_tls=min_tls,
        allow_plaintext_auth=plaintext,
        proxy_protocol=proxy_protocol,
    )


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_listener_overlap(reader: Reader) -> None:
    """Two listeners on one port would otherwise fail only at startup."""
    seen: list[tuple[str, Listener]] = []
    for path, listener in reader.listeners:
        for other_path, other in seen:
            if listener.port == other.port and addresses_overlap(listener.address, other.address):
                reader.add(
                    f"{path}.port",
                    f"{listener.address} port {listener.port} is already taken by {other_path}",
                )
                break
        seen.append((path, listener))


def addresses_overlap(a: str, b: str) -> bool:
    """Whether two listeners on one port would fight over it. "::" counts as
    every IPv4 address too: Twisted listens dual-stack there on Linux."""
    ip_a, ip_b = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if ip_a == ip_b:
        return True
    for wildcard, other in ((ip_a, ip_b), (ip_b, ip_a)):
        if wildcard.is_unspecified and (wildcard.version == 6 or other.version == 4):
            return True
    return False


def check_proxy_listeners(reader: Reader, proxy: ProxySettings) -> None:
    """A header is a claim anyone could make: without trusted networks a
    listener expecting one would refuse every connection."""
    if proxy.trusted:
        return
    for path, listener in reader.listeners:
        if listener.proxy_protocol:
            reader.add(
                f"{path}.proxy_protocol",
                "needs [proxy] trusted naming the networks of the proxies that send the header",
            )
