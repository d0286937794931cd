"""The one composition root: settings → adapters → use cases.

The API, the worker and the `parley` command all call `start`, so they are wired the same way, with the same
timeouts and caches; nothing else in `services/` imports an adapter. `Parley` is what they get: the ports and the use
cases, typed, and the supervisor their long-running parts run under. `in_memory` wires the same use cases on the
memory adapters (`shared/adapters/memory`): the use cases' tests run a whole Parley without Redis. Both end in
`_compose`, so the two cannot wire the use cases differently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
from redis.asyncio import Redis

from shared.adapters.llm.metered import Metered
from shared.adapters.llm.offline import OfflineModel
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
from shared.adapters.redis.connect import (
    Deadlines,
    check_partitions,
    connect,
    connect_blocking,
    ping,
    queue_url,
    uses_cluster,
)
from shared.adapters.redis.feed import RedisFeed
from shared.adapters.redis.history import RedisHistory
from shared.adapters.redis.keys import Keys
from shared.adapters.redis.limits import RedisLimits, tenant_defaults
from shared.adapters.redis.notify import Notifier
from shared.adapters.redis.queue import ChatQueue as ArqChatQueue
from shared.adapters.redis.queue import chat_worker
from shared.adapters.redis.store import RedisStore
from shared.adapters.redis.webhooks import RedisWebhooks
from shared.adapters.tokenizer import Tokenizer
from shared.adapters.webhook_sender import HttpWebhookSender
from shared.app.admission import Admissions
from shared.app.chat_run import ChatRunner
from shared.app.chats import Chats
from shared.app.completions import Completions
from shared.app.history import History
from shared.app.ports import (
    ApiKeys,
    ChatJobs,
    ChatQueue,
    EventLog,
    Feed,
    Limits,
    LogAdmin,
    ModelProvider,
    ReadModels,
    Wakeups,
    Webhooks,
    WebhookSender,
)
from shared.app.projection import Projection
from shared.app.rebuild import Rebuilder
from shared.app.retention import RetentionSweeper
from shared.app.schedules import Scheduler, Schedules
from shared.app.service import SessionService
from shared.app.sessions import Sessions
from shared.app.tenancy import Tenancy
from shared.app.webhooks import DeliveryPolicy, WebhookDeliverer, WebhookSubscriptions
from shared.config import Settings
from shared.domain.commands import Limits as ContentLimits
from shared.domain.webhooks import Delivery
from shared.domain.wire import Usage
from shared.observability import metrics, tracing
from shared.supervise import Supervisor, until_available

if TYPE_CHECKING:  # imported when a model URL is set (it loads aiohttp)
    from shared.adapters.llm.openai_compat import OpenAICompatible

__all__ = ["Adapters", "ChatWorker", "Parley", "dev_store_url", "embedded_store", "in_memory", "make_provider", "start"]

log = logging.getLogger("parley")


class ChatWorker(Protocol):
    """The loop that runs the queue's chat jobs (arq's on Redis, `MemoryChatWorker` in memory): `poll` and, when
    it has a `wake_client`, `listen` run as supervised parts; `handle_sig` stops the jobs in flight."""

    @property
    def wake_client(self) -> object: ...

    async def poll(self, stop: asyncio.Event) -> None: ...

    async def listen(self, stop: asyncio.Event) -> None: ...

    def handle_sig(self, signum: signal.Signals) -> None: ...


@dataclass(frozen=True)
class Adapters:
    """One adapter per port: what `_compose` wires the use cases on."""

    log: EventLog
    views: ReadModels
    jobs: ChatJobs
    queue: ChatQueue
    feed: Feed
    """The feed a reader's help (`Projection`) reads the backlog through."""
    wakeups: Wakeups
    admin: LogAdmin
    api_keys: ApiKeys
    limits: Limits
    webhooks: Webhooks
    webhook_sender: WebhookSender


