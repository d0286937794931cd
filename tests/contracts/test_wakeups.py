"""The `Wakeups` contract: a waiter hears an append to its session and a chunk written for its job (or, asking for
ends only, the job's last entry), in any process of the deployment, and nothing else."""

from __future__ import annotations

import asyncio

from shared.domain.ids import uuid7
from tests.contracts.conftest import Backend, add, create

WAIT_S = 10.0
"""Only an upper bound for a wake-up that must come; a passing test never waits it out."""


async def test_an_append_wakes_the_sessions_waiters_in_every_process(backend: Backend) -> None:
    state = await create(backend.log)
    here, there = backend.wakeups(), backend.wakeups()
    async with (
        here.watching(state.id, state.id, "appends") as mine,
        there.watching(state.id, state.id, "appends") as theirs,
    ):
        mine.clear()
        theirs.clear()
        await add(backend.log, state, "x")
        assert await mine.wait(WAIT_S)
        assert await theirs.wait(WAIT_S)


async def test_a_chunk_wakes_the_jobs_waiters(backend: Backend) -> None:
    state, job = await create(backend.log), uuid7()
    wakeups = backend.wakeups()
    async with wakeups.watching(job, state.id, "chunks") as watch:
        watch.clear()
        await backend.jobs.emit(state.id, job, "chunk", b"{}")
        assert await watch.wait(WAIT_S)


async def test_a_waiter_for_a_jobs_end_hears_its_last_entry_and_not_the_chunks_before(backend: Backend) -> None:
    """A synchronous chat waits for the answer alone: a model streaming a long answer must not wake it (and make it
    read) once per batch of chunks."""
    state, job = await create(backend.log), uuid7()
    wakeups = backend.wakeups()
    async with wakeups.watching(job, state.id, "end") as end, wakeups.watching(job, state.id, "chunks") as every:
        for kind in ("done", "error"):
            end.clear()
            every.clear()
            await backend.jobs.emit(state.id, job, "chunk", b"{}")
            assert await every.wait(WAIT_S)
            every.clear()
            writer = backend.jobs.writer(state.id, job, 0)
            writer.put(b"{}")
            await writer.drain()
            assert await every.wait(WAIT_S)  # both chunk writes have been seen by the reader by now
            assert not await end.wait(0.05)
            every.clear()
            await backend.jobs.emit(state.id, job, kind, b"{}")
            assert await end.wait(WAIT_S)
            assert await every.wait(WAIT_S)  # the end is a chunk-stream entry too


async def test_a_wake_up_that_arrives_before_the_wait_is_kept(backend: Backend) -> None:
    state = await create(backend.log)
    wakeups = backend.wakeups()
    async with wakeups.watching(state.id, state.id, "appends") as watch:
        watch.clear()
        await add(backend.log, state, "x")
        await asyncio.sleep(0.1)  # the wake-up lands while nobody waits
        assert await watch.wait(WAIT_S)


async def test_only_the_named_session_or_job_wakes(backend: Backend) -> None:
    mine, other = await create(backend.log), await create(backend.log)
    wakeups = backend.wakeups()
    async with (
        wakeups.watching(mine.id, mine.id, "appends") as watch,
        wakeups.watching(other.id, other.id, "appends") as signal,
    ):
        watch.clear()
        signal.clear()
        await add(backend.log, other, "not yours")
        await backend.jobs.emit(mine.id, uuid7(), "chunk", b"{}")  # a job of my session is not my session
        assert await signal.wait(WAIT_S)  # the append has been seen by the reader by now
        assert not await watch.wait(0.05)
