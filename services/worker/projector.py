"""The projector: folds appended events into the read models.

Loop: read feed entries (which sessions changed), catch each session up from its
log with the pure `project`, apply every update atomically with its version
check, then acknowledge the entries. Any crash point is safe: an unacknowledged
entry is claimed again by a live consumer, and re-applying is a no-op because
the read model's version already moved.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

from shared.domain.projection import project
from shared.ports import ReadModels
from shared.redis.feed import FeedEntry, RedisFeed
from shared.redis.store import RedisStore

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
        self.applied = 0

    async def run(self, stop: asyncio.Event) -> None:
        await self._start()
        next_maintenance = 0.0
        trims = 0
        backoff = 0.05
        while not stop.is_set():
            try:
                if time.monotonic() >= next_maintenance:
                    await self.feed.heartbeat()
                    await self.handle(await self.feed.claim_stale(self.claim_idle_ms, self.batch))
                    trims += 1
                    if trims % 10 == 0:
                        await self.feed.trim()
                    next_maintenance = time.monotonic() + self.maintenance_s
                entries = await self.feed.read(self.batch, self.block_ms)
                if entries:
                    await self.handle(entries)
                elif self.block_ms is None:
                    await asyncio.sleep(0.002)
                backoff = 0.05
            except Exception as e:  # noqa: BLE001 - the projector must outlive any one failure
                if isinstance(e, (ConnectionError, TimeoutError, BusyLoadingError, OSError)):
                    log.warning("redis unavailable (%s); retrying in %.2fs", e, backoff)
                else:
                    log.exception("projector batch failed; retrying in %.2fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                try:
                    await self._start()
                except (ConnectionError, TimeoutError, BusyLoadingError, OSError):
                    pass

    async def _start(self) -> None:
        await self.feed.ensure_groups()
        await self.feed.heartbeat()

    async def handle(self, entries: list[FeedEntry]) -> None:
        if not entries:
            return
        await self.catch_up({e.session_id for e in entries})
        await self.feed.ack(entries)

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
                if not ok or u.to_version < head:
                    todo.append(u.session_id)
