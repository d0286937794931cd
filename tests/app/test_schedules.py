"""Cron schedules on the memory adapters, with a fake clock: each tick runs one chat, once however many
schedulers race for it; ticks within the grace are caught up one by one, older ones recorded as missed; a paused,
changed or deleted schedule stops ticking; the multitask policy and the tenant's limits may refuse a tick, which
is then recorded as skipped; bad schedules are 422s that write nothing; and rebuilt read models equal live ones."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from shared import bootstrap
from shared.app.schedules import Scheduler
from shared.bootstrap import Parley
from shared.domain.commands import SkipTicks, Tick
from shared.domain.errors import Contention, Invalid, NotFound, TickTaken
from shared.domain.events import ChatRequested, ScheduleFired
from shared.domain.wire import ChatRequest, MessageCreate, ScheduleCreate, SchedulePatch, SessionCreate
from tests.app.conftest import Deployment, settings

START = datetime(2026, 12, 7, 8, 59, 30, tzinfo=UTC)  # a Monday, 30 s before 09:00


class Clock:
    def __init__(self, parley: Parley) -> None:
        assert parley.memory is not None
        self.now = START.timestamp()
        parley.memory.clock = lambda: self.now
        parley.service.clock = lambda: datetime.fromtimestamp(self.now, UTC)
        parley.scheduler.clock = lambda: self.now

    def later(self, **delta: float) -> None:
        self.now += timedelta(**delta).total_seconds()


def every(cron: str, text: str = "tick", **fields: object) -> ScheduleCreate:
    return ScheduleCreate(cron=cron, messages=[MessageCreate(role="user", content=text)], **fields)  # type: ignore[arg-type]


async def fired(parley: Parley, sid: str) -> list[ScheduleFired]:
    return [e for e in await parley.log.read(sid) if isinstance(e, ScheduleFired)]


async def session(parley: Parley, **fields: object) -> str:
    return (await parley.sessions.create("acme", SessionCreate(**fields)))[0].id  # type: ignore[arg-type]


async def test_a_schedule_runs_one_chat_per_tick_from_its_next_tick_on(parley: Parley) -> None:
    clock, d = Clock(parley), Deployment(parley)
    sid = await session(parley)
    schedule, _ = await parley.schedules.create("acme", sid, every("*/5 * * * *", "status report"))
    assert schedule.next_run_at == datetime(2026, 12, 7, 9, 0, tzinfo=UTC) and schedule.runs == 0
    await d.settle()
    assert (await parley.scheduler.run_due()).runs == 0  # not yet due
    clock.later(seconds=30)
    assert (await parley.scheduler.run_due()).runs == 1
    await d.settle()
    assert (await parley.scheduler.run_due()).runs == 0  # taken: never twice
    [tick] = await fired(parley, sid)
    assert tick.data.tick == datetime(2026, 12, 7, 9, 0, tzinfo=UTC) and tick.data.skipped is None
    now, _ = await parley.schedules.get("acme", sid, schedule.id)
    assert now.runs == 1 and now.last_job_id == tick.data.job_id
    assert now.next_run_at == datetime(2026, 12, 7, 9, 5, tzinfo=UTC)
    job = await parley.chats.job("acme", sid, tick.data.job_id)
    assert b'"status":"succeeded"' in job
    texts = [m for m in await parley.sessions.messages("acme", sid, 10, 0)]
    assert b"status report" in texts[0] and b'"assistant"' in texts[1]


async def test_two_schedulers_racing_take_each_tick_once(parley: Parley) -> None:
    clock, d = Clock(parley), Deployment(parley)
    sids = [await session(parley) for _ in range(5)]
    for sid in sids:
        await parley.schedules.create("acme", sid, every("* * * * *"))
    await d.settle()
    other = Scheduler(parley.schedules, parley.views, parley.settings.partitions, clock=lambda: clock.now)
    for _ in range(3):
        clock.later(minutes=1)
        await asyncio.gather(parley.scheduler.run_due(), other.run_due(), parley.scheduler.run_due())
        await d.settle()
    for sid in sids:
        ticks = [f.data.tick for f in await fired(parley, sid)]
        assert ticks == [START.replace(second=0) + timedelta(minutes=m) for m in (1, 2, 3)]
        requested = [e for e in await parley.log.read(sid) if isinstance(e, ChatRequested)]
        assert len(requested) == 3


async def test_ticks_within_the_grace_are_caught_up_older_ones_recorded_as_missed() -> None:
    parley = await bootstrap.in_memory(settings(schedule_grace_s=600))
    try:
        clock, d = Clock(parley), Deployment(parley)
        sid = await session(parley)
        await parley.schedules.create("acme", sid, every("* * * * *"))
        await d.settle()
        clock.later(minutes=3, seconds=10)  # 09:02:40: three ticks due, all within the grace
        assert (await parley.scheduler.run_due()).runs == 3
        await d.settle()
        assert [f.data.tick.minute for f in await fired(parley, sid)] == [0, 1, 2]
        clock.later(hours=1)  # 10:02:40: the ticks up to 09:52 are older than the grace
        done = await parley.scheduler.run_due()
        assert (done.runs, done.skipped) == (10, 1)
        ticks = await fired(parley, sid)
        missed = ticks[3]
        assert missed.data.skipped == "missed" and missed.data.job_id is None
        assert (missed.data.missed_from, missed.data.tick) == (
            datetime(2026, 12, 7, 9, 3, tzinfo=UTC),
            datetime(2026, 12, 7, 9, 52, tzinfo=UTC),
        )
        assert [t.data.tick.minute for t in ticks[4:]] == [53, 54, 55, 56, 57, 58, 59, 0, 1, 2]
        schedule = (await parley.schedules.list("acme", sid))[0].items[0]
        assert (schedule.runs, schedule.skipped) == (13, 1)
    finally:
        await parley.close()


async def test_paused_changed_and_deleted_schedules(parley: Parley) -> None:
    clock, d = Clock(parley), Deployment(parley)
    sid = await session(parley)
    s, _ = await parley.schedules.create("acme", sid, every("* * * * *"))
    paused, _ = await parley.schedules.update("acme", sid, s.id, SchedulePatch(paused=True))
    assert paused.paused and paused.next_run_at is None
    await d.settle()
    clock.later(minutes=5)
    assert (await parley.scheduler.run_due()).runs == 0
    resumed, _ = await parley.schedules.update("acme", sid, s.id, SchedulePatch(paused=False, cron="0 10 * * *"))
    assert resumed.next_run_at == datetime(2026, 12, 7, 10, 0, tzinfo=UTC)  # paused ticks are not run
    await d.settle()
    clock.later(minutes=56)
    assert (await parley.scheduler.run_due()).runs == 1
    await parley.schedules.delete("acme", sid, s.id)
    await d.settle()
    clock.later(days=1)
    assert (await parley.scheduler.run_due()).runs == 0
    assert (await parley.schedules.list("acme", sid))[0].items == []
    with pytest.raises(NotFound):
        await parley.schedules.get("acme", sid, s.id)


async def test_the_multitask_policy_and_the_tenants_limits_may_skip_a_tick(parley: Parley) -> None:
    clock, d = Clock(parley), Deployment(parley)
    sid = await session(parley, multitask="reject")
    await parley.schedules.create("acme", sid, every("* * * * *"))
    await d.project()
    clock.later(minutes=1)
    assert (await parley.scheduler.run_due()).runs == 1
    await d.project()  # the chat is queued, not run: the next tick meets it
    clock.later(minutes=1)
    done = await parley.scheduler.run_due()
    assert (done.runs, done.skipped) == (0, 1)
    assert [f.data.skipped for f in await fired(parley, sid)] == [None, "chat_in_progress"]
    await d.settle()
    for s in (await parley.schedules.list("acme", sid))[0].items:
        await parley.schedules.delete("acme", sid, s.id)

    await parley.tenancy.set_limits("acme", {"concurrent_chats": 1})
    quiet = await session(parley)
    await parley.schedules.create("acme", quiet, every("* * * * *"))
    await parley.chats.request("acme", sid, ChatRequest(delay_s=3_600))  # holds the tenant's one chat slot
    await d.project()
    clock.later(minutes=1)
    assert (await parley.scheduler.run_due()).skipped == 1
    assert [f.data.skipped for f in await fired(parley, quiet)] == ["rate_limited"]


async def test_bad_schedules_are_refused_and_write_nothing(parley: Parley) -> None:
    Clock(parley)
    sid = await session(parley)
    version = (await parley.sessions.get("acme", sid))[1]
    for bad in (
        every("* * * *"),
        every("61 * * * *"),
        every("0 0 30 2 *"),
        every("* * * * *", timezone="Mars/Olympus_Mons"),
        every("* * * * *", timezone="localtime"),  # the host's own zone: it differs between workers
        every("* * * * *", timezone="Factory"),
        every("* * * * *", timezone="posix/Europe/Paris"),
        every("* * * * * *"),  # every second: under the minimum interval
        ScheduleCreate(cron="* * * * *", messages=[MessageCreate(role="tool", content="x", tool_call_id="c1")]),
    ):
        with pytest.raises(Invalid):
            await parley.schedules.create("acme", sid, bad)
    s, _ = await parley.schedules.create("acme", sid, every("0 9 * * MON-FRI", timezone="Europe/Paris"))
    assert s.next_run_at == datetime(2026, 12, 8, 8, 0, tzinfo=UTC)  # 09:00 in Paris, the next weekday
    with pytest.raises(Invalid):
        await parley.schedules.update("acme", sid, s.id, SchedulePatch(cron="nonsense here"))
    with pytest.raises(Invalid):
        await parley.schedules.update("acme", sid, s.id, SchedulePatch(timezone="localtime"))
    with pytest.raises(NotFound):
        await parley.schedules.create("other", sid, every("* * * * *"))
    assert (await parley.sessions.get("acme", sid))[1] == version + 1


async def test_a_scheduler_that_decided_on_a_stale_state_cannot_take_a_tick_again(parley: Parley) -> None:
    """The race two worker processes run: both saw tick T due; the first took it; the second's request, decided
    on the log as it is now, is refused (`TickTaken`) and writes nothing, as is a tick of a paused schedule."""
    clock, d = Clock(parley), Deployment(parley)
    sid = await session(parley)
    s, _ = await parley.schedules.create("acme", sid, every("* * * * *"))
    await d.settle()
    clock.later(minutes=1)
    assert (await parley.scheduler.run_due()).runs == 1
    [taken] = await fired(parley, sid)
    head = len(await parley.log.read(sid))
    late = Tick(schedule_id=s.id, at=taken.data.tick)
    with pytest.raises(TickTaken):
        await parley.chats.request("acme", sid, ChatRequest(), tick=late)
    with pytest.raises(TickTaken):
        await parley.service.execute("acme", sid, SkipTicks(tick=late, reason="missed"), lambda s, e: None)
    await parley.schedules.update("acme", sid, s.id, SchedulePatch(paused=True))
    with pytest.raises(TickTaken):
        await parley.chats.request("acme", sid, ChatRequest(), tick=Tick(schedule_id=s.id, at=late.at.replace(hour=23)))
    assert len(await parley.log.read(sid)) == head + 1  # the pause only


async def test_a_session_too_busy_to_take_its_tick_now_is_left_for_the_next_pass(
    parley: Parley, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session whose writers keep winning (`Contention`) must not end the scheduler's pass, nor its part (the
    worker would exit, and the same session would end the next one): the others' ticks are taken, its own stays
    due."""
    clock, d = Clock(parley), Deployment(parley)
    busy, calm = await session(parley), await session(parley)
    for sid in (busy, calm):
        await parley.schedules.create("acme", sid, every("* * * * *"))
    await d.settle()
    request = parley.chats.request

    async def contended(tenant: str, sid: str, *args: object, **kwargs: object) -> object:
        if sid == busy:
            raise Contention(f"session {sid} has too many concurrent writers")
        return await request(tenant, sid, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(parley.chats, "request", contended)
    clock.later(seconds=30)
    assert (await parley.scheduler.run_due()).runs == 1
    assert [len(await fired(parley, sid)) for sid in (busy, calm)] == [0, 1]
    monkeypatch.setattr(parley.chats, "request", request)
    assert (await parley.scheduler.run_due()).runs == 1
    assert [len(await fired(parley, sid)) for sid in (busy, calm)] == [1, 1]


async def test_a_patch_that_changes_nothing_keeps_the_ticks_already_due(parley: Parley) -> None:
    """`{"paused": false}` on a running schedule (or the cron it has) writes nothing; before, it set the schedule's
    start to now, and a tick due but not yet taken was never run."""
    clock, d = Clock(parley), Deployment(parley)
    sid = await session(parley)
    s, version = await parley.schedules.create("acme", sid, every("* * * * *"))
    await d.settle()
    clock.later(seconds=45)  # 09:00 is due, not yet taken
    for patch in (SchedulePatch(paused=False), SchedulePatch(cron="* * * * *"), SchedulePatch()):
        same, at = await parley.schedules.update("acme", sid, s.id, patch)
        assert at == version and same.next_run_at == datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
    assert (await parley.scheduler.run_due()).runs == 1
    [tick] = await fired(parley, sid)
    assert tick.data.tick == datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
