"""The webhook deliverer's part in a worker: deliveries counted and the outbox lag in `/metrics`
(`shared.app.webhooks` decides what goes where)."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket

from shared.bootstrap import Parley
from shared.domain.webhooks import Delivery
from shared.observability import metrics

__all__ = ["deliver_forever"]


async def deliver_forever(parley: Parley, stop: asyncio.Event) -> None:
    lags: dict[str, float] = {}

    def on_attempt(delivery: Delivery) -> None:
        metrics.WEBHOOK_DELIVERIES.labels(delivery.outcome).inc()

    def on_lag(sub_id: str, seconds: float) -> None:
        if seconds:
            lags[sub_id] = seconds
        else:
            lags.pop(sub_id, None)
        metrics.WEBHOOK_LAG_SECONDS.set(max(lags.values(), default=0.0))

    holder = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    await parley.webhook_deliverer(holder, on_attempt, on_lag).run(stop)
