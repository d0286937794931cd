"""The chat queue on arq: enqueueing a job (the `ChatQueue` port) and the worker loop that runs jobs.

arq gives each job a lease (its in-progress key) that the running job heart-beats; a worker that dies stops
beating and another worker runs the job after `claim_s`. The answer is decided on the session's log (only an
active job completes, with ids derived from its own), so a job run twice answers once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from arq.connections import ArqRedis
from arq.constants import expires_extra_ms, in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms, to_unix_ms
from arq.worker import Retry, Worker, func
from redis.asyncio import Redis

from shared.adapters.redis.keys import PREFIX
from shared.adapters.redis.lua import run_pipeline
from shared.adapters.redis.scripts import ENQUEUE, REGISTRY, START_JOB
from shared.app.ports import MAX_TRIES, AfterWaiting, JobFailer, JobRunner
from shared.observability import logs, metrics, tracing
from shared.supervise import TRANSIENT, until_available

__all__ = ["QUEUE", "RUN_CHAT", "WAKE", "ArqChatWorker", "ChatQueue", "chat_worker"]

log = logging.getLogger("parley.worker")

QUEUE = f"{PREFIX}:{{arq}}:queue"
"""arq's queue (a sorted set) for chat jobs."""
WAKE = f"{PREFIX}:{{arq}}:wake"
"""A list the API pushes to after enqueueing, so an idle worker starts at once instead of at its next poll."""
RUN_CHAT = "run_chat"


class ChatQueue:
    """Enqueues chat jobs on arq. A job id can sit in the queue once; a second enqueue is a no-op.

    arq names its keys `arq:job:<job id>`, `arq:in-progress:<job id>`…; the `{arq}` hash tag in the job id puts
    them in the queue's Redis Cluster slot. A job is written as arq's `enqueue_job` writes it (`serialize_job`, the
    job key with arq's expiry, the queue's score), but by one script (`ENQUEUE`), which also wakes a worker: one
    round trip where arq's transaction takes three and the wake-up a fourth. As with arq's own enqueue, a job whose
    run has returned but which the worker has not yet finished with (arq deletes its keys just after) is still
    running: an enqueue then is a no-op.
    """

    def __init__(self, redis: Redis) -> None:
        self.arq = ArqRedis(connection_pool=redis.connection_pool)
        self.redis = redis

    async def enqueue(
        self, tenant: str, session_id: str, job_ids: Sequence[str], run_at: datetime | None = None
    ) -> None:
        if not job_ids:
            return
        now_ms = timestamp_ms()
        score = now_ms if run_at is None else max(now_ms, to_unix_ms(run_at))
        trace = tracing.inject()

        def fill(pipe: Any) -> None:
            for job_id in job_ids:
                arq_id = f"{{arq}}chat:{job_id}"
                job = serialize_job(RUN_CHAT, (tenant, session_id, job_id), {"trace": trace}, None, now_ms)
                ENQUEUE.queue(
                    pipe,
                    [job_key_prefix + arq_id, result_key_prefix + arq_id, QUEUE, WAKE],
                    [arq_id, job, score, score - now_ms + expires_extra_ms, int(score == now_ms)],
                )

        await run_pipeline(self.redis, REGISTRY, fill)

    async def depth(self) -> int:
        """Jobs waiting in the queue (not yet started, or deferred for a retry)."""
        return int(await self.arq.zcard(QUEUE))


