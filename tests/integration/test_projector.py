"""The projector against both backends: catch-up, exactly-once, dead consumers, trimming, batching."""

from __future__ import annotations

import asyncio
import json

import fakeredis
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.worker.projector import Projector
from shared.adapters.codec import json_encode
from shared.adapters.redis.feed import GROUP, RedisFeed
from shared.adapters.redis.keys import Keys
from shared.adapters.redis.store import RedisStore
from shared.app.projection import Projection
from shared.app.service import SessionService
from shared.domain.commands import AddMessage, CreateSession, EditMessage, RemoveMessage, UpdateSession
from shared.domain.state import SessionState, fold
from shared.domain.wire import Message, MessageCreate, SessionCreate, SessionPatch

KEYS = Keys(4)


def ok(_state, _events) -> None:
    return None


def wire(redis):
    store = RedisStore(redis, KEYS)
    return store, SessionService(store, store, KEYS.partitions, read_timeout_s=5)


def projector(redis, name: str, block: bool) -> Projector:
    feed = RedisFeed(redis, KEYS, name)
    return Projector(Projection(RedisStore(redis, KEYS), feed), feed, batch=50, block_ms=50 if block else None)


async def write(service: SessionService, sessions: int, messages: int) -> list[str]:
    ids = []
    for _ in range(sessions):
        sid = service.new_session_id("acme", None)
        await service.execute("acme", sid, CreateSession(body=SessionCreate()), ok)
        ids.append(sid)
    for i in range(messages):
        for sid in ids:
            await service.execute("acme", sid, AddMessage(body=MessageCreate(role="user", content=f"{sid}:{i}")), ok)
    return ids


async def assert_views_equal_fold(store: RedisStore, session_ids: list[str]) -> None:
    for sid in session_ids:
        events = await store.read(sid, limit=100_000)
        state = fold(SessionState(id=sid), events)
        view = await store.session("acme", sid)
        assert view.version == state.version == view.head
        assert view.body == json_encode(state.session)
        versions = [int(v.split(b"|")[0]) for v in await store.redis.lrange(KEYS.messages(sid), 0, -1)]
        assert versions == [e.version for e in events if type(e).__name__ == "MessageAdded"]


async def test_one_batch_catches_up_and_acknowledges(redis):
    store, service = wire(redis)
    ids = await write(service, 3, 5)
    p = projector(redis, "c1", block=False)
    await p.feed.ensure_groups()
    while entries := await p.feed.read(50, None):
        await p.projection.handle(entries)
    await assert_views_equal_fold(store, ids)
    assert p.projection.applied == 3 * 6
    for part in range(KEYS.partitions):
        assert (await redis.xpending(KEYS.feed(part), GROUP))["pending"] == 0


async def test_a_dead_consumers_entries_are_claimed_and_projected_once(redis):
    store, service = wire(redis)
    dead, live = projector(redis, "dead", block=False), projector(redis, "live", block=False)
    await dead.feed.ensure_groups()
    ids = await write(service, 2, 3)
    taken = await dead.feed.read(100, None)  # read, then "crash" before projecting
    assert taken
    assert await live.feed.read(100, None) == []
    claimed = await live.feed.claim_stale(0, 100)
    assert sorted(e.entry_id for e in claimed) == sorted(e.entry_id for e in taken)
    await live.projection.handle(claimed)
    await live.projection.handle(claimed)  # a second delivery changes nothing
    await assert_views_equal_fold(store, ids)
    assert live.projection.applied == 2 * 4


async def test_trim_drops_only_acknowledged_entries(redis):
    _, service = wire(redis)
    p = projector(redis, "c", block=False)
    await p.feed.ensure_groups()
    await write(service, 4, 2)
    first = await p.feed.read(1, None)  # COUNT is per stream: one entry from each partition
    assert first
    await p.projection.handle(first)
    rest = await p.feed.read(100, None)  # delivered, not acknowledged
    await p.feed.trim()
    remaining = sum([await redis.xlen(KEYS.feed(part)) for part in range(KEYS.partitions)])
    assert remaining == len(rest)
    await p.projection.handle(rest)
    await p.feed.trim()
    assert sum([await redis.xlen(KEYS.feed(part)) for part in range(KEYS.partitions)]) == 0


