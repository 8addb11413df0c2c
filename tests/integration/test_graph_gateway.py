"""Graph-backed accounts through the real gateway (twistd child process): the
Graph emulator (a thread of this process) stands in for Microsoft Graph and
checks every bearer token by introspection at the suite's authorization
server (a child process), whose tokens the gateway refreshes as for any
OAuth2 account. Devices are poplib, curl, mpop and fetchmail."""

from __future__ import annotations

import poplib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.certs import TLSMaterial
from tests.harness.gateway_process import GatewayProcess, free_port
from tests.harness.graph_emulator import GraphEmulator, IntrospectedTokens
from tests.harness.oauth_server import OAuthServerProcess
from tests.helpers.device_grant import store_device_grant
from tests.helpers.graph import graph_gateway_config, top_of, varied_mime, wire
from tests.helpers.pop3_programs import (
    Connect,
    drop,
    fetchmail_download,
    logged_in_clients,
    mpop_download,
    run,
)

pytestmark = pytest.mark.integration

CLIENT_SECRET = "graph-client-secret"
# The gateway asks for Graph's own scopes, on the host of the provider's graph_url.
GRAPH_SCOPE = "https://127.0.0.1/Mail.ReadWrite"
ACCOUNTS: dict[str, dict[str, Any]] = {
    "scanner": {},
    "mover": {"on_delete": "move", "move_to": "Processed"},
    "trash": {"on_delete": "move", "move_to": "deleteditems"},
    "keeper": {"on_delete": "keep"},
    "seer": {"mark_seen": True, "on_delete": "keep"},
    "scans": {"folder": "Inbox/Scans"},
}
DEVICES = {
    "printer": "scanner",
    "copier": "scanner",
    "mover-dev": "mover",
    "trash-dev": "trash",
    "keeper-dev": "keeper",
    "seer-dev": "seer",
    "scans-dev": "scans",
}


def authorize(state: Path, idp: OAuthServerProcess, account: str, user: str = "alice") -> None:
    """Tokens for `account` (mailbox `user`) as `gateway oauth authorize` would store them."""
    store_device_grant(state, idp, account, CLIENT_SECRET, user)


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OAuthServerProcess]:
    with OAuthServerProcess(tmp_path_factory.mktemp("idp-graph"), client_secret=CLIENT_SECRET) as s:
        yield s


@pytest.fixture(scope="module")
def graph(idp: OAuthServerProcess) -> Iterator[GraphEmulator]:
    with GraphEmulator(IntrospectedTokens(f"{idp.url}/introspect", scope=GRAPH_SCOPE)) as emulator:
        yield emulator


@pytest.fixture(scope="module")
def graph_ports() -> dict[str, int]:
    return {"implicit": free_port(), "starttls": free_port()}


@pytest.fixture(scope="module")
def graph_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    graph: GraphEmulator,
    idp: OAuthServerProcess,
    tls_gateway: TLSMaterial,
    graph_ports: dict[str, int],
) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("gateway-graph")
    secret = base / "client-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    secret.chmod(0o600)
    state = base / "state"
    text = graph_gateway_config(
        state, graph_ports, graph.url, idp.url, secret, tls_gateway, ACCOUNTS, DEVICES
    )
    for name in ACCOUNTS:
        authorize(state, idp, name)
    with GatewayProcess(base, text, list(graph_ports.values())) as gw:
        yield gw


@pytest.fixture
def box(graph: GraphEmulator, graph_gateway: GatewayProcess) -> Any:
    """alice's mailbox, emptied, with the folders the accounts use."""
    mailbox = graph.mailbox("alice")
    with graph.lock:
        mailbox.messages.clear()
        graph.throttles.clear()
        graph.value_delay = 0.0
    mailbox.make_folder("Processed")
    mailbox.make_folder("Inbox/Scans")
    mailbox.make_folder("Archive/Old")
    graph.reset_counts()
    return mailbox


@pytest.fixture
def pop(
    graph_gateway: GatewayProcess,
    graph_ports: dict[str, int],
    ctx: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Connect]:
    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)
    with logged_in_clients(graph_ports["implicit"], ctx, timeout=60) as connect:
        yield connect


def retr(client: poplib.POP3, n: int) -> bytes:
    return b"".join(line + b"\r\n" for line in client.retr(n)[1])


