"""Connecting: pooled clients with deadlines, hiredis on, retries off.

Every command has a deadline (`timeout_s`): a paused or unreachable Redis fails a request in about a second
instead of hanging it. Blocking reads (XREAD BLOCK, BLPOP) get a client of their own whose deadline is their
longest block plus that margin, so a quiet stream is not mistaken for a dead Redis.

Retries stay off on purpose: a retried append after a lost reply could write twice. A write whose reply is lost
answers 503 and the client retries with its Idempotency-Key, which makes the retry safe (and APPEND itself
recognises its own events, see `lua/append.lua`).

`REDIS_URL=redis+cluster://host:port[,host:port…]` (or any Redis URL with `PARLEY_REDIS_CLUSTER=1`) connects to a
Redis Cluster (`shared.adapters.redis.cluster`); every other URL to one Redis. On a cluster each node has a pool of
`pool_size` connections, and a command that finds its node's pool full fails at once (redis-py's cluster nodes do
not wait for a free connection), which the API answers with 503 `overloaded` as on one Redis.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec
from redis.asyncio import BlockingConnectionPool, Connection, Redis
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException

from shared.adapters.redis.cluster import Client, ParleyCluster, is_cluster_url, parse_cluster_url
from shared.adapters.redis.keys import Keys
from shared.config import Settings

__all__ = [
    "BLOCK_MAX_S",
    "Client",
    "Deadlines",
    "ParleyConnection",
    "check_partitions",
    "connect",
    "connect_blocking",
    "is_cluster",
    "ping",
    "queue_url",
    "uses_cluster",
]


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


class ParleyConnection(Connection):
    """redis-py's connection, with two changes. It packs commands with hiredis (C) instead of redis-py's Python
    packer: redis-py 5 uses hiredis's packer only for synchronous clients, and for an APPEND call with ~20 arguments
    the Python packer was the largest single cost of a write in profiles. And a write to a transport that closed
    meanwhile is a `ConnectionError` under uvloop too (`_send_packed_command`)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # redis-py sends e.g. "SCRIPT LOAD" as one argument
            args = (*args[0].split(), *args[1:])
        return [_hiredis_pack(args)]

    async def _send_packed_command(self, command: Iterable[bytes]) -> None:
        """uvloop answers a write to a transport Redis closed meanwhile (killed mid-connect) with RuntimeError ("the
        handler is closed"), not an OSError: as an OSError it becomes redis-py's ConnectionError, a store that is out
        of reach (503 `store_unavailable`, a part retried), not a bug (500, a part that exits)."""
        try:
            await super()._send_packed_command(command)
        except RuntimeError as e:
            if "closed" not in str(e):
                raise
            raise ConnectionResetError(f"the connection closed under a write: {e}") from e


def uses_cluster(settings: Settings) -> bool:
    """`redis+cluster://…` or PARLEY_REDIS_CLUSTER=1."""
    return settings.on_cluster()


def queue_url(settings: Settings) -> str:
    """The chat queue's Redis: `PARLEY_QUEUE_URL`, else `REDIS_URL` when that is one Redis. arq needs MULTI/WATCH
    across its keys and has no cluster support, so on a cluster the queue must be a Redis of its own."""
    if settings.queue_url:
        if is_cluster_url(settings.queue_url):
            raise RuntimeError(
                "PARLEY_QUEUE_URL must be a standalone (or Sentinel-fronted) Redis, not a cluster: arq needs MULTI"
            )
        return settings.queue_url
    if uses_cluster(settings):
        raise RuntimeError(
            "REDIS_URL is a Redis Cluster, and the chat queue (arq) cannot run on one: set PARLEY_QUEUE_URL to a "
            "standalone Redis for the queue"
        )
    assert settings.redis_url
    return settings.redis_url


def is_cluster(client: object) -> bool:
    return isinstance(client, ParleyCluster)


def connect(url: str, deadlines: Deadlines = Deadlines(), cluster: bool = False) -> Client:
    """The client for ordinary commands. Its pool waits at most `pool_wait_s` for a free connection, then raises
    `ConnectionError("No connection available.")`, which the API answers with 503 `overloaded`. `cluster`: the URL
    is a cluster's even if its scheme does not say so (PARLEY_REDIS_CLUSTER=1)."""
    if cluster or is_cluster_url(url):
        return _cluster(url, deadlines.timeout_s, deadlines.connect_timeout_s, deadlines.pool_size)
    return _client(url, deadlines.timeout_s, deadlines.connect_timeout_s, deadlines.pool_size, deadlines.pool_wait_s)


def connect_blocking(url: str, deadlines: Deadlines = Deadlines(), size: int = 128, cluster: bool = False) -> Client:
    """The client for blocking reads: a few per process (shared readers, the projector, the wake-up listener); on a
    cluster the projector holds one per partition (`RedisFeed`), so `size` is per node."""
    timeout = BLOCK_MAX_S + deadlines.timeout_s
    if cluster or is_cluster_url(url):
        return _cluster(url, timeout, deadlines.connect_timeout_s, size)
    return _client(url, timeout, deadlines.connect_timeout_s, size, deadlines.pool_wait_s + BLOCK_MAX_S)


def _cluster(url: str, timeout: float, connect_timeout: float, size: int) -> ParleyCluster:
    parsed = parse_cluster_url(url)
    extra: dict[str, Any] = {"connection_class": ParleyConnection} if _hiredis_pack and not parsed.ssl else {}
    return ParleyCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes],
        username=parsed.username,
        password=parsed.password,
        ssl=parsed.ssl,
        max_connections=size,
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout,
        socket_keepalive=True,
        health_check_interval=30,
        cluster_error_retry_attempts=0,  # retries off, as on one Redis (see `cluster.Pipeline`)
        connection_error_retry_attempts=0,
        **extra,
    )


async def ping(client: Client) -> bool:
    """Every primary of a cluster answers (a node down makes part of the sessions unreachable), or the one Redis."""
    if isinstance(client, ParleyCluster):
        await client.ping(target_nodes=ParleyCluster.PRIMARIES)
        return True
    return bool(await client.ping())


def _client(url: str, timeout: float, connect_timeout: float, size: int, wait: float) -> Redis:
    extra = {"connection_class": ParleyConnection} if _hiredis_pack and url.startswith("redis://") else {}
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


async def check_partitions(redis: Client, partitions: int) -> None:
    """The partition count is fixed at first start; a process configured otherwise refuses to run."""
    try:
        await redis.hsetnx(Keys.config, "partitions", partitions)
    except RedisClusterException as e:  # no startup node answers yet: as transient as a refused connection
        if "cannot be connected" in str(e):
            raise RedisConnectionError(str(e)) from e
        raise
    stored = int(await redis.hget(Keys.config, "partitions"))
    if stored != partitions:
        raise RuntimeError(f"this Redis holds {stored} partitions but PARLEY_PARTITIONS is {partitions}")
