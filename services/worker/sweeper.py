"""The retention sweeper's loop in a worker: one bounded pass every `PARLEY_RETENTION_SWEEP_S`, its progress in
`/metrics` (`shared.app.retention` decides what goes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from shared.app.retention import RetentionSweeper
from shared.observability import metrics

__all__ = ["sweep_forever"]

log = logging.getLogger("parley.worker")


async def sweep_forever(sweeper: RetentionSweeper, stop: asyncio.Event, every_s: float) -> None:
    """A store error ends this part (its supervisor runs it again); a pass that did not wrap around goes on at
    once, so a backlog drains in bounded steps instead of waiting a whole interval per batch."""
    while not stop.is_set():
        done = await sweeper.sweep()
        metrics.RETENTION_SCANNED.inc(done.scanned)
        for item in done.expired:
            if item.done:
                metrics.RETENTION_REMOVED.labels(item.action).inc()
        freed = sum(t.messages for t in done.trimmed if t.done)
        metrics.RETENTION_TRIMMED.inc(freed)
        if done.expired or freed:
            removed = sum(1 for e in done.expired if e.done)
            log.info(
                "retention sweep",
                extra={"fields": {"scanned": done.scanned, "removed": removed, "trimmed_messages": freed}},
            )
        if done.wrapped:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
