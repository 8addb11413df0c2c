"""The spool interface, one suite on both backends: files shared by worker
processes (embedded) and PostgreSQL shared by nodes. Several spools (and
relays) on one spool stand for several processes; one real second process
checks the embedded claims across processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from pytest_twisted import ensureDeferred
from twisted.internet import reactor, threads

from gateway.smtp.spool import Spool
from gateway.smtp.spool_files import IncomingMessage
from gateway.smtp.spool_pg import PgSpool
from tests.harness.postgres import PostgresCluster
from tests.helpers.spool_backends import (
    LEASE,
    Processes,
    Upstream,
    accept,
    body,
    eventually,
    pause,
)

pytestmark = pytest.mark.integration


@pytest.fixture(params=["embedded", "postgresql"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_twisted.async_yield_fixture
async def processes(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Processes]:
    dsn = request.getfixturevalue("state_dsn") if kind == "postgresql" else None
    group = Processes(kind, tmp_path, dsn)
    try:
        yield group
    finally:
        await group.close()


def delivered(upstream: Upstream) -> Counter[bytes]:
    return Counter(data for _, data in upstream.arrived)


@ensureDeferred
async def test_a_committed_message_is_listed_and_read_back(processes: Processes) -> None:
    spool = await processes.spool()
    small, large = body(1), body(2, size=IncomingMessage.SPILL + 100_000)
    first = await accept(spool, small)
    second = await accept(spool, large)
    listed = {e.id: e for e in await spool.listing()}
    assert set(listed) == {first.id, second.id}
    assert listed[second.id].envelope.size == len(large)
    assert listed[first.id].status == "queued" and listed[first.id].state.attempts == 0
    with await spool.open_message(second) as f:
        assert f.read(second.envelope.size) == large
    assert list(spool.dir.tmp.iterdir()) == []


@ensureDeferred
async def test_a_claim_is_held_by_one_process_at_a_time(processes: Processes) -> None:
    one, two = await processes.spool(), await processes.spool()
    entry = await accept(one, body(1))
    assert await one.claim(entry) is entry
    # The other process sees the message (files: at its look; PostgreSQL:
    # not even then, the lease is the accepting process's) but cannot claim it.
    for other in await two.refresh(reactor.seconds()):
        assert other.id == entry.id
        assert await two.claim(other) is None
    await one.remove(entry)
    await one.release(entry)
    assert await two.listing() == []
    for other in list(two.entries.values()):
        assert await two.claim(other) is None  # gone: it leaves the index
    assert two.entries == {}


@ensureDeferred
async def test_two_relays_deliver_every_message_once(processes: Processes) -> None:
    upstream = Upstream()
    upstream.down = True
    one, two = await processes.spool(), await processes.spool()
    sent = [await accept(one if n % 2 else two, body(n)) for n in range(40)]
    processes.relay(one, upstream, "one")
    processes.relay(two, upstream, "two")
    await eventually(
        lambda: all(e.state.attempts or e.id not in s.entries for s in (one, two) for e in sent),
        what="a failed attempt while the upstream is down",
    )
    upstream.down = False
    await eventually(lambda: len(upstream.arrived) >= len(sent), what="every message delivered")

    async def empty() -> bool:
        return await one.listing() == []

    await eventually(empty, what="the spool empty")
    await processes.close()  # nothing in flight that could still arrive
    counts = delivered(upstream)
    assert sorted(counts) == sorted(body(n) for n in range(40))
    assert set(counts.values()) == {1}


@ensureDeferred
async def test_a_dead_process_messages_are_taken_over_once(
    processes: Processes, request: pytest.FixtureRequest
) -> None:
    cluster = request.getfixturevalue("postgres") if processes.kind == "postgresql" else None
    upstream = Upstream()
    dying, survivor = await processes.spool(), await processes.spool()
    sent = [await accept(dying, body(n)) for n in range(10)]
    if isinstance(dying, Spool):
        for entry in sent:  # in the middle of delivering them
            assert await dying.claim(entry) is entry
    processes.relay(survivor, upstream, "survivor")
    # While the holder lives, the other process leaves its messages alone.
    await pause(LEASE / 2 + 0.5)  # a few looks (every 0.2 s)
    assert upstream.arrived == []
    processes.kill(dying, cluster)
    await eventually(lambda: len(upstream.arrived) >= len(sent), LEASE * 5, "taken over")
    await processes.close()
    counts = delivered(upstream)
    assert sorted(counts) == sorted(body(n) for n in range(10)) and set(counts.values()) == {1}


@ensureDeferred
async def test_an_admin_retry_and_delete_reach_the_spool(processes: Processes) -> None:
    upstream = Upstream()
    upstream.down = True
    spool = await processes.spool()
    keep, doomed = await accept(spool, body(1)), await accept(spool, body(2))
    processes.relay(spool, upstream, "one")

    def attempted() -> bool:
        return all(e.state.attempts for e in (keep, doomed))

    await eventually(attempted, what="a failed attempt each")
    assert await spool.request("delete", doomed.id)
    assert not await spool.request("delete", "20200101000000-00000000")

    async def only_kept() -> bool:
        return [e.id for e in await spool.listing()] == [keep.id]

    await eventually(only_kept, what="deleted")
    upstream.down = False
    await eventually(lambda: len(upstream.arrived) == 1, what="the kept one delivered")
    assert upstream.arrived[0][1] == body(1)


CLAIMER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from gateway.smtp.spool_files import SpoolDir
    spool = SpoolDir(Path(sys.argv[1]))
    spool.lock(shared=True)
    held = [spool.claims.take(e.id) for e in spool.scan(clean=False)]
    assert all(c is not None for c in held)
    print(len(held), flush=True)
    time.sleep(600)
    """
)