@dataclass
class Parley:
    """Everything a process needs, wired once."""

    settings: Settings
    supervisor: Supervisor
    # ports
    log: EventLog
    views: ReadModels
    jobs: ChatJobs
    queue: ChatQueue
    feed: Feed
    wakeups: Wakeups
    admin: LogAdmin
    api_keys: ApiKeys
    limits: Limits
    webhooks: Webhooks
    webhook_sender: WebhookSender
    # use cases
    admissions: Admissions
    service: SessionService
    sessions: Sessions
    chats: Chats
    completions: Completions
    history: History
    projection: Projection
    tenancy: Tenancy
    retention: RetentionSweeper
    schedules: Schedules
    scheduler: Scheduler
    subscriptions: WebhookSubscriptions
    stream_secret: bytes
    ping: Callable[[], Awaitable[Any]]
    """Asks the store whether it answers (readiness)."""
    make_feed: Callable[[str], Feed]
    """A feed consumer of the given name, reading with the blocking client."""
    make_chat_worker: Callable[[ChatRunner], ChatWorker]
    """The queue's worker loop around a chat runner."""
    fake: bool = False
    """The store is fakeredis in memory (`parley dev` without a redis-server): blocking reads are polled."""
    memory: Memory | None = None
    """The memory adapters' store (`in_memory`); None on Redis."""
    _closers: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)

    def projector_feed(self, consumer: str | None = None) -> Feed:
        """A feed consumer of this process's own (the projector loop reads the feeds through it)."""
        return self.make_feed(consumer or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}")

    def chat_runner(self, provider: ModelProvider | None = None) -> ChatRunner:
        """The chat job's run (a worker's), on the deployment's model unless `provider` is given."""
        if provider is None:  # one of ours: its connections close with the process's other clients
            made = make_provider(self.settings)
            self._closers.append(made.aclose)
            provider = made
        return ChatRunner(
            self.service,
            self.jobs,
            Metered(provider),
            _counter_for,
            on_usage=_count_tokens,
            limits=self.limits,
            queue=self.queue,
        )

    def webhook_deliverer(
        self,
        holder: str,
        on_attempt: Callable[[Delivery], None] = lambda d: None,
        on_lag: Callable[[str, float], None] = lambda sub_id, s: None,
    ) -> WebhookDeliverer:
        """The webhook deliverer of a worker (`holder` names it in the subscriptions' leases)."""
        s = self.settings
        policy = DeliveryPolicy(
            max_attempts=s.webhook_max_attempts,
            retry_base_s=s.webhook_retry_base_s,
            retry_max_s=s.webhook_retry_max_s,
            poll_s=s.webhook_poll_s,
            lease_s=max(s.webhook_lease_s, 2 * s.webhook_timeout_s),
            keep=s.webhook_deliveries_kept,
        )
        return WebhookDeliverer(
            self.webhooks, self.admin, self.webhook_sender, s.partitions, holder, policy, on_attempt, on_lag
        )

    def rebuilder(self, on_events: Callable[[int], None] = lambda n: None) -> Rebuilder:
        return Rebuilder(self.views, self.admin, self.projection, on_events)

    async def close(self) -> None:
        await self.supervisor.stop_all()
        for close in reversed(self._closers):
            await close()


def make_provider(settings: Settings) -> OpenAICompatible | OfflineModel:
    if settings.model_base_url:
        from shared.adapters.llm.openai_compat import OpenAICompatible

        return OpenAICompatible(
            settings.model_base_url,
            settings.model_api_key,
            settings.model,
            settings.model_max_retries,
            settings.model_timeout_s,
        )
    return OfflineModel()


def _counter_for(model: str) -> Tokenizer:
    return Tokenizer.for_model(model)


def _count_tokens(usage: Usage) -> None:
    metrics.MODEL_TOKENS.labels("prompt").inc(usage.prompt_tokens)
    metrics.MODEL_TOKENS.labels("completion").inc(usage.completion_tokens)


