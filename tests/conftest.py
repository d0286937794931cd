"""Shared fixtures: a throwaway redis-server per test session, fakeredis per test, and both as `redis`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import fakeredis
import pytest
from redis.asyncio import Redis

from shared.adapters.redis.connect import connect
from shared.adapters.redis.server import RedisClusterServers, RedisServer
from tests.support import ParleyProcess


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, shared by the session's tests (each flushes it)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendfsync="always").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A real 3-master Redis Cluster on free loopback ports, shared by the session's tests (each flushes it)."""
    cluster = RedisClusterServers(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


async def cluster_client(cluster: RedisClusterServers) -> Redis:
    """Parley's cluster client on the session's cluster, every primary flushed."""
    client = connect(cluster.url)
    await client.flushall()  # redis-py sends FLUSHALL to every primary
    return client


@pytest.fixture
async def real_redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
async def fake_redis() -> AsyncIterator[Redis]:
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    yield client
    await client.aclose()


@pytest.fixture(params=["fakeredis", "redis-server", "redis-cluster"])
async def redis(request: pytest.FixtureRequest) -> AsyncIterator[Redis]:
    """Every contract test runs against every backend: fakeredis, one redis-server, a 3-master Redis Cluster."""
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    elif request.param == "redis-cluster":
        client = await cluster_client(request.getfixturevalue("redis_cluster"))
    else:
        client = Redis.from_url(request.getfixturevalue("redis_server").url)
        await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list]:
    """Collects started processes and stops them (and fresh redis-servers) at the end of the test."""
    started: list = []
    yield started
    for p in reversed(started):
        p.stop()


@pytest.fixture
def spawn(processes: list, tmp_path: Path):
    """spawn("api"|"worker", redis_url, env=...) → a running ParleyProcess, stopped after the test."""

    def _spawn(role: str, redis_url: str, env: dict[str, str] | None = None) -> ParleyProcess:
        proc = ParleyProcess(role, redis_url, tmp_path, env)
        processes.append(proc)  # before it starts: one that never comes up is stopped too, not left running
        return proc.start()

    return _spawn


@pytest.fixture
def fresh_redis(processes: list, tmp_path: Path):
    """fresh_redis() → a new redis-server of this test alone (AOF, fsync always), to kill and restart."""

    def _make(**kw) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(processes)}", appendfsync="always", **kw).start()
        processes.append(server)
        return server

    return _make
