"""The projector process's loops: read the feed (which sessions changed), project them, acknowledge.

Any crash point is safe: an unacknowledged entry is claimed again by a live consumer, and re-applying is a no-op
because the read model's version already moved (`shared.app.projection`).
"""

from __future__ import annotations

import asyncio
import contextlib

from shared.app.ports import Feed
from shared.app.projection import Projection

__all__ = ["Projector"]


class Projector:
    def __init__(
        self,
        projection: Projection,
        feed: Feed,
        batch: int = 256,
        claim_idle_ms: int = 2_000,
        block_ms: int | None = 1_000,
        maintenance_s: float = 1.0,
    ) -> None:
        """`block_ms=None` polls instead of blocking (fakeredis answers a blocking read at once)."""
        self.projection = projection
        self.feed = feed
        self.batch = batch
        self.claim_idle_ms = claim_idle_ms
        self.block_ms = block_ms
        self.maintenance_s = maintenance_s

    async def run(self, stop: asyncio.Event) -> None:
        """Project until `stop` is set. Store errors propagate: the supervisor retries them (`shared.supervise`)."""
        await self._start()
        while not stop.is_set():
            entries = await self.feed.read(self.batch, self.block_ms)
            if entries:
                await self.projection.handle(entries)
            elif self.block_ms is None:
                await asyncio.sleep(0.002)

    async def maintain(self, stop: asyncio.Event) -> None:
        """Every `maintenance_s`: heartbeat, take over what dead consumers left unacknowledged, and now and then
        trim the feeds. A part of its own, so a slow trim never delays projection."""
        await self._start()
        rounds = 0
        while not stop.is_set():
            await self.feed.heartbeat()
            await self.projection.handle(await self.feed.claim_stale(self.claim_idle_ms, self.batch))
            rounds += 1
            if rounds % 10 == 0:
                await self.feed.trim()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.maintenance_s)

    async def _start(self) -> None:
        await self.feed.ensure_groups()
        await self.feed.heartbeat()
