"""Connecting: pooled clients with deadlines, hiredis on, retries off.

Every command has a deadline (`timeout_s`): a paused or unreachable Redis fails a request in about a second
instead of hanging it. Blocking reads (XREAD BLOCK, BLPOP) get a client of their own whose deadline is their
longest block plus that margin, so a quiet stream is not mistaken for a dead Redis.

Retries stay off on purpose: a retried append after a lost reply could write twice. A write whose reply is lost
answers 503 and the client retries with its Idempotency-Key, which makes the retry safe (and APPEND itself
recognises its own events, see `scripts.APPEND`).
"""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio import BlockingConnectionPool, Connection, Redis

from shared.config import Settings
from shared.adapters.redis.keys import Keys

try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is a dependency
    _hiredis_pack = None

BLOCK_MAX_S = 5.0
"""The longest any blocking read of ours blocks; the blocking client's deadline is this plus `timeout_s`."""


class Deadlines(msgspec.Struct, frozen=True, kw_only=True):
    timeout_s: float = 1.0
    connect_timeout_s: float = 1.0
    pool_size: int = 256
    pool_wait_s: float = 0.25

    @classmethod
    def of(cls, settings: Settings) -> Deadlines:
        return cls(
            timeout_s=settings.redis_timeout_s,
            connect_timeout_s=settings.redis_connect_timeout_s,
            pool_size=settings.redis_pool_size,
            pool_wait_s=settings.redis_pool_wait_s,
        )


class HiredisPackingConnection(Connection):
    """Packs commands with hiredis (C) instead of redis-py's Python packer.

    redis-py 5 uses hiredis's packer only for synchronous clients; for an APPEND call with
    ~20 arguments the Python packer was the largest single cost of a write in profiles.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # redis-py sends e.g. "SCRIPT LOAD" as one argument
            args = (*args[0].split(), *args[1:])
        return [_hiredis_pack(args)]


def connect(url: str, deadlines: Deadlines = Deadlines()) -> Redis:
    """The client for ordinary commands. Its pool waits at most `pool_wait_s` for a free connection, then raises
    `ConnectionError("No connection available.")`, which the API answers with 503 `overloaded`."""
    return _client(url, deadlines.timeout_s, deadlines.connect_timeout_s, deadlines.pool_size, deadlines.pool_wait_s)


def connect_blocking(url: str, deadlines: Deadlines = Deadlines(), size: int = 128) -> Redis:
    """The client for blocking reads: a few per process (shared readers, the projector, the wake-up listener)."""
    timeout = BLOCK_MAX_S + deadlines.timeout_s
    return _client(url, timeout, deadlines.connect_timeout_s, size, deadlines.pool_wait_s + BLOCK_MAX_S)


def _client(url: str, timeout: float, connect_timeout: float, size: int, wait: float) -> Redis:
    extra = {"connection_class": HiredisPackingConnection} if _hiredis_pack and url.startswith("redis://") else {}
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=size,
        timeout=wait,
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout,
        health_check_interval=30,
        socket_keepalive=True,
        **extra,
    )
    return Redis.from_pool(pool)  # the client owns (and closes) the pool


async def check_partitions(redis: Redis, partitions: int) -> None:
    """The partition count is fixed at first start; a process configured otherwise refuses to run."""
    await redis.hsetnx(Keys.config, "partitions", partitions)
    stored = int(await redis.hget(Keys.config, "partitions"))
    if stored != partitions:
        raise RuntimeError(f"this Redis holds {stored} partitions but PARLEY_PARTITIONS is {partitions}")
