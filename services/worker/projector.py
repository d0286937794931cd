"""The projector: folds appended events into the read models.

Loop: read feed entries (which sessions changed), catch each session up from its
log with the pure `project`, apply every update atomically with its version
check, then acknowledge the entries. Any crash point is safe: an unacknowledged
entry is claimed again by a live consumer, and re-applying is a no-op because
the read model's version already moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from shared.domain.projection import project
from shared.app.ports import ReadModels
from shared.adapters.redis.feed import FeedEntry, RedisFeed
from shared.adapters.redis.store import RedisStore

log = logging.getLogger("parley.projector")


class Projector:
    def __init__(
        self,
        views: ReadModels,
        feed: RedisFeed,
        batch: int = 256,
        claim_idle_ms: int = 2_000,
        block_ms: int | None = 1_000,
        maintenance_s: float = 1.0,
        on_chats: Callable[[str, str, list[str]], Awaitable[None]] | None = None,
        on_ended: Callable[[str, list[str]], Awaitable[None]] | None = None,
    ) -> None:
        """`block_ms=None` polls instead of blocking (fakeredis answers a blocking read at once)."""
        self.views = views
        self.feed = feed
        self.batch = batch
        self.claim_idle_ms = claim_idle_ms
        self.block_ms = block_ms
        self.maintenance_s = maintenance_s
        self.on_chats = on_chats
        """Called with (tenant, session, [head job]) after chat events are projected: queue the next chat."""
        self.on_ended = on_ended
        """Called with (tenant, [job ids]) for chats that ended: give back their tenant's concurrent-chat slots."""
        self.applied = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Project until `stop` is set. Store errors propagate: the supervisor retries them (`shared.supervise`)."""
        await self._start()
        while not stop.is_set():
            entries = await self.feed.read(self.batch, self.block_ms)
            if entries:
                await self.handle(entries)
            elif self.block_ms is None:
                await asyncio.sleep(0.002)

    async def maintain(self, stop: asyncio.Event) -> None:
        """Every `maintenance_s`: heartbeat, take over what dead consumers left unacknowledged, and now and then
        trim the feeds. A part of its own, so a slow trim never delays projection."""
        await self._start()
        rounds = 0
        while not stop.is_set():
            await self.feed.heartbeat()
            await self.handle(await self.feed.claim_stale(self.claim_idle_ms, self.batch))
            rounds += 1
            if rounds % 10 == 0:
                await self.feed.trim()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.maintenance_s)

    async def _start(self) -> None:
        await self.feed.ensure_groups()
        await self.feed.heartbeat()

    async def handle(self, entries: list[FeedEntry]) -> None:
        if not entries:
            return
        await self.catch_up({e.session_id for e in entries})
        await self.feed.ack(entries)

    async def catch_up_partitions(self, partitions: Iterable[int]) -> None:
        """Bring every session a partition's feed still names up to its head (a reader's help; see
        `SessionService._fresh`)."""
        for p in partitions:
            await self.catch_up(await self.feed.backlog(p))

    async def catch_up(self, session_ids: Iterable[str]) -> None:
        """Bring each session's read model to its log's head."""
        todo = sorted(set(session_ids))
        while todo:
            pending = await self.views.pending(todo)
            updates, heads = [], []
            for p in pending:
                if p is not None and p.events:
                    try:
                        update = project(p.state, p.events)
                        RedisStore.check_encodable(update)
                    except Exception:  # noqa: BLE001 - one bad session must not stop the others
                        log.exception("cannot project session %s; it stays behind until fixed", p.state.id)
                        continue
                    updates.append((p.tenant, update))
                    heads.append(p.head)
            results = await self.views.apply(updates)
            todo = []
            for (tenant, u), head, ok in zip(updates, heads, results):
                if ok:
                    self.applied += u.event_count
                    head_moved = any(j.status is not None for j in u.jobs)  # a chat was requested or ended
                    if head_moved and self.on_chats is not None and u.state.active_chats:
                        await self.on_chats(tenant, u.session_id, [u.state.active_chats[0].job_id])
                    ended = [j.job_id for j in u.jobs if j.ended]
                    if ended and self.on_ended is not None:
                        await self.on_ended(tenant, ended)
                if not ok or u.to_version < head:
                    todo.append(u.session_id)