async def start(
    settings: Settings,
    redis: Redis | None = None,
    supervisor: Supervisor | None = None,
    timeout_s: float | None = None,
    wait_for_store: bool = True,
    serves_api: bool = False,
) -> Parley:
    """Connect to `REDIS_URL` (or use `redis`: fakeredis in `parley dev`) and wire everything. A cluster `REDIS_URL`
    (`redis+cluster://…` or PARLEY_REDIS_CLUSTER=1) gets redis-py's cluster client; the chat queue then runs on
    `PARLEY_QUEUE_URL` (arq needs one Redis).

    `timeout_s`: the deadline of every store command (`parley` operations run long scripts); `wait_for_store`:
    wait (with backoff) while the store is unreachable or loading, instead of failing; `serves_api`: this process
    answers HTTP, so it needs the stream tokens' key (made at the deployment's first start; other processes write
    nothing until asked to)."""
    fake = redis is not None and type(redis).__module__.startswith("fakeredis")
    deadlines = Deadlines.of(settings)
    if timeout_s is not None:
        deadlines = Deadlines(
            timeout_s=timeout_s,
            connect_timeout_s=deadlines.connect_timeout_s,
            pool_size=deadlines.pool_size,
            pool_wait_s=deadlines.pool_wait_s,
        )
    if redis is None:
        if not settings.redis_url:
            raise RuntimeError("REDIS_URL is not set")
        cluster = uses_cluster(settings)
        q_url = queue_url(settings)  # refuses a cluster without PARLEY_QUEUE_URL, before connecting to anything
        # the projector keeps one blocking read per partition, and the shared readers up to two more
        blocking_size = max(128, 3 * settings.partitions + 32)
        client = connect(settings.redis_url, deadlines, cluster=cluster)
        blocking = connect_blocking(settings.redis_url, deadlines, size=blocking_size, cluster=cluster)
        closers: list[Callable[[], Awaitable[Any]]] = [client.aclose, blocking.aclose]
        if q_url == settings.redis_url and not cluster:
            queue_client, queue_blocking = client, blocking
        else:  # the chat queue on a Redis of its own (arq cannot run on a cluster)
            queue_client, queue_blocking = connect(q_url, deadlines), connect_blocking(q_url, deadlines, size=16)
            closers += [queue_client.aclose, queue_blocking.aclose]
    else:
        client = blocking = queue_client = queue_blocking = redis
        closers = []
    supervisor = supervisor or Supervisor()
    keys = Keys(settings.partitions)
    store = RedisStore(client, keys, settings.idempotency_ttl_s, settings.chat_retention_s, settings.outbox_maxlen)
    sender = HttpWebhookSender(settings.webhook_timeout_s, settings.webhooks_allow_private)
    closers.append(sender.aclose)

    async def prepare() -> bytes:
        """What a process asks the store before it serves: the partition count it was set up with, the scripts
        (loaded once: pipelines then run them by hash), and the stream tokens' key if it serves HTTP."""
        await check_partitions(client, settings.partitions)
        await store.load_scripts()
        return await _stream_secret(client, settings) if serves_api else b""

    # the store may be down or loading, at any of these steps: wait for it (with backoff) rather than die
    secret = await (until_available(prepare, "the store") if wait_for_store else prepare())
    if tracing.enabled():  # an `append` span per write: the request's, the job's context and answer
        store.append = tracing.traced("append", store.append)  # type: ignore[method-assign]
    adapters = Adapters(
        log=store,
        views=store,
        jobs=ChatStore(client, keys, settings.chat_retention_s),
        queue=ArqChatQueue(queue_client),
        feed=RedisFeed(client, keys, "assist"),
        wakeups=Notifier(blocking, keys, supervisor, poll_s=0.01 if fake else None),
        admin=RedisHistory(client, keys),
        api_keys=RedisApiKeys(client),
        limits=RedisLimits(client, keys, tenant_defaults(settings)),
        webhooks=RedisWebhooks(client, keys),
        webhook_sender=sender,
    )

    def make_chat_worker(runner: ChatRunner) -> ChatWorker:
        _warm_tokenizer(settings)
        return chat_worker(
            queue_client,
            None if fake else queue_blocking,
            runner.run,
            runner.fail,
            claim_s=settings.chat_claim_s,
            max_jobs=settings.worker_max_jobs,
            job_timeout_s=max(settings.model_timeout_s * (settings.model_max_retries + 1) * 2, 60),
            poll_delay_s=settings.worker_poll_delay_s,
            after_waiting=runner.requeue,
        )

    return _compose(
        settings,
        supervisor,
        adapters,
        secret=secret,
        ping=lambda: _ping(client, queue_client),
        fake=fake,
        closers=closers,
        make_feed=lambda consumer: RedisFeed(client, keys, consumer, blocking),
        make_chat_worker=make_chat_worker,
    )