class ArqChatWorker(Worker):
    """arq's worker, driven by Parley's supervisor instead of `Worker.main`, and woken by the API's push to WAKE
    instead of waiting out its poll delay.

    `poll` and `listen` are two supervised parts (`shared.supervise`): a store error ends them and the supervisor
    runs them again. It also skips arq's start-up INFO call, which fakeredis does not implement.
    """

    def __init__(
        self,
        *args: Any,
        claim_s: float = 5.0,
        wake: Redis | None = None,
        after_waiting: AfterWaiting | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.in_progress_timeout_s = claim_s  # kept alive by the job's heartbeat while it runs
        self.wake_client = wake
        """A client for the blocking wake-up read (None: poll only, for fakeredis)."""
        self._wake = asyncio.Event()
        self.after_waiting = after_waiting
        self.waiting: dict[str, tuple[str, str, str]] = {}
        """arq job id → (tenant, session, job) of the runs that answered `waiting`, until arq has finished them."""

    async def finish_job(self, job_id: str, finish: bool, *args: Any, **kwargs: Any) -> None:
        """arq's finish, then `after_waiting` for a run that answered `waiting`: an enqueue of the job while it was
        still in the queue (the chat before it ended meanwhile) was a no-op, and nothing else would queue it."""
        await super().finish_job(job_id, finish, *args, **kwargs)
        parked = self.waiting.pop(job_id, None)
        if parked is not None and finish and self.after_waiting is not None:
            after_waiting = self.after_waiting
            try:  # the job is in no queue now: a store outage is waited out, not left to a later chat's enqueue
                await until_available(lambda: after_waiting(*parked), f"chat {parked[2]}'s hand-back", log)
            except Exception:
                log.exception("chat %s: could not hand it back after waiting", parked[2])

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

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's `start_jobs` with its take as one script (`START_JOB`): the same keys and lease, one round trip
        per job instead of four. The bookkeeping around it (semaphore, job counter, tasks) is arq's, unchanged."""
        for job_id_b in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return
            self.job_counter += 1
            job_id = job_id_b.decode()
            lease_ms = int(self.in_progress_timeout_s * 1000)
            try:
                score = await START_JOB(
                    self.pool, [in_progress_key_prefix + job_id, self.queue_name], [job_id, timestamp_ms(), lease_ms]
                )
            except BaseException:  # the store failed (the supervisor runs `poll` again): the slot is not kept
                self._release_sem_dec_counter_on_complete()
                raise
            if score is None:  # not due yet, or another worker took it
                self._release_sem_dec_counter_on_complete()
                continue
            task = self.loop.create_task(self.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

    async def main(self) -> None:  # arq's entry point; Parley runs `poll` and `listen` under its supervisor
        raise NotImplementedError("run ParleyWorker.poll / listen under a Supervisor")


def chat_worker(
    redis: Redis,
    blocking: Redis | None,
    run: JobRunner,
    fail: JobFailer,
    *,
    claim_s: float,
    max_jobs: int,
    job_timeout_s: float,
    poll_delay_s: float,
    after_waiting: AfterWaiting | None = None,
) -> ArqChatWorker:
    """The worker loop: `run(tenant, session, job)` each job arq hands out, heart-beating its lease; a job that
    raises is retried with backoff, then `fail(tenant, session, job, code, message)`ed, never left running.
    `blocking`: the client of the wake-up listener (None: no listener, the poll alone finds work)."""
    claim_ms = int(claim_s * 1000)

    async def run_chat(
        ctx: dict[str, Any], tenant: str, session_id: str, job_id: str, trace: dict[str, str] | None = None
    ) -> str:
        """`trace`: the enqueuing request's trace context, when tracing is on (the job's span continues it)."""
        with (
            logs.bind(tenant=tenant, session_id=session_id, job_id=job_id),
            tracing.span(
                "chat job",
                trace,
                **{
                    "parley.tenant": tenant,
                    "parley.session_id": session_id,
                    "parley.job_id": job_id,
                    "parley.attempt": ctx.get("job_try", 1),
                },
            ),
        ):
            if ctx.get("job_try", 1) == 1 and isinstance(ctx.get("enqueue_time"), datetime):
                metrics.CHAT_QUEUE_WAIT.observe(max(0.0, time.time() - ctx["enqueue_time"].timestamp()))
            start = time.perf_counter()
            status = "retried"
            try:
                result = await attempt(ctx, tenant, session_id, job_id)
                status = result.partition(":")[0]
                if result == "waiting":  # `worker`, below: its jobs run only once it is made
                    worker.waiting[ctx["job_id"]] = (tenant, session_id, job_id)
                return result
            except asyncio.CancelledError:  # the worker is stopping: the lease lapses and the job runs again
                status = "interrupted"
                raise
            finally:
                seconds = time.perf_counter() - start
                metrics.CHAT_JOBS.labels(status).inc()
                metrics.CHAT_RUN.labels(status).observe(seconds)
                log.info(
                    "chat attempt",
                    extra={
                        "fields": {
                            "status": status,
                            "attempt": ctx.get("job_try", 1),
                            "duration_ms": round(seconds * 1000, 3),
                        }
                    },
                )

    async def attempt(ctx: dict[str, Any], tenant: str, session_id: str, job_id: str) -> str:
        key = in_progress_key_prefix + ctx["job_id"]

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(claim_s / 4)
                try:
                    await ctx["redis"].pexpire(key, claim_ms)
                except TRANSIENT as e:  # a missed beat or two is fine; the lease outlives four of them
                    log.warning("chat %s: heartbeat failed (%s); retrying", job_id, e)

        beat = asyncio.create_task(heartbeat())
        try:
            return await run(tenant, session_id, job_id)
        except Exception as e:
            if ctx.get("job_try", 1) < MAX_TRIES:
                log.warning("chat %s attempt %s failed (%r); retrying", job_id, ctx.get("job_try"), e)
                raise Retry(defer=min(2 ** ctx.get("job_try", 1) * 0.25, 10)) from e
            log.exception("chat %s failed for good", job_id)
            await fail(
                tenant, session_id, job_id, "internal_error", "the chat failed inside Parley; see the worker's log"
            )
            return "failed: internal_error"
        finally:
            beat.cancel()

    worker = ArqChatWorker(
        functions=[func(run_chat, name=RUN_CHAT, keep_result=0, max_tries=MAX_TRIES + 10)],  # + crashes
        queue_name=QUEUE,
        redis_pool=ArqRedis(connection_pool=redis.connection_pool),
        handle_signals=False,
        max_jobs=max_jobs,
        job_timeout=job_timeout_s,
        keep_result=0,
        poll_delay=poll_delay_s,
        claim_s=claim_s,
        wake=blocking,
        after_waiting=after_waiting,
    )
    return worker
