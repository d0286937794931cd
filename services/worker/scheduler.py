"""The scheduler's loop in a worker: a pass over the schedule index every `PARLEY_SCHEDULE_POLL_S`, its ticks in
`/metrics` (`shared.app.schedules` decides what is due and takes each tick once)."""

from __future__ import annotations

import asyncio
import contextlib

from shared.app.schedules import Scheduler
from shared.observability import metrics

__all__ = ["schedule_forever"]


async def schedule_forever(scheduler: Scheduler, stop: asyncio.Event, every_s: float) -> None:
    """A store error ends this part (its supervisor runs it again: no tick is lost, the index still holds it); a
    pass that took ticks goes on at once, so a backlog within the grace drains without waiting an interval."""
    while not stop.is_set():
        done = await scheduler.run_due()
        metrics.SCHEDULE_TICKS.labels("run").inc(done.runs)
        metrics.SCHEDULE_TICKS.labels("skipped").inc(done.skipped)
        if not done.runs and not done.skipped:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
