"""Projection (`Projection`, and the projector's loop around it) on the memory adapters: the feed's sessions are
brought to their heads exactly once, a dead consumer's entries are taken over, the chat hooks queue a session's
next chat and give back the slots of ended ones, and a reader catches a lagging session up itself."""

from __future__ import annotations

import asyncio

from services.worker.projector import Projector
from shared import bootstrap
from shared.bootstrap import Parley
from shared.domain.search import Query
from shared.domain.wire import ChatRequest, MessageCreate, SessionCreate
from tests.app.conftest import Deployment, ids, settings
from tests.support import wait_for


async def lagging_parley() -> Parley:
    """Reads that never help: only the projector moves the read models."""
    return await bootstrap.in_memory(settings(read_assist_s=60.0))


async def write(parley: Parley, sessions: int, messages: int) -> list[str]:
    out = []
    for _ in range(sessions):
        s, _ = await parley.sessions.create("acme", SessionCreate())
        for i in range(messages):
            await parley.sessions.add_message("acme", s.id, MessageCreate(role="user", content=f"m{i}"))
        out.append(s.id)
    return out


async def caught_up(parley: Parley, sids: list[str]) -> bool:
    views = [await parley.views.session("acme", sid) for sid in sids]
    return all(v.head > 0 and v.version == v.head for v in views)


async def test_the_feed_is_projected_exactly_once_and_acknowledged() -> None:
    parley = await lagging_parley()
    d = Deployment(parley)
    await d.feed.ensure_groups()
    sids = await write(parley, 3, 4)
    assert not await caught_up(parley, sids)
    assert await d.project() == 15
    assert await caught_up(parley, sids)
    assert parley.projection.applied == 15
    assert await d.feed.claim_stale(0, 100) == []  # everything acknowledged
    await parley.projection.catch_up(sids)  # again: nothing left to apply
    assert parley.projection.applied == 15


async def test_a_dead_consumers_entries_are_taken_over() -> None:
    parley = await lagging_parley()
    dead, live = parley.projector_feed("dead"), parley.projector_feed("live")
    await dead.ensure_groups()
    sids = await write(parley, 2, 1)
    assert len(await dead.read(100, None)) == 4  # read, then the consumer dies
    await parley.projection.handle(await live.claim_stale(0, 100))
    assert await caught_up(parley, sids)
    assert await live.claim_stale(0, 100) == []


async def test_the_projector_loop_projects_what_is_written() -> None:
    parley = await lagging_parley()
    projector = Projector(
        parley.projection,
        parley.projector_feed("loop"),
        batch=10,
        claim_idle_ms=100,
        block_ms=1_000,
        maintenance_s=0.05,
    )
    stop = asyncio.Event()
    parts = [asyncio.create_task(projector.run(stop)), asyncio.create_task(projector.maintain(stop))]
    try:
        sids = await write(parley, 3, 5)
        await wait_for(lambda: caught_up(parley, sids), 10, "the projector to catch up")
        assert await parley.feed.alive(60_000)  # it heart-beats
        assert ids(await parley.sessions.list("acme", 10, 0)) == sids[::-1]
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*parts), 10)


async def test_projecting_a_chats_end_queues_the_next_and_its_slot_is_given_back_once(parley: Parley) -> None:
    d = Deployment(parley)
    s, _ = await parley.sessions.create("acme", SessionCreate())
    ask = ChatRequest(messages=[MessageCreate(role="user", content="hi")])
    first = await parley.chats.request("acme", s.id, ask)
    second = await parley.chats.request("acme", s.id, ask)
    assert parley.memory is not None
    assert list(parley.memory.queued) == [first.job.id]
    assert await d.worker.run_queued() == 1
    assert list(parley.memory.queued) == []  # nothing queues the second but the projector
    # the worker gave the first chat's slot back as it answered (not when the projector sees it end)
    assert (await parley.limits.take("acme", "chats", "probe", 60)).held == 2
    await d.project()
    assert list(parley.memory.queued) == [second.job.id]
    assert (await parley.limits.take("acme", "chats", "probe", 60)).held == 2  # the projector's give changes nothing


async def test_a_reader_catches_the_list_up_itself(parley: Parley) -> None:
    """No projector runs; the list's lagging partitions are caught up by the reader (`read_assist_s=0`)."""
    sids = await write(parley, 5, 0)
    assert ids(await parley.sessions.list("acme", 10, 0)) == sids[::-1]


class WriteDuringEachRead:
    """Read models whose every fetch first projects what is pending, then lets one more write be acknowledged before
    it reads: the log is never caught up while it is read, as under a writer that never pauses."""

    def __init__(self, d: Deployment, sid: str) -> None:
        self.d, self.sid, self.inner = d, sid, d.parley.service.views
        self.writes = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def _write(self) -> None:
        await self.d.project()
        self.writes += 1
        await self.d.parley.sessions.add_message("acme", self.sid, MessageCreate(role="user", content="later"))

    async def session(self, tenant: str, sid: str) -> object:
        await self._write()
        return await self.inner.session(tenant, sid)

    async def sessions(self, tenant: str, limit: int, offset: int) -> object:
        await self._write()
        return await self.inner.sessions(tenant, limit, offset)

    async def find(self, *args: object) -> object:
        await self._write()
        return await self.inner.find(*args)

    async def count(self, *args: object) -> object:
        await self._write()
        return await self.inner.count(*args)


async def test_reads_are_fresh_as_of_their_start_not_held_back_by_later_writes() -> None:
    """Read-your-writes asks for the writes acknowledged before a read began: a read that waited for the log's
    current head instead never ends under steady writes (it answered 503 projection_lagging on a busy tenant)."""
    parley = await bootstrap.in_memory(settings(read_assist_s=60.0, read_timeout_s=1.0))
    d = Deployment(parley)
    await d.feed.ensure_groups()
    [sid] = await write(parley, 1, 1)
    await d.project()
    views = WriteDuringEachRead(d, sid)
    parley.service.views = views  # type: ignore[assignment]
    body, version = await parley.sessions.get("acme", sid)
    assert version == 3 and views.writes == 2  # the first fetch's write (v3) is read, the second's (v4) is not
    assert ids(await parley.sessions.list("acme", 10, 0)) == [sid]
    assert ids((await parley.sessions.find("acme", Query(), None, 10))[0]) == [sid]
    assert (await parley.sessions.count("acme", Query()))[0] == 1
    assert views.writes == 8
    await parley.close()