async def test_running_projector_makes_reads_see_writes(redis):
    store, service = wire(redis)
    p = projector(redis, "runner", block=not isinstance(redis, fakeredis.FakeAsyncRedis))
    stop = asyncio.Event()
    task = asyncio.create_task(p.run(stop))
    try:
        sid = service.new_session_id("acme", None)
        await service.execute("acme", sid, CreateSession(body=SessionCreate()), ok)
        for i in range(20):
            await service.execute("acme", sid, AddMessage(body=MessageCreate(role="user", content=str(i))), ok)
            page = await service.read(sid, lambda: store.messages("acme", sid, 100, 0))
            assert [json.loads(m)["content"] for m in page.items] == [str(j) for j in range(i + 1)]
        await service.execute("acme", sid, UpdateSession(patch=SessionPatch(situation="new")), ok)
        view = await service.read(sid, lambda: store.session("acme", sid))
        assert json.loads(view.body)["situation"] == "new"
    finally:
        stop.set()
        await task


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4)), min_size=1, max_size=12))
def test_projection_in_any_interleaving_equals_the_fold(plan):
    """Appends and projector batches interleaved at random give read models equal to a fresh fold."""

    async def scenario() -> None:
        redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
        store, service = wire(redis)
        p = projector(redis, "prop", block=False)
        await p.feed.ensure_groups()
        ids = await write(service, 3, 0)
        for which, n in plan:
            for _ in range(n):
                await service.execute("acme", ids[which], AddMessage(body=MessageCreate(role="user", content="x")), ok)
            await p.projection.handle(await p.feed.read(1 + n, None))
        while entries := await p.feed.read(100, None):
            await p.projection.handle(entries)
        await assert_views_equal_fold(store, ids)
        await redis.aclose()

    asyncio.run(scenario())


async def test_a_page_reads_the_same_from_messages_kept_in_the_read_model_and_from_bare_versions(redis):
    """APPLY keeps each message beside its version ("version|schema|data"), so a page is one range read; read
    models projected before that hold bare versions and read the same (the message from the log). Edits and
    removals show the same either way, on a page that starts after a removal."""
    store, service = wire(redis)
    [sid] = await write(service, 1, 12)
    p = projector(redis, "c1", block=False)
    await p.feed.ensure_groups()

    async def project() -> None:
        while entries := await p.feed.read(50, None):
            await p.projection.handle(entries)

    await project()
    listed = (await store.messages("acme", sid, 100, 0)).items
    first, third = (msgspec.json.decode(m, type=Message) for m in (listed[0], listed[2]))
    await service.execute("acme", sid, RemoveMessage(message=first), ok)
    await service.execute("acme", sid, EditMessage(message=third, content="edited"), ok)
    await project()
    entries = await redis.lrange(KEYS.messages(sid), 0, -1)
    assert all(e.count(b"|") >= 2 for e in entries)
    pages = [[json.loads(m) for m in (await store.messages("acme", sid, 4, offset)).items] for offset in (0, 1, 8)]
    await redis.delete(KEYS.messages(sid))
    await redis.rpush(KEYS.messages(sid), *(e.split(b"|")[0] for e in entries))
    assert [[json.loads(m) for m in (await store.messages("acme", sid, 4, o)).items] for o in (0, 1, 8)] == pages
    assert [m["content"] for m in pages[0]] == [f"{sid}:1", "edited", f"{sid}:3", f"{sid}:4"]
    assert [m["content"] for m in pages[2]] == [f"{sid}:9", f"{sid}:10", f"{sid}:11"]
