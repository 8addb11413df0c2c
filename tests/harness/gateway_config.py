"""Pieces of the gateway configuration the real-twistd tests write: the head
every such gateway has (its state directory and its own certificate), loopback
listeners and upstream providers. Each returns TOML lines for a test's list of
lines, so a test's configuration still reads top to bottom in the test."""

from __future__ import annotations

from pathlib import Path

from tests.harness.certs import TLSMaterial


def config_head(state: Path, own: TLSMaterial) -> list[str]:
    """The state directory and the certificate the gateway's TLS listeners present."""
    return [
        f'state_dir = "{state}"',
        "[tls]",
        f'certificate = "{own.certificate}"',
        f'private_key = "{own.private_key}"',
    ]


def listen(protocol: str, port: int, tls: str) -> list[str]:
    """One `[[pop3.listen]]` / `[[smtp.listen]]` table on 127.0.0.1."""
    return [f"[[{protocol}.listen]]", f'address = "127.0.0.1"\nport = {port}\ntls = "{tls}"']


def provider(
    name: str,
    protocol: str,
    port: int,
    tls: str,
    ca_file: Path,
    *,
    timeout: int | None = None,
    host: str = "localhost",
) -> list[str]:
    """A `[providers.NAME]` table with one upstream endpoint and its CA."""
    lines = [
        f"[providers.{name}]",
        f'{protocol} = {{ host = "{host}", port = {port}, tls = "{tls}" }}',
        f'ca_file = "{ca_file}"',
    ]
    if timeout is not None:
        lines.append(f"timeout = {timeout}")
    return lines
