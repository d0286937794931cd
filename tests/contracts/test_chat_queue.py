"""The `ChatQueue` contract, through a worker loop over the queue (arq's on Redis, the memory one): a queued job is
run, once however often it was queued meanwhile, again if queued after it ran; a run that raises is retried, then
failed (never left running); the job of a worker that stopped is run by another."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

from shared.bootstrap import ChatWorker
from shared.domain.ids import uuid7
from tests.contracts.conftest import Backend
from tests.support import wait_for

TIMEOUT_S = 30.0
"""Only an upper bound for what must happen; a passing test never waits it out."""


class Calls:
    def __init__(self) -> None:
        self.runs: list[tuple[str, str, str]] = []
        self.fails: list[tuple[str, str, str, str]] = []

    def ran(self, job: str) -> int:
        return sum(1 for _, _, j in self.runs if j == job)

    async def run(self, tenant: str, sid: str, job: str) -> str:
        self.runs.append((tenant, sid, job))
        return "succeeded"

    async def fail(self, tenant: str, sid: str, job: str, code: str, message: str) -> None:
        self.fails.append((tenant, sid, job, code))


@contextlib.asynccontextmanager
async def working(
    backend: Backend,
    run: Callable[[str, str, str], Awaitable[str]],
    fail: Callable[..., Awaitable[None]],
    max_tries: int = 3,
    after_waiting: Callable[[str, str, str], Awaitable[None]] | None = None,
) -> AsyncIterator[ChatWorker]:
    worker = backend.worker(run, fail, max_tries, after_waiting)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.poll(stop))
    try:
        yield worker
    finally:
        stop.set()
        worker.handle_sig(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), TIMEOUT_S)


async def test_a_job_runs_once_however_often_it_was_queued(backend: Backend) -> None:
    calls = Calls()
    sid, job, other, sentinel = uuid7(), uuid7(), uuid7(), uuid7()
    await backend.queue.enqueue("acme", sid, [job])
    await backend.queue.enqueue("acme", sid, [job, other])
    await backend.queue.enqueue("acme", sid, [])
    async with working(backend, calls.run, calls.fail):
        await wait_for(lambda: _true(calls.ran(job) and calls.ran(other)), TIMEOUT_S, "both jobs to run")
        await backend.queue.enqueue("acme", sid, [sentinel])  # runs after anything queued before it
        await wait_for(lambda: _true(calls.ran(sentinel)), TIMEOUT_S, "the sentinel to run")
    assert (calls.ran(job), calls.ran(other)) == (1, 1)
    assert ("acme", sid, job) in calls.runs and calls.fails == []


async def test_a_job_queued_while_it_runs_is_not_run_again(backend: Backend) -> None:
    calls, started, release = Calls(), asyncio.Event(), asyncio.Event()

    async def slow(tenant: str, sid: str, job: str) -> str:
        started.set()
        await release.wait()
        return await calls.run(tenant, sid, job)

    sid, job, sentinel = uuid7(), uuid7(), uuid7()
    await backend.queue.enqueue("acme", sid, [job])
    async with working(backend, slow, calls.fail):
        await asyncio.wait_for(started.wait(), TIMEOUT_S)
        await backend.queue.enqueue("acme", sid, [job])
        release.set()
        await wait_for(lambda: _true(calls.ran(job)), TIMEOUT_S, "the job to run")
        await backend.queue.enqueue("acme", sid, [sentinel])
        await wait_for(lambda: _true(calls.ran(sentinel)), TIMEOUT_S, "the sentinel to run")
    assert calls.ran(job) == 1


async def test_a_run_that_answers_waiting_is_handed_back_once_it_has_left_the_queue(backend: Backend) -> None:
    """A job enqueued while its run (which found it not first yet) is finishing is a no-op: the job is still in the
    queue. `after_waiting` comes after the job left it, so it can queue the job again."""
    calls = Calls()
    sid, job = uuid7(), uuid7()
    handed_back: list[tuple[str, str, str]] = []

    async def not_first_yet(tenant: str, s: str, j: str) -> str:
        await calls.run(tenant, s, j)
        if calls.ran(j) > 1:
            return "succeeded"
        await backend.queue.enqueue(tenant, s, [j])  # the chat before it ended just now: a no-op, it still runs
        return "waiting"

    async def after_waiting(tenant: str, s: str, j: str) -> None:
        handed_back.append((tenant, s, j))
        await backend.queue.enqueue(tenant, s, [j])

    await backend.queue.enqueue("acme", sid, [job])
    async with working(backend, not_first_yet, calls.fail, after_waiting=after_waiting):
        await wait_for(lambda: _true(calls.ran(job) == 2), TIMEOUT_S, "the job handed back to run again")
    assert handed_back == [("acme", sid, job)] and calls.fails == []


async def test_a_job_that_ran_can_be_queued_again(backend: Backend) -> None:
    calls = Calls()
    sid, job = uuid7(), uuid7()
    async with working(backend, calls.run, calls.fail):
        await backend.queue.enqueue("acme", sid, [job])
        await wait_for(lambda: _true(calls.ran(job) == 1), TIMEOUT_S, "the job to run")
        # until the worker has finished with it (arq: its queue entry and job key deleted together), an enqueue is
        # one of a running job, which is not run again
        await wait_for(lambda: _idle(backend), TIMEOUT_S, "the worker to finish the job")
        await backend.queue.enqueue("acme", sid, [job])
        await wait_for(lambda: _true(calls.ran(job) == 2), TIMEOUT_S, "the job to run again")


async def test_a_run_that_raises_is_retried_then_failed(backend: Backend) -> None:
    calls = Calls()

    async def broken(tenant: str, sid: str, job: str) -> str:
        calls.runs.append((tenant, sid, job))
        raise RuntimeError("a bug")

    sid, job = uuid7(), uuid7()
    await backend.queue.enqueue("acme", sid, [job])
    async with working(backend, broken, calls.fail, max_tries=2):
        await wait_for(lambda: _true(calls.fails), TIMEOUT_S, "the job to be failed")
    assert calls.ran(job) == 2
    assert calls.fails == [("acme", sid, job, "internal_error")]


async def test_the_job_of_a_worker_that_stopped_runs_on_another(backend: Backend) -> None:
    calls, started = Calls(), asyncio.Event()

    async def hangs(tenant: str, sid: str, job: str) -> str:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    sid, job = uuid7(), uuid7()
    await backend.queue.enqueue("acme", sid, [job])
    async with working(backend, hangs, calls.fail):
        await asyncio.wait_for(started.wait(), TIMEOUT_S)
    async with working(backend, calls.run, calls.fail):
        await wait_for(lambda: _true(calls.ran(job)), TIMEOUT_S, "another worker to run the job")
    assert calls.fails == []


async def _true(value: object) -> bool:
    return bool(value)


async def _idle(backend: Backend) -> bool:
    return await backend.queue.depth() == 0


async def test_depth_counts_the_jobs_waiting(backend: Backend) -> None:
    assert await backend.queue.depth() == 0
    jobs = [uuid7() for _ in range(3)]
    await backend.queue.enqueue("acme", uuid7(), jobs[:2])
    await backend.queue.enqueue("acme", uuid7(), jobs[1:])  # jobs[1] is queued once
    assert await backend.queue.depth() == 3
    calls = Calls()
    async with working(backend, calls.run, calls.fail):
        await wait_for(lambda: _true(all(calls.ran(j) for j in jobs)), TIMEOUT_S, "the jobs to run")
    assert await backend.queue.depth() == 0


async def test_a_scheduled_job_runs_at_its_time_and_not_before(backend: Backend) -> None:
    """A job queued with `run_at` is handed out once that time has come (arq defers it; the memory queue keeps a
    due time): one queued after it for now runs first."""
    calls = Calls()
    sid, later, now = uuid7(), uuid7(), uuid7()
    start = datetime.now(UTC)
    await backend.queue.enqueue("acme", sid, [later], start + timedelta(seconds=1.5))
    await backend.queue.enqueue("acme", sid, [now])
    async with working(backend, calls.run, calls.fail):
        await wait_for(lambda: asyncio.sleep(0, calls.ran(later)), TIMEOUT_S, "the scheduled job to run")
        ran_at = datetime.now(UTC)
    assert [j for _, _, j in calls.runs] == [now, later]
    assert ran_at >= start + timedelta(seconds=1.5)
