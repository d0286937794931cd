"""Scheduled chats on the memory adapters, with a fake clock: a chat with `run_at` or `delay_s` waits in the queue
until its time, shows when it runs, takes its place among the session's chats by when it is due (multitask policies
apply), and bad times are 422s that write nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from shared.bootstrap import Parley
from shared.domain.commands import parse_time
from shared.domain.errors import Invalid
from shared.domain.wire import ChatRequest, MessageCreate, SessionCreate
from tests.app.conftest import Deployment
from tests.app.test_compaction import Recording


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


async def test_chats_run_in_the_order_they_are_due_and_interrupt_cancels_a_waiting_one(parley: Parley) -> None:
    model = Recording()
    clock, d = Clock(parley), Deployment(parley, provider=model)
    sid = (await parley.sessions.create("acme", SessionCreate()))[0].id
    at = datetime.fromtimestamp(clock.now, UTC) + timedelta(minutes=5)
    scheduled = await parley.chats.request("acme", sid, ask("at five", run_at=at.isoformat()))
    sooner = await parley.chats.request("acme", sid, ask("in a minute", delay_s=60))
    now = await parley.chats.request("acme", sid, ask("right now"))
    await d.settle()  # the chat asked for now does not wait five minutes for the reminder before it
    assert [(await job(parley, sid, j.job.id))["status"] for j in (scheduled, sooner, now)] == [
        "queued",
        "queued",
        "succeeded",
    ]
    [prompt] = [r.messages for r in model.requests]  # it sees the reminders asked for before it, not their answers
    assert [(m["role"], m["content"]) for m in prompt] == [
        ("user", "at five"),
        ("user", "in a minute"),
        ("user", "right now"),
    ]
    clock.later(61)
    await d.settle()
    assert (await job(parley, sid, sooner.job.id))["status"] == "succeeded"
    assert (await job(parley, sid, scheduled.job.id))["status"] == "queued"
    clock.later(240)
    await d.settle()
    assert (await job(parley, sid, scheduled.job.id))["status"] == "succeeded"
    answered = [e.data.job_id for e in await parley.log.read(sid) if type(e).__name__ == "ChatCompleted"]
    assert answered == [now.job.id, sooner.job.id, scheduled.job.id]

    later = await parley.chats.request("acme", sid, ask("tomorrow", delay_s=86_400))
    due = await parley.chats.request("acme", sid, ask("no, now", multitask="interrupt"))
    await d.settle()
    assert (await job(parley, sid, later.job.id))["status"] == "cancelled"
    assert (await job(parley, sid, due.job.id))["status"] == "succeeded"


async def test_a_time_without_a_zone_is_refused_and_writes_nothing(parley: Parley) -> None:
    sid = (await parley.sessions.create("acme", SessionCreate()))[0].id
    with pytest.raises(Invalid):
        await parley.chats.request(
            "acme", sid, ask("when?", run_at=(datetime.now() + timedelta(minutes=1)).isoformat())
        )
    assert (await parley.log.load("acme", sid)).version == 1  # type: ignore[union-attr]


async def test_a_time_past_the_last_one_in_utc_is_queued_for_then_and_its_session_still_reads(parley: Parley) -> None:
    """9999-12-31T23:59:59-23:59 is in the year 10000 in UTC: the state holding it must still encode (the read
    models of a session that could not be stored would stay behind for good)."""
    d = Deployment(parley)
    sid = (await parley.sessions.create("acme", SessionCreate()))[0].id
    later = await parley.chats.request("acme", sid, ask("much later", run_at="9999-12-31T23:59:59-23:59"))
    await d.project()
    assert (await parley.sessions.get("acme", sid))[1] == 3
    record = await job(parley, sid, later.job.id)
    assert record["status"] == "queued" and record["run_at"].startswith("9999-12-31T23:59:59")


def test_a_delay_outside_its_bounds_is_refused() -> None:
    for delay in (-1, 30 * 86_400 + 1):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"delay_s": delay}, ChatRequest)


@pytest.mark.parametrize(
    ("text", "when"),
    [
        ("2027-01-31T09:00:00Z", datetime(2027, 1, 31, 9, tzinfo=UTC)),
        ("2027-01-31t09:00:00.1234567+01:00", datetime(2027, 1, 31, 8, 0, 0, 123456, tzinfo=UTC)),
        ("1990-12-31T23:59:60Z", datetime(1990, 12, 31, 23, 59, 59, tzinfo=UTC)),  # a leap second
        ("0000-01-01T00:00:00Z", datetime.min.replace(tzinfo=UTC)),
        ("0000-02-29T00:00:00Z", datetime.min.replace(tzinfo=UTC)),  # the year 0 was a leap year
        ("9999-12-31T23:59:59-23:59", datetime.max.replace(tzinfo=UTC)),  # past the last time Python knows, in UTC
        ("0001-01-01T00:30:00+01:00", datetime.min.replace(tzinfo=UTC)),  # before the first, in UTC
    ],
)
def test_every_rfc3339_time_is_taken(text: str, when: datetime) -> None:
    assert parse_time(text) == when


@pytest.mark.parametrize(
    "text",
    [
        "2027-01-31T09:00:00",
        "2027-02-30T09:00:00Z",
        "tomorrow",
        "2027-01-31",
        "2027-01-31T09:00:61Z",
        "2027-01-31T09:00:99Z",
        "0000-99-99T99:99:99Z",
        "0000-01-01T24:00:00Z",
    ],
)
def test_anything_else_is_invalid(text: str) -> None:
    with pytest.raises(Invalid):
        parse_time(text)


async def test_a_waiting_run_hands_its_job_back_to_the_queue_only_once_it_is_first(parley: Parley) -> None:
    """`ChatRunner.requeue`, which a worker calls after a run answered `waiting` left the queue: while the chat
    that overtook it is active the job stays out (the projector queues it when that one ends); once it ended, the
    job is queued again, for its time."""
    clock, d = Clock(parley), Deployment(parley)
    runner = parley.chat_runner()
    sid = (await parley.sessions.create("acme", SessionCreate()))[0].id
    later = await parley.chats.request("acme", sid, ask("in a minute", delay_s=60))
    now = await parley.chats.request("acme", sid, ask("now"))
    assert parley.memory is not None
    clock.later(61)
    assert await runner.run("acme", sid, later.job.id) == "waiting"
    parley.memory.queued.pop(later.job.id, None)  # it has left the queue, as a finished run's job does
    await runner.requeue("acme", sid, later.job.id)
    assert later.job.id not in parley.memory.queued
    assert await runner.run("acme", sid, now.job.id) == "succeeded"
    await runner.requeue("acme", sid, later.job.id)  # no projector has seen the end yet: the requeue queues it
    assert later.job.id in parley.memory.queued
    await d.settle()
    assert (await job(parley, sid, later.job.id))["status"] == "succeeded"


async def test_an_overtaken_chat_asks_its_own_request_however_far_back_the_conversation_has_moved(
    parley: Parley,
) -> None:
    """Chats asked for after a scheduled one can run first and leave a budget's worth of messages after its request;
    the truncating read from the newest message back never reaches it, yet the prompt must still end with it."""
    model = Recording()
    clock, d = Clock(parley), Deployment(parley, provider=model)
    body = SessionCreate(token_budget=2_000, context_overflow="truncate")
    sid = (await parley.sessions.create("acme", body))[0].id
    later = await parley.chats.request("acme", sid, ask("remind me about the order", delay_s=60))
    for i in range(250):  # more than the read's first page and the page after it
        await parley.sessions.add_message("acme", sid, MessageCreate(role="user", content=f"note {i} " + "word " * 20))
    clock.later(61)
    await d.settle()
    assert (await job(parley, sid, later.job.id))["status"] == "succeeded"
    [prompt] = [r.messages for r in model.requests]
    assert prompt[-1] == {"role": "user", "content": "remind me about the order"}
    assert "note 249" in prompt[-2]["content"] and len(prompt) < 100  # the newest notes, truncated to the budget


async def test_a_chat_asked_for_before_the_first_moment_in_utc_runs_at_once(parley: Parley) -> None:
    sid = (await parley.sessions.create("acme", SessionCreate()))[0].id
    done = await parley.chats.request("acme", sid, ask("long ago", run_at="0001-01-01T00:30:00+01:00"))
    assert done.job.run_at is None  # in the past: at once (it was queued until 9999-12-31)
