"""A worker part that samples what only Redis knows into gauges: each partition's projection lag and pending
entries (projector role), and the chat queue's depth (chat role). Every few seconds, a couple of pipelined round
trips; every worker of a role reports the same values, so dashboards take the max over workers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from shared.app.ports import Feed
from shared.observability import metrics

__all__ = ["SAMPLE_EVERY_S", "sample"]

SAMPLE_EVERY_S = 2.0


async def sample(
    stop: asyncio.Event,
    feed: Feed | None,
    queue_depth: Callable[[], Awaitable[int]] | None,
    every_s: float = SAMPLE_EVERY_S,
) -> None:
    while not stop.is_set():
        if feed is not None:
            now_ms = time.time() * 1000
            for lag in await feed.lag():
                p = str(lag.partition)
                metrics.PROJECTION_LAG_ENTRIES.labels(p).set(lag.entries)
                metrics.FEED_PENDING.labels(p).set(lag.pending)
                metrics.PROJECTION_LAG_SECONDS.labels(p).set(
                    0 if lag.oldest_ms is None else max(0.0, (now_ms - lag.oldest_ms) / 1000)
                )
        if queue_depth is not None:
            metrics.CHAT_QUEUE_DEPTH.set(await queue_depth())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
