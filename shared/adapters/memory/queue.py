"""The chat queue in memory (the `ChatQueue` port) and a worker loop that runs its jobs.

As with arq: a job id sits in the queue (or in a worker's hands) once, so a second enqueue is a no-op; once run it
may be enqueued again. A job whose worker stops before it finished goes back to the queue, at its old place, for
another worker (arq: its lease lapses). A run that raises is tried again, `max_tries` times in all, and then
failed with `internal_error`, never left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Sequence
from datetime import datetime

from shared.adapters.memory.store import Memory
from shared.app.ports import MAX_TRIES, AfterWaiting, JobFailer, JobRunner

__all__ = ["MemoryChatQueue", "MemoryChatWorker"]

log = logging.getLogger("parley.worker")


class MemoryChatQueue:
    def __init__(self, memory: Memory) -> None:
        self.memory = memory

    async def enqueue(
        self, tenant: str, session_id: str, job_ids: Sequence[str], run_at: datetime | None = None
    ) -> None:
        m = self.memory
        for job_id in job_ids:
            if job_id not in m.queued and job_id not in m.running:
                m.queued[job_id] = (tenant, session_id)
                if run_at is not None:
                    m.due[job_id] = run_at.timestamp()
        if job_ids:
            m.signal("queue")

    async def depth(self) -> int:
        return len(self.memory.queued)

    def queued(self) -> list[str]:
        """The jobs waiting for a worker, oldest first."""
        return list(self.memory.queued)


class MemoryChatWorker:
    """Runs the queue's jobs: `poll` as a supervised part (like `ArqChatWorker.poll`), or `run_queued` to run
    everything queued to the end, one job at a time (tests)."""

    wake_client = None
    """No separate wake-up listener: an enqueue wakes `poll` directly."""

    def __init__(
        self,
        memory: Memory,
        run: JobRunner,
        fail: JobFailer,
        *,
        max_jobs: int = 100,
        max_tries: int = MAX_TRIES,
        poll_delay_s: float = 0.5,
        name: str | None = None,
        after_waiting: AfterWaiting | None = None,
    ) -> None:
        self.memory = memory
        self.run = run
        self.fail = fail
        self.after_waiting = after_waiting
        """Called once a run that answered `waiting` has left the queue (`ArqChatWorker.finish_job`)."""
        self.max_jobs = max_jobs
        self.max_tries = max_tries
        self.poll_delay_s = poll_delay_s
        self.name = name or f"memory-worker-{secrets.token_hex(3)}"
        self._tasks: set[asyncio.Task[None]] = set()

    def _take(self) -> tuple[str, str, str] | None:
        m = self.memory
        now = m.clock()
        job_id = next((j for j in m.queued if m.due.get(j, 0) <= now), None)
        if job_id is None:  # nothing queued, or nothing due yet
            return None
        m.due.pop(job_id, None)
        tenant, session_id = m.queued.pop(job_id)
        m.running[job_id] = self.name
        return tenant, session_id, job_id

    async def _run(self, tenant: str, session_id: str, job_id: str) -> None:
        if await self._attempts(tenant, session_id, job_id) == "waiting" and self.after_waiting is not None:
            try:
                await self.after_waiting(tenant, session_id, job_id)
            except Exception:
                log.exception("chat %s: could not hand it back after waiting", job_id)

    async def _attempts(self, tenant: str, session_id: str, job_id: str) -> str:
        m = self.memory
        try:
            for attempt in range(1, self.max_tries + 1):
                try:
                    return await self.run(tenant, session_id, job_id)
                except Exception as e:
                    if attempt < self.max_tries:
                        log.warning("chat %s attempt %s failed (%r); retrying", job_id, attempt, e)
                        continue
                    log.exception("chat %s failed for good", job_id)
                    await self.fail(
                        tenant,
                        session_id,
                        job_id,
                        "internal_error",
                        "the chat failed inside Parley; see the worker's log",
                    )
            return "failed: internal_error"
        except asyncio.CancelledError:  # the worker stopped: another one runs the job
            m.queued[job_id] = (tenant, session_id)
            for other in [j for j in m.queued if j != job_id]:
                m.queued[other] = m.queued.pop(other)  # back at the head of the queue
            m.signal("queue")
            raise
        finally:
            if m.running.get(job_id) == self.name:
                del m.running[job_id]

    async def run_queued(self) -> int:
        """Run every queued job, and every job queued meanwhile, to the end; answers how many ran."""
        ran = 0
        while (job := self._take()) is not None:
            await self._run(*job)
            ran += 1
        return ran

    async def poll(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            while len(self._tasks) < self.max_jobs and (job := self._take()) is not None:
                task = asyncio.create_task(self._run(*job))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            waiting = asyncio.ensure_future(self.memory.wait("queue", self.poll_delay_s))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait([waiting, stopping], return_when=asyncio.FIRST_COMPLETED)
            for f in (waiting, stopping):
                f.cancel()

    async def listen(self, stop: asyncio.Event) -> None:
        await stop.wait()

    def handle_sig(self, signum: int) -> None:
        """Stop: the jobs in flight are cancelled and go back to the queue."""
        for task in list(self._tasks):
            task.cancel()

    async def close(self) -> None:
        self.handle_sig(15)
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
