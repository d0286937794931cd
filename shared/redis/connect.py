"""Connecting: one pooled client per process, hiredis on, retries off.

Retries stay off on purpose: a retried append after a lost reply could write
twice. A write whose reply is lost answers 503 and the client retries with its
Idempotency-Key, which makes the retry safe.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Connection, Redis

from shared.redis.keys import Keys

try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is a dependency
    _hiredis_pack = None


class HiredisPackingConnection(Connection):
    """Packs commands with hiredis (C) instead of redis-py's Python packer.

    redis-py 5 uses hiredis's packer only for synchronous clients; for an APPEND call with
    ~20 arguments the Python packer was the largest single cost of a write in profiles.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # redis-py sends e.g. "SCRIPT LOAD" as one argument
            args = (*args[0].split(), *args[1:])
        return [_hiredis_pack(args)]


def connect(url: str, max_connections: int = 256) -> Redis:
    """A client whose pool waits for a free connection rather than failing: a synchronous chat holds one
    while it blocks on its job's chunk stream."""
    extra = {"connection_class": HiredisPackingConnection} if _hiredis_pack and url.startswith("redis://") else {}
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=10, health_check_interval=30, socket_keepalive=True, **extra
    )
    return Redis.from_pool(pool)  # the client owns (and closes) the pool


async def check_partitions(redis: Redis, partitions: int) -> None:
    """The partition count is fixed at first start; a process configured otherwise refuses to run."""
    await redis.hsetnx(Keys.config, "partitions", partitions)
    stored = int(await redis.hget(Keys.config, "partitions"))
    if stored != partitions:
        raise RuntimeError(f"this Redis holds {stored} partitions but PARLEY_PARTITIONS is {partitions}")
