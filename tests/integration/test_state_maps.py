"""The UIDL map and the Graph size map on both state backends (one suite,
two backends): what one node settles, every other node reads, also when
several notice one UIDVALIDITY change at the same moment."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from pytest_twisted import ensureDeferred
from twisted.internet import defer, reactor
from twisted.internet.defer import gatherResults

from gateway.maildrop.graph_sizes import GraphSizeStore, PostgresSizeStore, SizeMap
from gateway.maildrop.uidl_map import MailboxState, MessageKey, Settled, UIDLMap, UIDStore
from gateway.maildrop.uidl_map_pg import PostgresUIDLMap
from gateway.state.database import Database
from tests.harness.postgres import PostgresCluster
from tests.helpers.state import migrated_database, postgres_settings

pytestmark = pytest.mark.integration

BACKENDS = ["embedded", "postgresql"]
INBOX = MailboxState("INBOX", 100)
REBUILT = MailboxState("INBOX", 200)


def key(mid: str, size: int = 100) -> MessageKey:
    return MessageKey(mid, size, "1-Jan-2026 00:00:00 +0000")


class Nodes:
    """Stores of one backend as separate nodes (processes) would open them:
    each its own SQLite connection, or its own connection pool."""

    def __init__(self, backend: str, tmp_path: Path, postgres: PostgresCluster) -> None:
        self.backend = backend
        self.state_dir = tmp_path / "state"
        self.dsn = migrated_database(postgres) if backend == "postgresql" else ""
        self._closers: list[Any] = []

    def uidl_map(self) -> UIDLMap:
        if self.backend == "embedded":
            store = UIDStore.in_state_dir(self.state_dir)
            self._closers.append(store.close)
            return store
        return PostgresUIDLMap(self._database())

    def size_map(self) -> SizeMap:
        if self.backend == "embedded":
            store = GraphSizeStore.in_state_dir(self.state_dir)
            self._closers.append(store.close)
            return store
        return PostgresSizeStore(self._database())

    def _database(self) -> Database:
        database = Database(postgres_settings(self.dsn), reactor)
        database.start()
        self._closers.append(database.stop)
        return database

    async def close(self) -> None:
        for close in reversed(self._closers):
            done = close()
            if done is not None:
                await done


@pytest.fixture(params=BACKENDS)
def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Nodes]:
    postgres = request.getfixturevalue("postgres") if request.param == "postgresql" else None
    made = Nodes(request.param, tmp_path, postgres)  # type: ignore[arg-type]
    yield made
    pytest_twisted.blockon(defer.ensureDeferred(made.close()))


async def settled(
    store: UIDLMap, here: MailboxState, present: Sequence[int], keys: Mapping[int, MessageKey]
) -> Settled:
    """Settle as the IMAP maildrop does: fetch what is missing, settle again."""
    have: dict[int, MessageKey] = {}
    result = await store.settle("acct", here, present, have)
    while result.missing:
        have.update((uid, keys[uid]) for uid in result.missing)
        result = await store.settle("acct", here, present, have)
    return result


@ensureDeferred
async def test_a_new_account_needs_every_key_then_gets_natural_uidls(nodes: Nodes) -> None:
    store = nodes.uidl_map()
    first = await store.settle("acct", INBOX, (1, 2), {})
    assert first.missing == (1, 2) and not first.uidls
    done = await store.settle("acct", INBOX, (1, 2), {1: key("<a>"), 2: key("<b>")})
    assert dict(done.uidls) == {1: "100.1", 2: "100.2"} and done.remapped_from is None
    # Known now: no key needed, another node reads the same.
    again = await nodes.uidl_map().settle("acct", INBOX, (1, 2), {})
    assert dict(again.uidls) == {1: "100.1", 2: "100.2"} and not again.missing


@ensureDeferred
async def test_new_messages_are_added_and_gone_ones_forgotten(nodes: Nodes) -> None:
    keys = {1: key("<a>"), 2: key("<b>"), 3: key("<c>")}
    store = nodes.uidl_map()
    await settled(store, INBOX, (1, 2), keys)
    # 1 expunged, 3 arrived: only 3 needs its key.
    step = await store.settle("acct", INBOX, (2, 3), {})
    assert step.missing == (3,)
    done = await store.settle("acct", INBOX, (2, 3), {3: keys[3]})
    assert dict(done.uidls) == {2: "100.2", 3: "100.3"}
    # 1 is forgotten: if it came back (an older snapshot), it is new again.
    assert (await store.settle("acct", INBOX, (1, 2, 3), {})).missing == (1,)


@ensureDeferred
async def test_a_uidvalidity_change_keeps_uidls_for_every_node(nodes: Nodes) -> None:
    before = {1: key("<a>"), 2: key("<b>"), 3: key("<c>")}
    await settled(nodes.uidl_map(), INBOX, (1, 2, 3), before)
    # Rebuilt: <a> gone, <b> and <c> renumbered, <d> new.
    after = {7: key("<b>"), 8: key("<c>"), 9: key("<d>")}
    first = await settled(nodes.uidl_map(), REBUILT, (7, 8, 9), after)
    assert dict(first.uidls) == {7: "100.2", 8: "100.3", 9: "200.9"}
    assert first.remapped_from == INBOX and first.kept == 2
    # A node that fetched every key because it saw the old map before the
    # first one's remap: it keeps the first one's result instead of remapping.
    late = await nodes.uidl_map().settle("acct", REBUILT, (7, 8, 9), after)
    assert late.uidls == first.uidls and late.remapped_from is None


@ensureDeferred
async def test_nodes_remapping_at_once_agree_and_one_remaps(nodes: Nodes) -> None:
    before = {n: key(f"<m{n}>", size=n) for n in range(1, 41)}
    await settled(nodes.uidl_map(), INBOX, tuple(before), before)
    after = {n + 100: k for n, k in before.items()}
    stores = [nodes.uidl_map() for _ in range(4)]
    # Every node saw the old map and fetched every key before any wrote.
    results = await gatherResults(
        [store.settle("acct", REBUILT, tuple(after), after) for store in stores for _ in range(3)]
    )
    assert all(not r.missing for r in results)
    assert {tuple(sorted(r.uidls.items())) for r in results} == {
        tuple((n + 100, f"100.{n}") for n in range(1, 41))
    }
    assert sum(1 for r in results if r.remapped_from is not None) == 1


def _settle_in_process(state_dir: str, start: Any, results: Any) -> None:
    store = UIDStore.in_state_dir(Path(state_dir))
    after = {n + 100: key(f"<m{n}>", size=n) for n in range(1, 41)}
    start.wait()
    result = store.settle_now("acct", REBUILT, tuple(after), after)
    results.put((sorted(result.uidls.items()), result.remapped_from is not None))
    store.close()


def test_embedded_worker_processes_remapping_at_once_agree(tmp_path: Path) -> None:
    before = {n: key(f"<m{n}>", size=n) for n in range(1, 41)}
    store = UIDStore.in_state_dir(tmp_path)
    store.settle_now("acct", INBOX, tuple(before), before)
    store.close()
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    workers = [
        context.Process(target=_settle_in_process, args=(str(tmp_path), start, results))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    start.set()
    outcomes = [results.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join(10)
        assert worker.exitcode == 0
    assert {tuple(uidls) for uidls, _ in outcomes} == {
        tuple((n + 100, f"100.{n}") for n in range(1, 41))
    }
    assert sum(1 for _, remapped in outcomes if remapped) == 1


@ensureDeferred
async def test_graph_sizes_are_shared_and_updated(nodes: Nodes) -> None:
    one, other = nodes.size_map(), nodes.size_map()
    await one.record_sizes("scanner", {"id-a": 10, "id-b": 20}, ["id-a", "id-b"])
    assert await other.known_sizes("scanner", ["id-a", "id-b", "id-c"]) == {
        "id-a": 10,
        "id-b": 20,
    }
    # A corrected size replaces the measured one; other accounts see nothing.
    await other.record_sizes("scanner", {"id-b": 21}, ())
    assert await one.known_sizes("scanner", ["id-b"]) == {"id-b": 21}
    assert await one.known_sizes("copier", ["id-a"]) == {}
