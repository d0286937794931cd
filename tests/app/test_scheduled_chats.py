"""Scheduled chats on the memory adapters, with a fake clock: a chat with `run_at` or `delay_s` waits in the queue
until its time, shows when it runs, keeps the session's order (multitask policies apply), and bad times are 422s
that write nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from shared.bootstrap import Parley
from shared.domain.errors import Invalid
from shared.domain.wire import ChatRequest, MessageCreate, SessionCreate
from tests.app.conftest import Deployment


def ask(text: str, **fields: object) -> ChatRequest:
    return ChatRequest(messages=[MessageCreate(role="user", content=text)], **fields)  # type: ignore[arg-type]


class Clock:
    def __init__(self, parley: Parley) -> None:
        assert parley.memory is not None
        self.now = datetime.now(UTC).timestamp()
        parley.memory.clock = lambda: self.now  # the queue's due times
        parley.service.clock = lambda: datetime.fromtimestamp(self.now, UTC)  # the events' stamps

    def later(self, seconds: float) -> None:
        self.now += seconds


async def job(parley: Parley, sid: str, job_id: str) -> dict:
    return msgspec.json.decode(await parley.chats.job("acme", sid, job_id))


async def test_a_scheduled_chat_runs_at_its_time_and_not_before(parley: Parley) -> None:
    clock, d = Clock(parley), Deployment(parley)
    sid = (await parley.sessions.create("acme", SessionCreate()))[0].id
    requested = await parley.chats.request("acme", sid, ask("later, please", delay_s=3_600))
    run_at = datetime.fromtimestamp(clock.now, UTC) + timedelta(hours=1)
    assert requested.job.run_at == run_at
    await d.settle()
    record = await job(parley, sid, requested.job.id)
    assert record["status"] == "queued" and datetime.fromisoformat(record["run_at"]) == run_at
    clock.later(3_599)
    await d.settle()
    assert (await job(parley, sid, requested.job.id))["status"] == "queued"
    clock.later(1)
    await d.settle()
    assert (await job(parley, sid, requested.job.id))["status"] == "succeeded"
    [answered] = [e for e in await parley.log.read(sid) if type(e).__name__ == "ChatCompleted"]
    assert answered.occurred_at >= run_at


async def test_chats_after_a_scheduled_one_wait_for_it_or_interrupt_it(parley: Parley) -> None:
    clock, d = Clock(parley), Deployment(parley)
    sid = (await parley.sessions.create("acme", SessionCreate()))[0].id
    at = datetime.fromtimestamp(clock.now, UTC) + timedelta(minutes=5)
    scheduled = await parley.chats.request("acme", sid, ask("at five", run_at=at))
    queued = await parley.chats.request("acme", sid, ask("right after"))
    await d.settle()
    assert [(await job(parley, sid, j))["status"] for j in (scheduled.job.id, queued.job.id)] == ["queued", "queued"]
    clock.later(301)
    await d.settle()
    assert [(await job(parley, sid, j))["status"] for j in (scheduled.job.id, queued.job.id)] == ["succeeded"] * 2

    later = await parley.chats.request("acme", sid, ask("tomorrow", delay_s=86_400))
    now = await parley.chats.request("acme", sid, ask("no, now", multitask="interrupt"))
    await d.settle()
    assert (await job(parley, sid, later.job.id))["status"] == "cancelled"
    assert (await job(parley, sid, now.job.id))["status"] == "succeeded"


@pytest.mark.parametrize(
    "fields",
    [
        {"delay_s": 10, "run_at": datetime.now(UTC) + timedelta(minutes=1)},
        {"run_at": datetime.now(UTC) + timedelta(days=31)},
        {"run_at": datetime.now() + timedelta(minutes=1)},  # no time zone
    ],
)
async def test_a_bad_schedule_is_refused_and_writes_nothing(parley: Parley, fields: dict) -> None:
    sid = (await parley.sessions.create("acme", SessionCreate()))[0].id
    with pytest.raises(Invalid):
        await parley.chats.request("acme", sid, ask("when?", **fields))
    assert (await parley.log.load("acme", sid)).version == 1  # type: ignore[union-attr]


def test_a_delay_outside_its_bounds_is_refused() -> None:
    for delay in (-1, 30 * 86_400 + 1):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"delay_s": delay}, ChatRequest)
