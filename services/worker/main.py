"""The worker process: the projector and the arq chat worker, side by side on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from typing import Any

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix
from arq.worker import Retry, Worker, func
from redis.asyncio import Redis

from shared.config import Settings
from shared.supervise import TRANSIENT, Supervisor
from shared.domain.commands import Limits
from shared.adapters.llm import ModelProvider
from shared.adapters.llm.offline import OfflineModel
from shared.adapters.redis.chats import QUEUE, RUN_CHAT, WAKE, ChatQueue, ChatStore
from shared.adapters.redis.feed import RedisFeed
from shared.adapters.redis.keys import Keys
from shared.adapters.redis.limits import RedisLimits, tenant_defaults
from shared.adapters.redis.store import RedisStore
from shared.app.service import SessionService
from shared.adapters.tokenizer import Tokenizer
from services.worker.chat import ChatRunner
from services.worker.projector import Projector

log = logging.getLogger("parley.worker")

MAX_TRIES = 5
"""Attempts of a chat job that raised an unexpected error before it is failed with `internal_error`."""


def make_provider(settings: Settings) -> ModelProvider:
    if settings.model_base_url:
        from shared.adapters.llm.openai_compat import OpenAICompatible

        return OpenAICompatible(settings.model_base_url, settings.model_api_key, settings.model, settings.model_max_retries, settings.model_timeout_s)
    return OfflineModel()


def chat_hooks(redis: Redis, keys: Keys, settings: Settings) -> dict[str, Any]:
    """What every projector does after projecting chat events: queue the session's next chat, and give back the
    concurrent-chat slots of chats that ended."""
    limits = RedisLimits(redis, keys, tenant_defaults(settings))

    async def ended(tenant: str, job_ids: list[str]) -> None:
        await limits.give(tenant, "chats", *job_ids)

    return {"on_chats": ChatQueue(redis).enqueue, "on_ended": ended}


def make_projector(redis: Redis, blocking: Redis, keys: Keys, settings: Settings, block: bool = True) -> Projector:
    consumer = f"{socket.gethostname()}-{os.getpid()}-{id(redis):x}"
    store = RedisStore(redis, keys, settings.idempotency_ttl_s, settings.chat_retention_s)
    return Projector(
        store, RedisFeed(redis, keys, consumer, blocking), settings.projector_batch, settings.projector_claim_idle_ms,
        1_000 if block else None, **chat_hooks(redis, keys, settings),
    )


class ParleyWorker(Worker):
    """arq's worker, driven by Parley's supervisor instead of `Worker.main`, and woken by the API's push to WAKE
    instead of waiting out its poll delay.

    `poll` and `listen` are two supervised parts (`shared.supervise`): a store error ends them and the supervisor
    runs them again. It also skips arq's start-up INFO call, which fakeredis does not implement.
    """

    def __init__(self, *args: Any, claim_s: float = 5.0, wake: Redis | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_progress_timeout_s = claim_s  # kept alive by the job's heartbeat while it runs
        self.wake_client = wake
        """A client for the blocking wake-up read (None: poll only, for fakeredis)."""
        self._wake = asyncio.Event()

    async def poll(self, stop: asyncio.Event) -> None:
        self.ctx["redis"] = self.pool
        while not stop.is_set():
            self._wake.clear()
            await self._poll_iteration()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_delay_s)

    async def listen(self, stop: asyncio.Event) -> None:
        assert self.wake_client is not None
        while not stop.is_set():
            if await self.wake_client.blpop([WAKE], timeout=1):
                self._wake.set()

    async def main(self) -> None:  # arq's entry point; Parley runs `poll` and `listen` under its supervisor
        raise NotImplementedError("run ParleyWorker.poll / listen under a Supervisor")


def make_chat_worker(
    redis: Redis, blocking: Redis | None, keys: Keys, settings: Settings, provider: ModelProvider | None = None
) -> ParleyWorker:
    """`blocking`: the client of the wake-up listener (None: no listener, the poll alone finds work)."""
    store = RedisStore(redis, keys, settings.idempotency_ttl_s, settings.chat_retention_s)
    service = SessionService(
        store, store, settings.partitions, Limits(max_content_chars=settings.max_content_chars), settings.read_timeout_s * 5,
        settings.state_cache_size, projection=Projector(store, RedisFeed(redis, keys, "assist"), **chat_hooks(redis, keys, settings)),
        read_assist_s=settings.read_assist_s,
    )
    runner = ChatRunner(service, store, ChatStore(redis, keys, settings.chat_retention_s), provider or make_provider(settings))
    claim_ms = int(settings.chat_claim_s * 1000)
    Tokenizer.for_model(settings.model).count("warm up")  # loading the encodings takes about a second: not on a chat's clock

    async def run_chat(ctx: dict[str, Any], tenant: str, session_id: str, job_id: str) -> str:
        key = in_progress_key_prefix + ctx["job_id"]

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(settings.chat_claim_s / 4)
                try:
                    await ctx["redis"].pexpire(key, claim_ms)
                except TRANSIENT as e:  # a missed beat or two is fine; the lease outlives four of them
                    log.warning("chat %s: heartbeat failed (%s); retrying", job_id, e)

        beat = asyncio.create_task(heartbeat())
        try:
            return await runner.run(tenant, session_id, job_id)
        except Exception as e:  # noqa: BLE001 - a job must end as succeeded, failed or cancelled, never stuck running
            if ctx.get("job_try", 1) < MAX_TRIES:
                log.warning("chat %s attempt %s failed (%r); retrying", job_id, ctx.get("job_try"), e)
                raise Retry(defer=min(2 ** ctx.get("job_try", 1) * 0.25, 10)) from e
            log.exception("chat %s failed for good", job_id)
            await runner.fail(tenant, session_id, job_id, "internal_error", "the chat failed inside Parley; see the worker's log")
            return "failed: internal_error"
        finally:
            beat.cancel()

    return ParleyWorker(
        functions=[func(run_chat, name=RUN_CHAT, keep_result=0, max_tries=MAX_TRIES + 10)],  # + crashes
        queue_name=QUEUE,
        redis_pool=ArqRedis(connection_pool=redis.connection_pool),
        handle_signals=False,
        max_jobs=settings.worker_max_jobs,
        job_timeout=max(settings.model_timeout_s * (settings.model_max_retries + 1) * 2, 60),
        keep_result=0,
        poll_delay=settings.worker_poll_delay_s,
        claim_s=settings.chat_claim_s,
        wake=blocking,
    )


async def run_worker(
    redis: Redis, blocking: Redis, settings: Settings, stop: asyncio.Event, supervisor: Supervisor, fake: bool = False
) -> None:
    """Run the projector and the chat worker as supervised parts until `stop` is set, then stop them gracefully:
    the projector finishes and acknowledges its batch before its consumer leaves the group."""
    keys = Keys(settings.partitions)
    projector = make_projector(redis, blocking, keys, settings, block=not fake)
    worker = make_chat_worker(redis, None if fake else blocking, keys, settings)
    parts = [
        supervisor.run("projector", lambda: projector.run(stop)),
        supervisor.run("projector-maintenance", lambda: projector.maintain(stop)),
        supervisor.run("chat-worker", lambda: worker.poll(stop)),
    ]
    if not fake:
        parts.append(supervisor.run("wake-listener", lambda: worker.listen(stop)))
    await stop.wait()
    done, pending = await asyncio.wait(parts, timeout=5)
    for task in pending:  # a part waiting out a store outage: nothing of it is in flight
        task.cancel()
    worker.handle_sig(15)  # cancels chat jobs in flight: their arq leases expire and another worker runs them
    with contextlib.suppress(*TRANSIENT):
        await projector.feed.forget_consumer()