async def in_memory(settings: Settings, memory: Memory | None = None, supervisor: Supervisor | None = None) -> Parley:
    """The whole Parley on the memory adapters, wired as `start` wires it on Redis: for the use cases' tests (fast,
    no Redis), or a deployment that needs nothing to survive it. `memory`: share one store between several of these
    (one per process of the same deployment); its partitions must be `settings.partitions`."""
    if memory is None:
        memory = Memory(settings.partitions)
    elif memory.partitions != settings.partitions:
        raise ValueError(f"the memory store has {memory.partitions} partitions, the settings {settings.partitions}")
    supervisor = supervisor or Supervisor()
    sender = HttpWebhookSender(settings.webhook_timeout_s, settings.webhooks_allow_private)
    adapters = Adapters(
        log=MemoryEventLog(memory, settings.idempotency_ttl_s),
        views=MemoryReadModels(memory, settings.chat_retention_s, settings.outbox_maxlen),
        jobs=MemoryChatJobs(memory, settings.chat_retention_s),
        queue=MemoryChatQueue(memory),
        feed=MemoryFeed(memory, "assist"),
        wakeups=MemoryWakeups(memory),
        admin=MemoryLogAdmin(memory),
        api_keys=MemoryApiKeys(memory),
        limits=MemoryLimits(memory, tenant_defaults(settings)),
        webhooks=MemoryWebhooks(memory),
        webhook_sender=sender,
    )
    secret = settings.stream_token_secret.encode() if settings.stream_token_secret else secrets.token_bytes(32)

    def make_chat_worker(runner: ChatRunner) -> ChatWorker:
        return MemoryChatWorker(
            memory,
            runner.run,
            runner.fail,
            max_jobs=settings.worker_max_jobs,
            poll_delay_s=settings.worker_poll_delay_s,
            after_waiting=runner.requeue,
        )

    async def ping() -> bool:
        return True

    parley = _compose(
        settings,
        supervisor,
        adapters,
        secret=secret,
        ping=ping,
        fake=False,
        closers=[sender.aclose],
        make_feed=lambda consumer: MemoryFeed(memory, consumer),
        make_chat_worker=make_chat_worker,
    )
    parley.memory = memory
    return parley