def test_stat_list_uidl_top_retr_byte_exact(pop: Connect, box: Any, graph: GraphEmulator) -> None:
    mimes = varied_mime()
    for m in mimes:
        box.add(m)
    client = pop()
    count, octets = client.stat()
    assert count == len(mimes)
    assert octets == sum(len(wire(m)) for m in mimes)
    listing = [line.split() for line in client.list()[1]]
    assert [int(size) for _, size in listing] == [len(wire(m)) for m in mimes]
    for n, mime in enumerate(mimes, 1):
        got = retr(client, n)
        assert got == wire(mime)
        assert len(got) == int(listing[n - 1][1])  # LIST equals RETR
        top = b"".join(line + b"\r\n" for line in client.top(n, 2)[1])
        assert top == top_of(mime, 2)
    uidls = [line.split()[1].decode() for line in client.uidl()[1]]
    assert len(set(uidls)) == len(mimes)
    client.quit()
    assert all(immutable for _, _, immutable in graph.requests)


def test_uidl_stable_across_sessions_and_moves(pop: Connect, box: Any) -> None:
    message = box.add(b"Subject: scan\r\n\r\npage\r\n", folder="Inbox/Scans")
    client = pop("scans-dev")
    first = client.uidl()[1]
    client.quit()
    box.move(message, box.folder_by_path("Archive/Old"))
    client = pop("scans-dev")
    assert client.stat()[0] == 0
    client.quit()
    box.move(message, box.folder_by_path("Inbox/Scans"))
    client = pop("scans-dev")
    assert client.uidl()[1] == first
    client.quit()


@pytest.mark.parametrize(
    ("device", "where"),
    [
        ("printer", None),
        ("mover-dev", "Processed"),
        ("trash-dev", "deleteditems"),
        ("keeper-dev", "inbox"),
    ],
)
def test_dele_quit_applies_each_policy(pop: Connect, box: Any, device: str, where: str) -> None:
    for n in range(3):
        box.add(b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n))
    ids = [m.immutable_id for m in box.messages]
    client = pop(device)
    client.dele(1)
    client.dele(3)
    assert [m.immutable_id for m in box.in_folder("inbox")] == ids  # only marks
    client.quit()
    if where is None:
        assert [m.immutable_id for m in box.messages] == [ids[1]]
    elif where == "inbox":
        hidden = [m.immutable_id for m in box.messages if "POP3Deleted" in m.categories]
        assert hidden == [ids[0], ids[2]]
        again = pop(device)
        assert again.stat()[0] == 1
        again.quit()
    else:
        assert [m.immutable_id for m in box.in_folder(where)] == [ids[0], ids[2]]
        assert [m.immutable_id for m in box.in_folder("inbox")] == [ids[1]]


def test_dele_then_drop_changes_nothing(pop: Connect, box: Any, graph: GraphEmulator) -> None:
    for n in range(2):
        box.add(b"Subject: %d\r\n\r\nbody\r\n" % n)
    client = pop()
    client.dele(1)
    drop(client)
    # Once the gateway has ended the dropped session it lets the next one in.
    again = login_when_free(pop)
    assert again.stat()[0] == 2
    again.quit()
    assert len(box.messages) == 2
    assert graph.counts["permanentDelete"] == 0


def login_when_free(pop: Connect, device: str = "printer", timeout: float = 10) -> poplib.POP3_SSL:
    deadline = time.monotonic() + timeout
    while True:
        client = pop(None)
        client.user(device)
        try:
            client.pass_(f"{device}-pw")
            return client
        except poplib.error_proto as e:
            if b"IN-USE" not in e.args[0] or time.monotonic() > deadline:
                raise
            drop(client)
            time.sleep(0.05)


def test_rset_clears_deletions(pop: Connect, box: Any) -> None:
    for n in range(2):
        box.add(b"Subject: %d\r\n\r\nbody\r\n" % n)
    client = pop()
    client.dele(1)
    client.rset()
    client.quit()
    assert len(box.messages) == 2


def test_mark_seen(pop: Connect, box: Any) -> None:
    for n in range(2):
        box.add(b"Subject: %d\r\n\r\nbody\r\n" % n)
    client = pop("seer-dev")
    client.retr(2)
    client.quit()
    assert [m.is_read for m in box.messages] == [False, True]


def test_second_device_gets_in_use(pop: Connect, box: Any) -> None:
    first = pop()
    second = pop(None)
    second.user("copier")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_("copier-pw")
    first.quit()
    second.user("copier")
    assert second.pass_("copier-pw").startswith(b"+OK")
    second.quit()


