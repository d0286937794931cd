"""The `ChatJobs` contract: job records follow the chat events (projected) and the worker's `mark_running`, which
never restarts an ended job; a job is found only through its own session; chunk streams keep entries in order
under increasing ids, know their end, and refuse writes once the session is purged."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest

from shared.app.ports import Superseded
from shared.domain.commands import CancelChat, CompleteChat, FailChat, RequestChat
from shared.domain.events import SessionPurged, SessionPurgedData
from shared.domain.ids import uuid7
from shared.domain.state import SessionState
from shared.domain.wire import AssistantMessage, ChatChoice, ChatRequest, ChatResponse, MessageCreate, Usage
from tests.contracts.conftest import Backend, create, project_all, run


def entry_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


async def request(backend: Backend, state: SessionState, text: str = "hi") -> tuple[SessionState, str]:
    job_id = uuid7()
    command = RequestChat(
        job_id=job_id, request=ChatRequest(messages=[MessageCreate(role="user", content=text)]), default_model="m"
    )
    return await run(backend.log, state, command), job_id


def response(state: SessionState, job_id: str) -> ChatResponse:
    return ChatResponse(
        id=job_id,
        session_id=state.id,
        created_at=datetime.now(UTC),
        model="m",
        choices=[ChatChoice(finish_reason="stop", message=AssistantMessage(content="hello"))],
        usage=Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4),
    )


async def record(backend: Backend, sid: str, job_id: str, tenant: str = "acme") -> dict | None:
    view = await backend.jobs.job(tenant, sid, job_id)
    return json.loads(view.body) if view.body is not None else None


async def test_a_job_record_follows_its_events_and_the_worker(backend: Backend) -> None:
    state, job = await request(backend, await create(backend.log))
    assert (await backend.jobs.job("acme", state.id, job)).body is None  # not projected yet
    await project_all(backend.views, state.id)
    queued = await record(backend, state.id, job)
    assert queued is not None
    assert (queued["id"], queued["session_id"], queued["status"], queued["model"], queued["attempts"]) == (
        job,
        state.id,
        "queued",
        "m",
        0,
    )
    assert await backend.jobs.status(state.id, job) == "queued"
    assert await backend.jobs.mark_running(state.id, job) == 1
    assert await backend.jobs.mark_running(state.id, job) == 2  # a second attempt
    running = await record(backend, state.id, job)
    assert running is not None and running["status"] == "running" and running["attempts"] == 2 and running["started_at"]
    state = await run(backend.log, state, CompleteChat(job_id=job, response=response(state, job), save=True))
    await project_all(backend.views, state.id)
    done = await record(backend, state.id, job)
    assert (
        done is not None
        and done["status"] == "succeeded"
        and done["response"]["choices"][0]["message"]["content"] == "hello"
    )
    assert done["attempts"] == 2 and done["finished_at"]
    assert await backend.jobs.mark_running(state.id, job) == 0  # ended: never restarted
    assert await backend.jobs.status(state.id, job) == "succeeded"


async def test_a_worker_that_starts_before_the_projector_keeps_running(backend: Backend) -> None:
    """The projector's 'queued' never overwrites what the worker wrote first."""
    state, job = await request(backend, await create(backend.log))
    assert await backend.jobs.mark_running(state.id, job) == 1
    await project_all(backend.views, state.id)
    assert await backend.jobs.status(state.id, job) == "running"
    found = await record(backend, state.id, job)
    assert found is not None and found["status"] == "running" and found["model"] == "m"