def _compose(
    settings: Settings,
    supervisor: Supervisor,
    a: Adapters,
    *,
    secret: bytes,
    ping: Callable[[], Awaitable[Any]],
    fake: bool,
    closers: list[Callable[[], Awaitable[Any]]],
    make_feed: Callable[[str], Feed],
    make_chat_worker: Callable[[ChatRunner], ChatWorker],
) -> Parley:
    """The use cases on the adapters: the one place that wires them."""
    projection = Projection(a.views, a.feed, a.queue, a.limits)
    service = SessionService(
        a.log,
        a.views,
        settings.partitions,
        ContentLimits(
            max_content_chars=settings.max_content_chars,
            max_schedules=settings.max_schedules,
            min_schedule_interval_s=settings.schedule_min_interval_s,
        ),
        settings.read_timeout_s,
        settings.state_cache_size,
        projection=projection,
        read_assist_s=settings.read_assist_s,
    )
    history = History(service, a.admin, a.jobs)
    chats = Chats(service, a.jobs, a.queue, a.limits, a.wakeups, settings.model)
    sessions = Sessions(service, history, a.wakeups, a.limits, secret, settings.stream_token_ttl_s)
    schedules = Schedules(service, chats, settings.schedule_grace_s)
    return Parley(
        settings=settings,
        supervisor=supervisor,
        log=a.log,
        views=a.views,
        jobs=a.jobs,
        queue=a.queue,
        feed=a.feed,
        wakeups=a.wakeups,
        admin=a.admin,
        api_keys=a.api_keys,
        limits=a.limits,
        webhooks=a.webhooks,
        webhook_sender=a.webhook_sender,
        admissions=Admissions(a.limits, max_lease=settings.rate_lease_max, lease_s=settings.rate_lease_s),
        service=service,
        sessions=sessions,
        chats=chats,
        completions=Completions(service, chats, a.jobs, settings.model),
        history=history,
        projection=projection,
        tenancy=Tenancy(a.limits),
        retention=RetentionSweeper(sessions, a.views, settings.partitions, settings.retention_batch),
        schedules=schedules,
        scheduler=Scheduler(schedules, a.views, settings.partitions, settings.schedule_batch),
        subscriptions=WebhookSubscriptions(a.webhooks, a.webhook_sender),
        stream_secret=secret,
        ping=ping,
        fake=fake,
        _closers=closers,
        make_feed=make_feed,
        make_chat_worker=make_chat_worker,
    )


async def _ping(store: Any, queue: Any) -> bool:
    """The store (every primary of a cluster) and, when it is another Redis, the chat queue's."""
    await ping(store)
    if queue is not store:
        await queue.ping()
    return True


def _warm_tokenizer(settings: Settings) -> None:
    """Loading the encodings takes about a second: not on a chat's clock, and not on the event loop."""
    threading.Thread(
        target=lambda: Tokenizer.for_model(settings.model).count("warm up"), name="tokenizer-warm-up", daemon=True
    ).start()


async def _stream_secret(redis: Any, settings: Settings) -> bytes:
    """The HMAC key of stream tokens: the configured one, else one made at first start and kept in Redis, so that
    every API process accepts the tokens any of them gave out."""
    if settings.stream_token_secret:
        return settings.stream_token_secret.encode()
    await redis.hsetnx(Keys.config, "stream_token_secret", secrets.token_hex(32))
    return bytes(await redis.hget(Keys.config, "stream_token_secret"))


@contextlib.contextmanager
def embedded_store(settings: Settings) -> Iterator[tuple[Settings, Redis | None]]:
    """The store of `parley dev`: `REDIS_URL` if set, else a private redis-server under `PARLEY_DATA_DIR` (AOF on,
    its port written down for `parley` commands), else fakeredis in memory. Yields the settings to run with and the
    client to use instead of connecting (fakeredis), or None."""
    from shared.adapters.redis.server import RedisServer, redis_server_binary

    if settings.redis_url:
        log.info("store: %s", settings.redis_url)
        yield settings, None
        return
    binary = redis_server_binary()
    if binary is None:
        import fakeredis

        log.warning("store: fakeredis in memory; nothing survives a restart (install redis-server to keep data)")
        yield settings, fakeredis.FakeAsyncRedis()
        return
    data = Path(settings.data_dir) / "redis"
    server = RedisServer(data, binary=binary).start()
    try:
        (Path(settings.data_dir) / "redis.port").write_text(str(server.port))
        log.info("store: private redis-server on %s, data in %s (AOF, fsync every second)", server.url, data)
        yield msgspec.structs.replace(settings, redis_url=server.url), None
    finally:
        server.stop()


def dev_store_url(settings: Settings) -> str | None:
    """`REDIS_URL`, else the private redis-server a running `parley dev` wrote down (None: neither)."""
    if settings.redis_url:
        return settings.redis_url
    port_file = Path(settings.data_dir) / "redis.port"
    if port_file.exists():
        return f"redis://127.0.0.1:{port_file.read_text().strip()}/0"
    return None
