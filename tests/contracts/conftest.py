"""The contract suites' one fixture: `backend`, every port's adapter on one store, run three times — in memory, on
fakeredis and on a real redis-server. Each test is written once against the ports; where the three disagree, an
adapter breaks its port's promise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import fakeredis
import pytest
from redis.asyncio import Redis

import shared.adapters.redis.queue as redis_queue
from shared.adapters.memory import (
    Memory,
    MemoryApiKeys,
    MemoryChatJobs,
    MemoryChatQueue,
    MemoryChatWorker,
    MemoryEventLog,
    MemoryFeed,
    MemoryLimits,
    MemoryLogAdmin,
    MemoryReadModels,
    MemoryWakeups,
)
from shared.adapters.memory.webhooks import MemoryWebhooks
from shared.adapters.redis.api_keys import RedisApiKeys
from shared.adapters.redis.chats import ChatStore
from shared.adapters.redis.feed import RedisFeed
from shared.adapters.redis.history import RedisHistory
from shared.adapters.redis.keys import Keys
from shared.adapters.redis.limits import RedisLimits
from shared.adapters.redis.notify import Notifier
from shared.adapters.redis.queue import ChatQueue as RedisChatQueue
from shared.adapters.redis.queue import chat_worker
from shared.adapters.redis.store import RedisStore
from shared.adapters.redis.webhooks import RedisWebhooks
from shared.app.ports import (
    AfterWaiting,
    ApiKeys,
    Appended,
    ChatJobs,
    ChatQueue,
    EventLog,
    Feed,
    JobFailer,
    JobRunner,
    Limits,
    LogAdmin,
    ReadModels,
    Wakeups,
    Webhooks,
)
from shared.bootstrap import ChatWorker
from shared.domain.commands import AddMessage, Command, CreateSession, Stamp, decide
from shared.domain.ids import uuid7
from shared.domain.projection import project
from shared.domain.state import SessionState, fold
from shared.domain.wire import MessageCreate, SessionCreate, TenantLimits
from shared.supervise import Supervisor
from tests.conftest import cluster_client

PARTITIONS = 4
RETENTION_S = 3_600


@dataclass
class Backend:
    """Every port's adapter, on one store."""

    name: str
    log: EventLog
    views: ReadModels
    jobs: ChatJobs
    queue: ChatQueue
    admin: LogAdmin
    api_keys: ApiKeys
    limits: Callable[[TenantLimits], Limits]
    feed: Callable[[str], Feed]
    """A consumer of the projector's feed, by name."""
    wakeups: Callable[[], Wakeups]
    """A process's wake-ups (each call: another process)."""
    worker: Callable[[JobRunner, JobFailer, int, AfterWaiting | None], ChatWorker]
    """A chat worker over the queue: (run, fail, max tries)."""
    webhooks: Webhooks
    partitions: int = PARTITIONS
    _closers: list[Callable[[], Any]] = field(default_factory=list)


def memory_backend() -> Backend:
    memory = Memory(PARTITIONS)

    def worker(run: JobRunner, fail: JobFailer, max_tries: int, after_waiting: AfterWaiting | None) -> ChatWorker:
        return MemoryChatWorker(memory, run, fail, max_tries=max_tries, poll_delay_s=0.05, after_waiting=after_waiting)

    return Backend(
        name="memory",
        log=MemoryEventLog(memory),
        views=MemoryReadModels(memory, RETENTION_S),
        jobs=MemoryChatJobs(memory, RETENTION_S),
        queue=MemoryChatQueue(memory),
        admin=MemoryLogAdmin(memory),
        api_keys=MemoryApiKeys(memory),
        limits=lambda defaults: MemoryLimits(memory, defaults),
        feed=lambda consumer: MemoryFeed(memory, consumer),
        wakeups=lambda: MemoryWakeups(memory),
        worker=worker,
        webhooks=MemoryWebhooks(memory),
    )


