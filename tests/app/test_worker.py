"""The worker process's entry point (`run_worker`: the projector and the chat worker as supervised parts) on a
Parley in memory: a chat is answered and projected with nobody driving it by hand, and the worker stops cleanly."""

from __future__ import annotations

import asyncio

import msgspec

from services.worker.main import run_worker
from shared import bootstrap
from shared.domain.wire import ChatRequest, MessageCreate, SessionCreate
from tests.app.conftest import settings


async def test_the_worker_answers_and_projects_chats_on_its_own() -> None:
    parley = await bootstrap.in_memory(settings(read_assist_s=60.0))  # reads never help: only the projector projects
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(parley, stop))
    try:
        session, _ = await parley.sessions.create("acme", SessionCreate())
        asks = [ChatRequest(messages=[MessageCreate(role="user", content=f"q{i}")]) for i in range(3)]
        jobs = [(await parley.chats.request("acme", session.id, ask)).job.id for ask in asks]
        answers = [await parley.chats.wait(session.id, job, 20) for job in jobs]  # queued one after another
        assert [msgspec.json.decode(a)["choices"][0]["message"]["content"] for a in answers] == [
            "You said: q0",
            "You said: q1",
            "You said: q2",
        ]
        messages = [
            msgspec.json.decode(m)["content"] for m in await parley.sessions.messages("acme", session.id, 10, 0)
        ]
        assert messages == ["q0", "q1", "q2", "You said: q0", "You said: q1", "You said: q2"]
        assert parley.supervisor.ready
    finally:
        stop.set()
        await asyncio.wait_for(worker, 20)
        await parley.close()
    assert parley.memory is not None and parley.memory.running == {} and parley.memory.projectors == {}
