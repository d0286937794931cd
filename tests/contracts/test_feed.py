"""The `Feed` contract: every append names its session in its partition's feed; `read` hands each entry to one
consumer, which holds it until it acknowledges it; a dead consumer's entries are taken over; `trim` keeps what is
still needed; `backlog` names every session not trimmed yet; heartbeats say a projector is alive."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ResponseError

from shared.domain.ids import partition_of
from tests.contracts.conftest import Backend, add, create


async def test_reading_needs_the_group(backend: Backend) -> None:
    await create(backend.log)
    with pytest.raises((RuntimeError, ResponseError)):  # no consumer group yet
        await backend.feed("c1").read(10, None)


async def test_each_append_is_handed_to_one_consumer_once(backend: Backend) -> None:
    one, two = backend.feed("c1"), backend.feed("c2")
    await one.ensure_groups()
    await one.ensure_groups()  # idempotent
    state = await add(backend.log, await create(backend.log), "x")
    got = await one.read(10, None)
    assert [e.session_id for e in got] == [state.id, state.id]
    assert {e.partition for e in got} == {partition_of(state.id, backend.partitions)}
    assert len({e.entry_id for e in got}) == 2
    assert await two.read(10, None) == []
    assert await one.read(10, None) == []


async def test_count_bounds_a_read(backend: Backend) -> None:
    feed = backend.feed("c1")
    await feed.ensure_groups()
    state = await create(backend.log)
    for i in range(4):
        state = await add(backend.log, state, f"m{i}")
    first = await feed.read(2, None)
    rest = await feed.read(10, None)
    assert len(first) == 2 and len(rest) == 3
    assert not {e.entry_id for e in first} & {e.entry_id for e in rest}


async def test_unacknowledged_entries_are_taken_over_and_acknowledged_ones_are_not(backend: Backend) -> None:
    dead, live = backend.feed("dead"), backend.feed("live")
    await dead.ensure_groups()
    a, b = await create(backend.log), await create(backend.log)
    held = await dead.read(10, None)
    assert {e.session_id for e in held} == {a.id, b.id}
    await dead.ack([e for e in held if e.session_id == a.id])
    assert await live.claim_stale(60_000, 10) == []  # not idle long enough
    claimed = await live.claim_stale(0, 10)
    assert [e.session_id for e in claimed] == [b.id]
    assert [e.entry_id for e in claimed] == [e.entry_id for e in held if e.session_id == b.id]
    await live.ack(claimed)
    assert await live.claim_stale(0, 10) == []


async def test_trim_drops_only_what_every_consumer_is_done_with(backend: Backend) -> None:
    feed = backend.feed("c1")
    await feed.ensure_groups()
    a = await create(backend.log)
    b = await create(backend.log)
    pa, pb = partition_of(a.id, backend.partitions), partition_of(b.id, backend.partitions)
    got = await feed.read(10, None)
    await feed.ack([e for e in got if e.session_id == a.id])
    await feed.trim()
    assert await feed.backlog(pb) == [b.id]  # still pending: kept
    if pa != pb:
        assert await feed.backlog(pa) == []
    await feed.ack(got)
    c = await create(backend.log)  # not read yet: kept
    await feed.trim()
    assert [sid for p in range(backend.partitions) for sid in await feed.backlog(p)] == [c.id]


async def test_backlog_names_each_session_once_in_feed_order(backend: Backend) -> None:
    feed = backend.feed("c1")
    await feed.ensure_groups()
    s = await create(backend.log)
    for i in range(3):
        s = await add(backend.log, s, f"m{i}")
    others = [await create(backend.log) for _ in range(6)]
    p = partition_of(s.id, backend.partitions)
    expected = [s.id] + [o.id for o in others if partition_of(o.id, backend.partitions) == p]
    assert await feed.backlog(p) == expected
    assert await feed.backlog(p, count=1) == [s.id]


async def test_a_blocking_read_wakes_on_an_append(backend: Backend) -> None:
    feed = backend.feed("c1")
    await feed.ensure_groups()
    reading = asyncio.ensure_future(feed.read(10, 10_000))
    await asyncio.sleep(0.05)
    state = await create(backend.log)
    got = await asyncio.wait_for(reading, 10)
    assert [e.session_id for e in got] == [state.id]


async def test_heartbeats_say_a_projector_is_alive_until_it_leaves(backend: Backend) -> None:
    feed = backend.feed("c1")
    await feed.ensure_groups()
    assert not await feed.alive(60_000)
    await feed.heartbeat()
    assert await feed.alive(60_000)
    await feed.forget_consumer()
    assert not await feed.alive(60_000)


async def test_a_consumer_that_leaves_drops_what_it_held(backend: Backend) -> None:
    """Leaving is for a consumer that acknowledged its batch (a graceful stop): what it still held is not handed
    over (XGROUP DELCONSUMER); its sessions are caught up by the next append or a reader's help."""
    leaving, other = backend.feed("leaving"), backend.feed("other")
    await leaving.ensure_groups()
    await create(backend.log)
    assert len(await leaving.read(10, None)) == 1
    await leaving.forget_consumer()
    assert await other.claim_stale(0, 10) == []