def redis_backend(
    name: str, redis: Redis, monkeypatch: pytest.MonkeyPatch, queue_redis: Redis | None = None
) -> Backend:
    """`queue_redis`: the chat queue's own Redis (a cluster's deployment: arq cannot run on the cluster)."""
    queue_redis = queue_redis or redis
    keys = Keys(PARTITIONS)
    store = RedisStore(redis, keys, chat_retention_s=RETENTION_S)
    supervisors: list[Supervisor] = []
    fake = name == "fakeredis"

    def wakeups() -> Wakeups:
        supervisors.append(supervisor := Supervisor())  # one per process, as each process has its own
        return Notifier(redis, keys, supervisor, block_ms=200, poll_s=0.01 if fake else None)

    def worker(run: JobRunner, fail: JobFailer, max_tries: int, after_waiting: AfterWaiting | None) -> ChatWorker:
        monkeypatch.setattr(redis_queue, "MAX_TRIES", max_tries)
        return chat_worker(
            queue_redis,
            None,
            run,
            fail,
            claim_s=1.0,
            max_jobs=10,
            job_timeout_s=60,
            poll_delay_s=0.05,
            after_waiting=after_waiting,
        )

    backend = Backend(
        name=name,
        log=store,
        views=store,
        jobs=ChatStore(redis, keys, RETENTION_S),
        queue=RedisChatQueue(queue_redis),
        admin=RedisHistory(redis, keys),
        api_keys=RedisApiKeys(redis),
        limits=lambda defaults: RedisLimits(redis, keys, defaults),
        feed=lambda consumer: RedisFeed(redis, keys, consumer),
        wakeups=wakeups,
        worker=worker,
        webhooks=RedisWebhooks(redis, keys),
    )

    async def stop() -> None:
        for supervisor in supervisors:
            await supervisor.stop_all()

    backend._closers.append(stop)
    return backend


@pytest.fixture(params=["memory", "fakeredis", "redis-server", "redis-cluster"])
async def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Backend]:
    """Every contract test runs against the memory adapters, fakeredis, a real redis-server and a real 3-master Redis
    Cluster (its chat queue on the redis-server, as a cluster deployment's is on `PARLEY_QUEUE_URL`)."""
    if request.param == "memory":
        yield memory_backend()
        return
    queue = None
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    elif request.param == "redis-cluster":
        client = await cluster_client(request.getfixturevalue("redis_cluster"))
        queue = Redis.from_url(request.getfixturevalue("redis_server").url)
        await queue.flushall()
    else:
        client = Redis.from_url(request.getfixturevalue("redis_server").url)
        await client.flushall()
    b = redis_backend(request.param, client, monkeypatch, queue)
    try:
        yield b
    finally:
        for close in b._closers:
            await close()
        await client.aclose()
        if queue is not None:
            await queue.aclose()


# -- writing sessions through the ports ----------------------------------------------------------------------------
def stamp() -> Stamp:
    return Stamp(now=datetime.now(UTC), new_id=uuid7)


async def create(log: EventLog, tenant: str = "acme", **fields: Any) -> SessionState:
    state = SessionState(id=uuid7())
    events = decide(state, CreateSession(body=SessionCreate(**fields)), stamp())
    assert await log.append(tenant, state.id, 0, events) == Appended(1)
    return fold(state, events)


async def run(log: EventLog, state: SessionState, command: Command, tenant: str = "acme") -> SessionState:
    events = decide(state, command, stamp())
    assert await log.append(tenant, state.id, state.version, events) == Appended(state.version + len(events))
    return fold(state, events)


async def add(log: EventLog, state: SessionState, content: str, tenant: str = "acme") -> SessionState:
    return await run(log, state, AddMessage(body=MessageCreate(role="user", content=content)), tenant)


async def project_all(views: ReadModels, *session_ids: str) -> None:
    """Bring the sessions' read models to their heads, as the projector does."""
    for sid in session_ids:
        while True:
            [p] = await views.pending([sid])
            assert p is not None
            if not p.events:
                break
            assert await views.apply([(p.tenant, project(p.state, p.events))]) == [True]
