"""What the memory adapters let expire, on a clock the test moves (Redis's TTLs, which the contract suites cannot wait
out): idempotency records, ended chat jobs and their chunk streams, usage counters; running jobs stay."""

from __future__ import annotations

from datetime import UTC, datetime

from shared.adapters.memory import Memory, MemoryChatJobs, MemoryEventLog, MemoryLimits, MemoryReadModels
from shared.app.ports import IdempotencyClaim
from shared.domain.commands import AddMessage, CompleteChat, CreateSession, RequestChat, Stamp, decide
from shared.domain.ids import uuid7
from shared.domain.projection import project
from shared.domain.state import SessionState, fold
from shared.domain.wire import (
    AssistantMessage,
    ChatChoice,
    ChatRequest,
    ChatResponse,
    MessageCreate,
    SessionCreate,
    TenantLimits,
    Usage,
)

DAY = 86_400.0


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).timestamp()

    def __call__(self) -> float:
        return self.now


async def test_idempotency_records_expire_after_their_ttl() -> None:
    clock = Clock()
    memory = Memory(4, clock)
    log = MemoryEventLog(memory, idempotency_ttl_s=60)
    state = SessionState(id=uuid7())
    stamp = Stamp(now=datetime.now(UTC), new_id=uuid7)
    events = decide(state, CreateSession(body=SessionCreate()), stamp)
    await log.append("acme", state.id, 0, events, IdempotencyClaim(key="k", request_hash="h", response=b"r"))
    clock.now += 59
    assert await log.recall("acme", state.id, "k", "h") == b"r"
    clock.now += 2
    assert await log.recall("acme", state.id, "k", "h") is None
    more = decide(fold(state, events), AddMessage(body=MessageCreate(role="user", content="x")), stamp)
    claim = IdempotencyClaim(key="k", request_hash="other", response=b"s")
    assert (
        await log.append("acme", state.id, 1, more, claim)
    ).__class__.__name__ == "Appended"  # the key is free again


async def test_ended_jobs_and_their_chunks_expire_running_ones_stay() -> None:
    clock = Clock()
    memory = Memory(4, clock)
    log, views, jobs = (
        MemoryEventLog(memory),
        MemoryReadModels(memory, chat_retention_s=100),
        MemoryChatJobs(memory, retention_s=100),
    )
    limits = MemoryLimits(memory, TenantLimits())
    stamp = Stamp(now=datetime.fromtimestamp(clock.now, UTC), new_id=uuid7)
    state = SessionState(id=uuid7())
    done, running = uuid7(), uuid7()
    for command in (
        CreateSession(body=SessionCreate()),
        RequestChat(
            job_id=done, request=ChatRequest(messages=[MessageCreate(role="user", content="a")]), default_model="m"
        ),
        RequestChat(job_id=running, request=ChatRequest(), default_model="m"),
    ):
        events = decide(state, command, stamp)
        await log.append("acme", state.id, state.version, events)
        state = fold(state, events)
    answer = ChatResponse(
        id=done,
        session_id=state.id,
        created_at=datetime.now(UTC),
        model="m",
        choices=[ChatChoice(finish_reason="stop", message=AssistantMessage(content="b"))],
        usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2),
    )
    events = decide(state, CompleteChat(job_id=done, response=answer, save=True), stamp)
    await log.append("acme", state.id, state.version, events)
    [p] = await views.pending([state.id])
    assert p is not None and await views.apply([("acme", project(p.state, p.events))]) == [True]
    assert await jobs.mark_running(state.id, running) == 1
    await jobs.emit(state.id, done, "done", b"{}")
    await jobs.emit(state.id, running, "chunk", b"{}")
    clock.now += 99
    assert await jobs.status(state.id, done) == "succeeded" and await jobs.streamed(state.id, done)
    assert (await limits.usage("acme", 1))[0].chats == 2
    clock.now += 2
    assert await jobs.status(state.id, done) is None
    assert await jobs.streamed(state.id, done) == []
    assert await jobs.status(state.id, running) == "running"  # a job that has not ended keeps its record
    assert await jobs.streamed(state.id, running) == []  # chunks expire after their last write, ended or not
    day = datetime.fromtimestamp(stamp.now.timestamp(), UTC).date().isoformat()

    async def chats_that_day() -> int:
        return next(u.chats for u in await limits.usage("acme", 45) if u.day == day)

    clock.now += 39 * DAY
    assert await chats_that_day() == 2
    clock.now += 2 * DAY
    assert await chats_that_day() == 0  # usage counters are kept 40 days
