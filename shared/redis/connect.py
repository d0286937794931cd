"""Connecting: one pooled client per process, hiredis on, retries off.

Retries stay off on purpose: a retried append after a lost reply could write
twice. A write whose reply is lost answers 503 and the client retries with its
Idempotency-Key, which makes the retry safe.
"""

from __future__ import annotations

from redis.asyncio import Redis

from shared.redis.keys import Keys


def connect(url: str, max_connections: int = 64) -> Redis:
    return Redis.from_url(url, max_connections=max_connections, health_check_interval=30, socket_keepalive=True)


async def check_partitions(redis: Redis, partitions: int) -> None:
    """The partition count is fixed at first start; a process configured otherwise refuses to run."""
    await redis.hsetnx(Keys.config, "partitions", partitions)
    stored = int(await redis.hget(Keys.config, "partitions"))
    if stored != partitions:
        raise RuntimeError(f"this Redis holds {stored} partitions but PARLEY_PARTITIONS is {partitions}")