async def test_failed_and_cancelled_jobs_end(backend: Backend) -> None:
    state, failing = await request(backend, await create(backend.log))
    state = await run(backend.log, state, FailChat(job_id=failing, code="model_error", message="boom"))
    state, cancelled = await request(backend, state)
    state = await run(backend.log, state, CancelChat(job_id=cancelled))
    await project_all(backend.views, state.id)
    f, c = await record(backend, state.id, failing), await record(backend, state.id, cancelled)
    assert f is not None and (f["status"], f["error"]["code"]) == ("failed", "model_error")
    assert c is not None and (c["status"], c["error"]["code"]) == ("cancelled", "cancelled")
    assert await backend.jobs.mark_running(state.id, failing) == 0
    assert await backend.jobs.mark_running(state.id, cancelled) == 0


async def test_jobs_are_listed_newest_first_and_only_through_their_session(backend: Backend) -> None:
    state = await create(backend.log)
    jobs = []
    for i in range(3):
        state, job = await request(backend, state, f"q{i}")
        state = await run(backend.log, state, CompleteChat(job_id=job, response=response(state, job), save=False))
        jobs.append(job)
    other = await create(backend.log)
    await project_all(backend.views, state.id, other.id)
    page = await backend.jobs.jobs("acme", state.id, 10, 0)
    assert (page.head, page.version) == (state.version, state.version)
    assert [json.loads(i)["id"] for i in page.items or []] == jobs[::-1]
    assert [json.loads(i)["id"] for i in (await backend.jobs.jobs("acme", state.id, 1, 1)).items or []] == [jobs[1]]
    assert (await backend.jobs.job("acme", other.id, jobs[0])).body is None  # another session's job
    assert (await backend.jobs.job("globex", state.id, jobs[0])).head == 0  # another tenant's session
    assert (await backend.jobs.jobs("globex", state.id, 10, 0)).head == 0
    assert (await backend.jobs.jobs("acme", other.id, 10, 0)).items == []


async def test_a_deleted_sessions_jobs_are_gone_from_reads(backend: Backend) -> None:
    from shared.domain.commands import DeleteSession

    state, job = await request(backend, await create(backend.log))
    state = await run(backend.log, state, DeleteSession())
    await project_all(backend.views, state.id)
    view = await backend.jobs.job("acme", state.id, job)
    assert view.head == state.version and view.body is None
    listed = await backend.jobs.jobs("acme", state.id, 10, 0)
    assert listed.head == state.version and listed.body is None
    assert await backend.jobs.status(state.id, job) == "cancelled"  # the delete cancelled its active chat


async def test_chunk_streams_keep_order_and_know_their_end(backend: Backend) -> None:
    state, job = await request(backend, await create(backend.log))
    jobs = backend.jobs
    assert await jobs.last_entry(state.id, job) is None
    assert await jobs.streamed(state.id, job) == []
    assert await jobs.chunks(state.id, job, "0-0") == []
    writer = jobs.writer(state.id, job, await jobs.mark_running(state.id, job))
    for i in range(5):
        writer.put(b'{"n":%d}' % i)
    await writer.drain()
    done = await jobs.emit(state.id, job, "done", b'{"end":true}')
    assert done is not None
    entries = await jobs.streamed(state.id, job)
    assert [(k, d) for _, k, d in entries] == [("chunk", b'{"n":%d}' % i) for i in range(5)] + [
        ("done", b'{"end":true}')
    ]
    ids = [e[0] for e in entries]
    assert sorted(ids, key=entry_key) == ids and len(set(ids)) == 6
    assert done.decode() == ids[-1]
    assert await jobs.chunks(state.id, job, "0-0") == entries
    assert await jobs.chunks(state.id, job, ids[2]) == entries[3:]
    assert await jobs.chunks(state.id, job, ids[-1]) == []
    assert await jobs.last_entry(state.id, job) == (ids[-1], "done", b'{"end":true}')
    assert await jobs.is_terminal(state.id, job, ids[-1])
    assert not await jobs.is_terminal(state.id, job, ids[0])
    assert not await jobs.is_terminal(state.id, job, "1-0")
    assert not await jobs.is_terminal(state.id, job, "not-an-id")
    assert not await jobs.is_terminal(state.id, uuid7(), ids[-1])


