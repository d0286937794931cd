"""The worker process: the projector and the chat worker as supervised parts, on one event loop or apart
(`parley worker --role projector|chat|all`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Literal

from services.worker.projector import Projector
from services.worker.sampler import sample
from services.worker.scheduler import schedule_forever
from services.worker.sweeper import sweep_forever
from services.worker.webhooks import deliver_forever
from shared.bootstrap import Parley
from shared.supervise import TRANSIENT

__all__ = ["Role", "run_worker"]

log = logging.getLogger("parley.worker")

Role = Literal["all", "projector", "chat"]


async def run_worker(parley: Parley, stop: asyncio.Event, role: Role = "all", sample_metrics: bool = True) -> None:
    """Run this process's parts until `stop` is set, then stop them gracefully: the projector finishes and
    acknowledges its batch before its consumer leaves the group; chat jobs in flight are cancelled (their leases
    lapse and another worker runs them). `sample_metrics`: keep the lag and queue gauges current (someone
    scrapes them)."""
    settings, supervisor = parley.settings, parley.supervisor
    parts: list[asyncio.Task[None]] = []
    projector = worker = None
    if role in ("all", "projector"):
        projector = Projector(
            parley.projection,
            parley.projector_feed(),
            settings.projector_batch,
            settings.projector_claim_idle_ms,
            None if parley.fake else 1_000,
        )
        parts += [
            supervisor.run("projector", lambda: projector.run(stop)),
            supervisor.run("projector-maintenance", lambda: projector.maintain(stop)),
        ]
    if role in ("all", "chat"):
        worker = parley.make_chat_worker(parley.chat_runner())
        parts.append(supervisor.run("chat-worker", lambda: worker.poll(stop)))
        if worker.wake_client is not None:
            parts.append(supervisor.run("wake-listener", lambda: worker.listen(stop)))
    if projector is not None and settings.retention_sweep_s > 0:
        every = settings.retention_sweep_s
        parts.append(supervisor.run("retention-sweeper", lambda: sweep_forever(parley.retention, stop, every)))
    if projector is not None and settings.schedule_poll_s > 0:
        poll = settings.schedule_poll_s
        parts.append(supervisor.run("scheduler", lambda: schedule_forever(parley.scheduler, stop, poll)))
    if projector is not None and settings.webhook_poll_s > 0:  # the outbox is the projector's: its workers deliver
        parts.append(supervisor.run("webhook-deliverer", lambda: deliver_forever(parley, stop)))
    if sample_metrics:
        feed = parley.feed if projector is not None else None
        depth = parley.queue.depth if worker is not None else None
        parts.append(supervisor.run("metrics-sampler", lambda: sample(stop, feed, depth)))
    await stop.wait()
    _, pending = await asyncio.wait(parts, timeout=5)
    for task in pending:  # a part waiting out a store outage: nothing of it is in flight
        task.cancel()
    if worker is not None:
        worker.handle_sig(15)
    if projector is not None:
        with contextlib.suppress(*TRANSIENT):
            await projector.feed.forget_consumer()