def test_throttling_is_honoured(pop: Connect, box: Any, graph: GraphEmulator) -> None:
    box.add(b"Subject: x\r\n\r\nbody\r\n")
    graph.throttle(1, retry_after="2", kind="list")
    graph.throttle(1, status=503, retry_after="1", kind="value")
    started = time.monotonic()
    client = pop()
    assert client.stat()[0] == 1
    assert time.monotonic() - started >= 3.0
    assert retr(client, 1) == b"Subject: x\r\n\r\nbody\r\n"
    client.quit()
    assert graph.counts["throttled"] == 2


def test_throttling_beyond_the_timeout_is_sys_temp(
    pop: Connect, box: Any, graph: GraphEmulator
) -> None:
    graph.throttle(1, retry_after="600", kind="folder")
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]"):
        pop()


def test_large_message_streams_without_rss_growth(
    pop: Connect, box: Any, graph_gateway: GatewayProcess
) -> None:
    size = 50 * 1024 * 1024
    line = b"." + b"x" * 75 + b"\r\n"  # every line needs dot-stuffing
    big = b"Subject: big\r\n\r\n" + line * (size // len(line))
    box.add(big)
    box.add(b"Subject: small\r\n\r\nwarm-up\r\n")
    assert graph_gateway.process is not None
    status = Path(f"/proc/{graph_gateway.process.pid}/status")

    def peak() -> int:
        text = status.read_text()
        return int(text.split("VmHWM:")[1].split()[0]) * 1024

    before = peak()
    client = pop()  # measures the big one: streamed, counted, dropped
    assert client.list(1).split()[2] == str(len(big)).encode()
    # A device that does not read for a while: without back-pressure the
    # gateway would buffer the whole message meanwhile.
    client._putcmd("RETR 1")
    time.sleep(1.0)
    lines = client._getlongresp()[1]
    got = b"".join(line + b"\r\n" for line in lines)
    del lines
    assert len(got) == len(big) and got == big
    client.quit()
    assert peak() - before < 24 * 1024 * 1024, (before, peak())


# -- real POP3 clients ------------------------------------------------------------------------


def three(box: Any) -> list[bytes]:
    mimes = [
        b"Subject: %d\r\nMessage-ID: <%d@x>\r\n\r\n" % (n, n)
        + b"".join(b"%sline %d\r\n" % (b"." if i == 1 else b"", i) for i in range(40))
        for n in range(3)
    ]
    for m in mimes:
        box.add(m)
    return mimes


def test_curl_lists_retrieves_and_deletes(
    box: Any, graph_ports: dict[str, int], tls_gateway: TLSMaterial
) -> None:
    mimes = three(box)
    base = ["curl", "-sS", "--max-time", "30", "-u", "printer:printer-pw"]
    ca = ["--cacert", str(tls_gateway.ca_file)]
    listing = run([*base, *ca, f"pop3s://localhost:{graph_ports['implicit']}/"]).stdout
    assert listing == b"".join(f"{i} {len(m)}\r\n".encode() for i, m in enumerate(mimes, 1))
    url = f"pop3://localhost:{graph_ports['starttls']}/2"
    assert run([*base, *ca, "--ssl-reqd", url]).stdout == mimes[1]
    run([*base, *ca, "--ssl-reqd", url, "-X", "DELE", "-I"])
    assert [m.mime for m in box.messages] == [mimes[0], mimes[2]]


def test_mpop_downloads_and_deletes(
    box: Any, graph_ports: dict[str, int], tls_gateway: TLSMaterial, tmp_path: Path
) -> None:
    mimes = three(box)
    got = mpop_download(graph_ports["starttls"], tls_gateway.ca_file, tmp_path)
    assert len(got) == len(mimes)
    for original in mimes:
        assert any(g.endswith(original.replace(b"\r\n", b"\n")) for g in got), original[:80]
    assert box.messages == []


def test_fetchmail_downloads_and_deletes(
    box: Any, graph_ports: dict[str, int], tls_gateway: TLSMaterial, tmp_path: Path
) -> None:
    mimes = three(box)
    got = fetchmail_download(graph_ports["implicit"], tls_gateway.ca_file, tmp_path)
    assert len(got) == len(mimes)
    for original in mimes:
        body = original.partition(b"\r\n\r\n")[2].replace(b"\r\n", b"\n")
        assert any(g.endswith(body) for g in got)
    assert box.messages == []
