"""The Graph maildrop and client in-process, over real loopback HTTP, against
the Graph emulator: snapshot, UIDLs, exact sizes, RETR/TOP, DELE policies,
throttling and the per-mailbox concurrency limit."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from gateway.maildrop import NoSuchMessage, UpstreamRejected, UpstreamUnavailable
from gateway.maildrop.graph import (
    HIDDEN_CATEGORY,
    GraphMaildrop,
    graph_uidl,
    open_graph_maildrop,
)
from gateway.maildrop.graph_sizes import GraphSizeStore
from gateway.model import Account, Provider
from gateway.upstream.graph import MailboxSlots
from tests.harness.graph_emulator import GraphEmulator, StaticTokens
from tests.helpers.graph import Sink, top_of, varied_mime, wire

pytestmark = pytest.mark.integration

TOKEN = "tok-alice"


class Tokens:
    def __init__(self) -> None:
        self.calls: list[bool] = []
        self.token = TOKEN

    async def graph_token(self, account: Account, *, force_refresh: bool = False) -> str:
        self.calls.append(force_refresh)
        return self.token


@pytest.fixture
def graph() -> Iterator[GraphEmulator]:
    with GraphEmulator(StaticTokens({TOKEN: "alice"})) as emulator:
        yield emulator


@pytest.fixture
def store(tmp_path: Path) -> Iterator[GraphSizeStore]:
    sizes = GraphSizeStore.in_state_dir(tmp_path)
    yield sizes
    sizes.close()


def account(**changes: object) -> Account:
    base = Account(
        name="scanner",
        provider="m365",
        username="alice",
        auth="oauth2",
        mailbox="graph",
        folder="inbox",
    )
    return replace(base, **changes)  # type: ignore[arg-type]


async def open_drop(
    graph: GraphEmulator, store: GraphSizeStore | None, tokens: Tokens | None = None, **kw: object
) -> GraphMaildrop:
    provider = Provider(name="m365", graph_url=graph.url, timeout=5)
    return await open_graph_maildrop(
        kw.pop("acct", None) or account(),  # type: ignore[arg-type]
        provider,
        reactor=reactor,
        tokens=tokens or Tokens(),
        sizes=store,
        slots=kw.pop("slots", None) or MailboxSlots(),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


async def retr(drop: GraphMaildrop, n: int, lines: int | None = None) -> bytes:
    sink = Sink()
    await drop.retrieve(n, sink, lines)
    assert sink.producer is None
    return sink.message()


@pytest_twisted.ensureDeferred
async def test_list_equals_retr_and_top_byte_exact(graph: GraphEmulator, store) -> None:
    mimes = varied_mime()
    box = graph.mailbox("alice")
    for m in mimes:
        box.add(m)
    drop = await open_drop(graph, store)
    assert list(drop.sizes) == [len(wire(m)) for m in mimes]
    for n, mime in enumerate(mimes, 1):
        assert await retr(drop, n) == wire(mime)
        assert len(await retr(drop, n)) == drop.sizes[n - 1]
        for lines in (0, 1, 2):
            assert await retr(drop, n, lines) == top_of(mime, lines)
    uidls = await drop.unique_ids()
    assert uidls == [graph_uidl(m.immutable_id) for m in box.messages]
    assert all(1 <= len(u) <= 70 and all(0x21 <= ord(c) <= 0x7E for c in u) for u in uidls)
    assert len(set(uidls)) == len(uidls)
    await drop.commit([])
    # Every request asked for immutable ids.
    assert graph.requests and all(immutable for _, _, immutable in graph.requests)


@pytest_twisted.ensureDeferred
async def test_sizes_are_measured_once(graph: GraphEmulator, store) -> None:
    box = graph.mailbox("alice")
    for n in range(5):
        box.add(b"Subject: %d\r\n\r\nbody\r\n" % n)
    await (await open_drop(graph, store)).commit([])
    assert graph.counts["value"] == 5
    graph.reset_counts()
    box.add(b"Subject: new\r\n\r\nbody\r\n")
    drop = await open_drop(graph, store)
    assert len(drop.sizes) == 6
    await drop.commit([])
    # The second login measured only the new message: folder + list + 1 $value.
    assert graph.counts["value"] == 1
    assert graph.counts["total"] == 3


@pytest_twisted.ensureDeferred
async def test_login_measures_a_bounded_number(graph: GraphEmulator, store) -> None:
    box = graph.mailbox("alice")
    for n in range(7):
        box.add(b"Subject: %d\r\n\r\nbody\r\n" % n)
    drop = await open_drop(graph, store, measure_limit=3)
    assert len(drop.sizes) == 3  # the oldest three; the rest wait
    assert await drop.unique_ids() == [graph_uidl(m.immutable_id) for m in box.messages[:3]]
    await drop.commit([])
    drop = await open_drop(graph, store, measure_limit=3)
    assert len(drop.sizes) == 6
    await drop.commit([])


@pytest_twisted.ensureDeferred
async def test_paging_follows_next_link(graph: GraphEmulator, store) -> None:
    box = graph.mailbox("alice")
    for n in range(2345):
        box.add(b"Subject: %d\r\n\r\nx\r\n" % n)
    # Sizes known from earlier sessions: this login is list requests only.
    store.record("scanner", {m.immutable_id: len(m.mime) for m in box.messages}, ())
    drop = await open_drop(graph, store)
    assert len(drop.sizes) == 2345
    assert graph.counts["list"] == 3  # pages of 1000
    assert graph.counts["value"] == 0
    assert await drop.unique_ids() == [graph_uidl(m.immutable_id) for m in box.messages]
    await drop.commit([])


@pytest_twisted.ensureDeferred
async def test_folder_path_and_uidl_stable_across_moves(graph: GraphEmulator, store) -> None:
    box = graph.mailbox("alice")
    scans = box.make_folder("Inbox/Scans")
    box.make_folder("Archive/Old")
    message = box.add(b"Subject: scan\r\n\r\npage\r\n", folder="Inbox/Scans")
    acct = account(folder="Inbox/Scans")
    drop = await open_drop(graph, store, acct=acct)
    first = await drop.unique_ids()
    await drop.commit([])
    # Another client moves it away and back: new REST ids, same immutable id.
    rest_before = message.rest_id
    box.move(message, box.folder_by_path("Archive/Old"))
    box.move(message, scans)
    assert message.rest_id != rest_before
    drop = await open_drop(graph, store, acct=acct)
    assert await drop.unique_ids() == first
    await drop.commit([])


@pytest_twisted.ensureDeferred
async def test_missing_folder_is_permanent(graph: GraphEmulator) -> None:
    with pytest.raises(UpstreamRejected) as info:
        await open_drop(graph, None, acct=account(folder="Inbox/Nowhere"))
    assert "Nowhere" in info.value.detail


@pytest_twisted.ensureDeferred
async def test_refused_token_is_refreshed_once(graph: GraphEmulator) -> None:
    tokens = Tokens()
    tokens.token = "stale"
    with pytest.raises(UpstreamRejected):
        await open_drop(graph, None, tokens)
    assert tokens.calls == [False, True]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("policy", ["expunge", "move", "keep"])
async def test_dele_policies_apply_at_commit_only(graph: GraphEmulator, store, policy: str) -> None:
    box = graph.mailbox("alice")
    box.make_folder("Processed")
    for n in range(3):
        box.add(b"Subject: %d\r\n\r\nbody\r\n" % n)
    ids = [m.immutable_id for m in box.messages]
    acct = account(on_delete=policy, move_to="Processed" if policy == "move" else None)
    drop = await open_drop(graph, store, acct=acct)
    # A dropped session changes nothing.
    drop.abort()
    assert [m.immutable_id for m in box.in_folder("inbox")] == ids
    drop = await open_drop(graph, store, acct=acct)
    await drop.commit([1, 3])
    survivors = [ids[1]]
    if policy == "move":
        assert [m.immutable_id for m in box.in_folder("Processed")] == [ids[0], ids[2]]
        assert [m.immutable_id for m in box.in_folder("inbox")] == survivors
    elif policy == "expunge":
        assert [m.immutable_id for m in box.messages] == survivors
    else:
        hidden = [m.immutable_id for m in box.messages if HIDDEN_CATEGORY in m.categories]
        assert hidden == [ids[0], ids[2]]
        drop = await open_drop(graph, store, acct=acct)
        assert await drop.unique_ids() == [graph_uidl(ids[1])]
        await drop.commit([])


@pytest_twisted.ensureDeferred
async def test_move_without_move_to_goes_to_deleted_items(graph: GraphEmulator) -> None:
    box = graph.mailbox("alice")
    message = box.add(b"Subject: x\r\n\r\nbody\r\n")
    drop = await open_drop(graph, None, acct=account(on_delete="move"))
    await drop.commit([1])
    assert box.in_folder("deleteditems") == [message]


@pytest_twisted.ensureDeferred
async def test_mark_seen(graph: GraphEmulator) -> None:
    box = graph.mailbox("alice")
    for n in range(2):
        box.add(b"Subject: %d\r\n\r\nbody\r\n" % n)
    drop = await open_drop(graph, None, acct=account(mark_seen=True))
    await retr(drop, 2)
    await retr(drop, 1, 0)  # TOP is not a retrieval
    assert not any(m.is_read for m in box.messages)
    await drop.commit([])
    assert [m.is_read for m in box.messages] == [False, True]


@pytest_twisted.ensureDeferred
async def test_message_deleted_by_another_client(graph: GraphEmulator) -> None:
    box = graph.mailbox("alice")
    box.add(b"Subject: x\r\n\r\nbody\r\n")
    drop = await open_drop(graph, None)
    box.messages.clear()
    with pytest.raises(NoSuchMessage):
        await retr(drop, 1)
    await drop.commit([1])  # deleting what is already gone is not an error


@pytest_twisted.ensureDeferred
async def test_throttling_honours_retry_after(graph: GraphEmulator) -> None:
    box = graph.mailbox("alice")
    box.add(b"Subject: x\r\n\r\nbody\r\n")
    graph.throttle(1, retry_after="1", kind="list")
    graph.throttle(1, status=503, retry_after="1", kind="value")
    started = reactor.seconds()
    drop = await open_drop(graph, None)
    assert reactor.seconds() - started >= 2.0
    assert graph.counts["throttled"] == 2
    assert len(drop.sizes) == 1
    await drop.commit([])


@pytest_twisted.ensureDeferred
async def test_throttling_beyond_the_bound_is_temporary(graph: GraphEmulator) -> None:
    graph.mailbox("alice")
    graph.throttle(1, retry_after="3600", kind="folder")
    with pytest.raises(UpstreamUnavailable) as info:
        await open_drop(graph, None)
    assert "Retry-After 3600" in info.value.detail
    assert info.value.code == "SYS/TEMP"


@pytest_twisted.ensureDeferred
async def test_at_most_four_requests_per_mailbox(graph: GraphEmulator) -> None:
    box = graph.mailbox("alice")
    for n in range(12):
        box.add(b"Subject: %d\r\n\r\nbody\r\n" % n)
    graph.value_delay = 0.05
    drop = await open_drop(graph, None)
    assert len(drop.sizes) == 12
    assert graph.max_inflight["alice"] == 4
    assert graph.counts["concurrency"] == 0
    await drop.commit(range(1, 13))
    assert box.messages == []


@pytest_twisted.ensureDeferred
async def test_emulator_enforces_mailbox_concurrency(graph: GraphEmulator) -> None:
    """Without the client's limit the fifth request gets Graph's 429."""
    box = graph.mailbox("alice")
    for n in range(8):
        box.add(b"Subject: %d\r\n\r\nbody\r\n" % n)
    graph.value_delay = 0.2
    graph.concurrency_retry_after = "1"
    drop = await open_drop(graph, None, slots=MailboxSlots(limit=8))
    assert graph.counts["concurrency"] >= 1  # refused, then retried after Retry-After
    assert len(drop.sizes) == 8
    await drop.commit([])


@pytest_twisted.ensureDeferred
async def test_password_account_is_refused(graph: GraphEmulator) -> None:
    with pytest.raises(UpstreamRejected):
        await open_drop(graph, None, acct=account(auth="password"))