@ensureDeferred
async def test_embedded_claims_hold_across_processes_and_die_with_them(tmp_path: Path) -> None:
    processes = Processes("embedded", tmp_path, None)
    other = None
    try:
        upstream = Upstream()
        spool = await processes.spool()
        for n in range(20):
            await accept(spool, body(n))
        other = subprocess.Popen(
            [sys.executable, "-c", CLAIMER, str(spool.dir.root)],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        )
        assert other.stdout is not None
        line = await threads.deferToThread(other.stdout.readline)
        assert line.strip() == b"20"  # the other process holds every claim
        processes.relay(spool, upstream, "here")
        await pause(1.0)  # several looks and attempts (every 0.2 s)
        assert upstream.arrived == []
        other.send_signal(signal.SIGKILL)
        await threads.deferToThread(other.wait)
        await eventually(lambda: len(upstream.arrived) >= 20, what="delivered after the kill")
        await processes.close()
        counts = delivered(upstream)
        assert sorted(counts) == sorted(body(n) for n in range(20))
        assert set(counts.values()) == {1}
    finally:
        if other is not None and other.poll() is None:
            other.kill()
            other.wait()
        await processes.close()


@ensureDeferred
async def test_postgresql_takes_the_lease_with_the_insert(
    postgres: PostgresCluster, state_dsn: str, tmp_path: Path
) -> None:
    processes = Processes("postgresql", tmp_path, state_dsn)
    try:
        spool = await processes.spool()
        assert isinstance(spool, PgSpool)
        entry = await accept(spool, body(1))
        rows = postgres.query(
            state_dsn,
            "SELECT lease_holder, state, size FROM gateway_spool WHERE id = %s",
            entry.id,
        )
        assert rows == [(spool.me, "queued", len(body(1)))]
    finally:
        await processes.close()


@ensureDeferred
async def test_the_console_queue_page_lists_and_deletes(
    processes: Processes, tmp_path: Path
) -> None:
    from tests.unit.test_console import COOKIE, console, request

    one, two = await processes.spool(), await processes.spool()
    mine, theirs = await accept(one, body(1)), await accept(two, body(2))
    await one.refresh(reactor.seconds())
    c, _ = console(tmp_path / "console")
    c.state.spool = one
    session = c.sessions.new("root")
    r = request(b"queue")
    r.received_cookies[COOKIE] = session.id.encode()
    page = await c.queue(r)
    assert isinstance(page, bytes)
    assert mine.id.encode() in page and theirs.id.encode() in page  # every process's
    r = request(f"queue/{theirs.id}/delete".encode(), b"POST", csrf=session.csrf)
    r.received_cookies[COOKIE] = session.id.encode()
    await c.queue_action(r, theirs.id, "delete")
    assert r.responseCode == 303
    if isinstance(one, PgSpool):
        # The accepting process holds it: left on its row for that process,
        # which carries it out at its next claim instead of an attempt.
        assert len(await one.listing()) == 2
        assert await two.claim(theirs) is None
        assert [e.id for e in await one.listing()] == [mine.id]
    else:  # a request for whichever worker's relay
        assert one.requests() == [("delete", theirs.id)]