async def test_an_attempt_superseded_by_a_later_one_writes_nothing_more(backend: Backend) -> None:
    """A worker whose lease lapsed while it still streamed (a later attempt started) has its chunks refused and is
    told so by the next `put` once the refusal is back (so it stops reading its model) and by `drain`: the stream
    never interleaves two attempts; the later attempt writes on."""
    state, job = await request(backend, await create(backend.log))
    jobs = backend.jobs
    first = jobs.writer(state.id, job, await jobs.mark_running(state.id, job))
    first.put(b'{"n":0}')
    await first.drain()
    second = jobs.writer(state.id, job, await jobs.mark_running(state.id, job))
    with pytest.raises(Superseded):
        for i in range(500):  # a bound for the test only: the refusal comes back with the first stale write
            first.put(b'{"stale":%d}' % i)
            await asyncio.sleep(0.005)
    with pytest.raises(Superseded):
        await first.drain()
    second.put(b'{"n":1}')
    await second.drain()
    assert [d for _, _, d in await jobs.streamed(state.id, job)] == [b'{"n":0}', b'{"n":1}']
    assert await jobs.emit(state.id, job, "done", b"{}") is not None  # an end is no attempt's: never refused


async def test_an_attempt_writes_nothing_after_its_stream_ended(backend: Backend) -> None:
    """A delete or a cancel writes the stream's end while the worker still streams: the worker's chunks after it
    are refused, so the end stays the stream's last entry (what a synchronous chat waits for)."""
    state, job = await request(backend, await create(backend.log))
    jobs = backend.jobs
    writer = jobs.writer(state.id, job, await jobs.mark_running(state.id, job))
    writer.put(b'{"n":0}')
    await writer.drain()
    assert await jobs.emit(state.id, job, "error", b'{"code":"session_deleted","message":"x"}') is not None
    with pytest.raises(Superseded):
        for i in range(500):  # a bound for the test only: the refusal comes back with the first write after the end
            writer.put(b'{"late":%d}' % i)
            await asyncio.sleep(0.005)
    assert [k for _, k, _ in await jobs.streamed(state.id, job)] == ["chunk", "error"]


async def test_an_error_entry_ends_a_stream_too(backend: Backend) -> None:
    state, job = await request(backend, await create(backend.log))
    await backend.jobs.emit(state.id, job, "chunk", b"{}")
    last = await backend.jobs.emit(state.id, job, "error", b'{"code":"cancelled","message":"x"}')
    assert last is not None and await backend.jobs.is_terminal(state.id, job, last.decode())
    assert await backend.jobs.last_entry(state.id, job) == (
        last.decode(),
        "error",
        b'{"code":"cancelled","message":"x"}',
    )


async def test_a_purged_sessions_jobs_and_chunks_are_erased_and_stay_so(backend: Backend) -> None:
    state, job = await request(backend, await create(backend.log))
    await project_all(backend.views, state.id)
    assert await backend.jobs.emit(state.id, job, "chunk", b"secret") is not None
    assert await backend.jobs.mark_running(state.id, job) == 1
    tombstone = SessionPurged(
        id=uuid7(),
        occurred_at=datetime.now(UTC),
        data=SessionPurgedData(session_id=state.id, user_id=None, event_count=state.version),
    )
    assert await backend.admin.purge("acme", state.id, state.version, tombstone)
    assert await backend.jobs.streamed(state.id, job) == []
    assert await backend.jobs.status(state.id, job) is None
    assert await backend.jobs.emit(state.id, job, "chunk", b"late") is None  # a late worker writes nothing
    writer = backend.jobs.writer(state.id, job, 1)
    writer.put(b"late too")
    await writer.drain()
    assert await backend.jobs.streamed(state.id, job) == []
    assert await backend.jobs.mark_running(state.id, job) == 0
    assert (await backend.jobs.job("acme", state.id, job)).head == 0
