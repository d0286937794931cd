"""Retention on the memory adapters, with a fake clock: a session's own policy or its tenant's says when it
expires; the sweeper deletes or purges what expired in bounded passes, leaves what changed, and a dry run
changes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from shared.app.retention import RetentionSweeper
from shared.bootstrap import Parley
from shared.domain.errors import Contention, NotFound
from shared.domain.wire import (
    ChatRequest,
    MessageCreate,
    Retention,
    ScheduleCreate,
    SchedulePatch,
    SessionCreate,
    SessionPatch,
)
from tests.app.conftest import Deployment


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).timestamp()

    def __call__(self) -> float:
        return self.now

    def days_later(self, days: float) -> None:
        self.now += timedelta(days=days).total_seconds()

    def drive(self, parley: Parley) -> Clock:
        """Stamp the events Parley writes from now on by this clock too."""
        parley.service.clock = lambda: datetime.fromtimestamp(self.now, UTC)
        return self


async def sweep_all(sweeper: RetentionSweeper, dry_run: bool = False, tenant: str | None = None) -> list:
    """Passes until the walk wraps around (each pass is bounded)."""
    expired = []
    while True:
        done = await sweeper.sweep(dry_run=dry_run, tenant=tenant)
        expired += done.expired
        if done.wrapped:
            return expired


async def sweep_trims(sweeper: RetentionSweeper) -> list:
    """Passes until every walk wraps around: what the trim walks freed."""
    trimmed = []
    while True:
        done = await sweeper.sweep()
        trimmed += done.trimmed
        if done.wrapped:
            return trimmed


async def session(parley: Parley, tenant: str = "acme", **fields: object) -> str:
    created, _ = await parley.sessions.create(tenant, SessionCreate(**fields))  # type: ignore[arg-type]
    return created.id


async def shown(parley: Parley, tenant: str, sid: str) -> dict:
    raw, _ = await parley.sessions.get(tenant, sid)
    return msgspec.json.decode(raw)


async def gone(parley: Parley, tenant: str, sid: str) -> bool:
    try:
        await parley.sessions.get(tenant, sid)
    except NotFound:
        return True
    return False


async def test_a_session_shows_when_it_expires_by_its_own_policy_or_its_tenants(parley: Parley) -> None:
    own = await session(parley, retention=Retention(idle_days=3, action="purge"))
    kept = await session(parley)
    body = await shown(parley, "acme", own)
    updated = datetime.fromisoformat(body["updated_at"])
    assert body["retention"] == {"idle_days": 3, "action": "purge", "keep_messages": None}
    assert datetime.fromisoformat(body["expires_at"]) == updated + timedelta(days=3)
    assert (await shown(parley, "acme", kept))["expires_at"] is None
    await parley.tenancy.set_limits("acme", {"retention_idle_days": 30})
    body = await shown(parley, "acme", kept)
    assert datetime.fromisoformat(body["expires_at"]) == datetime.fromisoformat(body["updated_at"]) + timedelta(days=30)
    assert (await shown(parley, "acme", own))["retention"]["idle_days"] == 3  # its own wins
    await parley.sessions.update("acme", own, SessionPatch(retention=None), None)
    assert datetime.fromisoformat((await shown(parley, "acme", own))["expires_at"]) > updated + timedelta(days=29)


async def test_the_sweeper_deletes_or_purges_what_expired_and_nothing_else(parley: Parley) -> None:
    clock = Clock().drive(parley)
    sweeper = RetentionSweeper(parley.sessions, parley.views, parley.settings.partitions, batch=2, clock=clock)
    deleted = await session(parley, retention=Retention(idle_days=2))
    purged = await session(parley, retention=Retention(idle_days=2, action="purge"))
    busy = await session(parley, retention=Retention(idle_days=2))
    forever = await session(parley)
    other = await session(parley, "globex", retention=Retention(idle_days=5))

    d = Deployment(parley)
    await d.project()  # the idle index is a read model: the projector keeps it
    clock.days_later(1)
    assert (await sweeper.sweep()).expired == []  # a day idle: nothing of it expires yet
    clock.days_later(1.5)
    await parley.sessions.add_message("acme", busy, MessageCreate(role="user", content="still here"))
    await d.project()
    fresh = RetentionSweeper(parley.sessions, parley.views, parley.settings.partitions, batch=2, clock=clock)
    dry = await sweep_all(fresh, dry_run=True)  # a walk from the start, as `parley retention run` does
    assert {(e.session_id, e.action, e.done) for e in dry} == {  # `busy` changed just now: not idle
        (deleted, "delete", False),
        (purged, "purge", False),
    }
    assert not await gone(parley, "acme", deleted)

    expired = await sweep_all(fresh)  # batches of 2 per partition: passes go on from where the last stopped
    assert {(e.session_id, e.action) for e in expired if e.done} == {(deleted, "delete"), (purged, "purge")}
    assert await gone(parley, "acme", deleted) and await gone(parley, "acme", purged)
    assert len(await parley.log.read(deleted)) == 2  # deleted: its log (created, deleted) stays
    assert await parley.log.load("acme", purged) is None  # purged: erased
    for sid, tenant in ((busy, "acme"), (forever, "acme"), (other, "globex")):  # not expired, or kept for ever
        assert not await gone(parley, tenant, sid)

    clock.days_later(3)
    later = await sweep_all(fresh, tenant="acme")
    assert {e.session_id for e in later} == {busy}  # and globex's is not acme's to sweep
    assert {e.session_id for e in await sweep_all(fresh)} == {other}
    assert await gone(parley, "globex", other)


async def test_a_tenants_policy_sweeps_its_sessions_without_one_of_their_own(parley: Parley) -> None:
    clock = Clock().drive(parley)
    sweeper = RetentionSweeper(parley.sessions, parley.views, parley.settings.partitions, clock=clock)
    ids = [await session(parley) for _ in range(3)]
    await parley.tenancy.set_limits("acme", {"retention_idle_days": 7, "retention_action": "purge"})
    await Deployment(parley).project()
    clock.days_later(6)
    assert (await sweeper.sweep()).expired == []
    clock.days_later(2)
    done = await sweeper.sweep()
    assert sorted(e.session_id for e in done.expired if e.done and e.action == "purge") == sorted(ids)
    for sid in ids:
        assert await parley.log.load("acme", sid) is None


@pytest.mark.parametrize("days", [0, -1, 36_501])
def test_a_retention_outside_its_bounds_is_refused(days: int) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"retention": {"idle_days": days}}, SessionCreate)


async def test_keep_messages_hides_the_oldest_at_once_and_the_sweeper_frees_their_copies(parley: Parley) -> None:
    clock = Clock().drive(parley)
    own = await session(parley, retention=Retention(keep_messages=2))
    by_tenant = await session(parley)
    other = await session(parley, "globex")
    for sid, tenant in ((own, "acme"), (by_tenant, "acme"), (other, "globex")):
        for i in range(5):
            await parley.sessions.add_message(tenant, sid, MessageCreate(role="user", content=f"m{i}"))
    await parley.tenancy.set_limits("acme", {"retention_keep_messages": 3})
    d = Deployment(parley)
    await d.project()

    async def listed(tenant: str, sid: str) -> list[str]:
        return [msgspec.json.decode(m)["content"] for m in await parley.sessions.messages(tenant, sid, 100, 0)]

    assert await listed("acme", own) == ["m3", "m4"]  # its own retention
    assert await listed("acme", by_tenant) == ["m2", "m3", "m4"]  # its tenant's
    assert await listed("globex", other) == [f"m{i}" for i in range(5)]  # another tenant's policy is not its
    first = (await parley.sessions.messages("acme", own, 100, 0, version=2))[0]
    assert (await parley.sessions.message("acme", own, msgspec.json.decode(first)["id"])).content == "m0"
    assert (await shown(parley, "acme", own))["retention"] == {
        "idle_days": None,
        "action": "delete",
        "keep_messages": 2,
    }
    assert (await shown(parley, "acme", own))["expires_at"] is None  # no idle_days: it never expires

    sweeper = RetentionSweeper(parley.sessions, parley.views, parley.settings.partitions, batch=1, clock=clock)
    clock.days_later(0.01)  # past the trim walk's settling time
    fresh = RetentionSweeper(parley.sessions, parley.views, parley.settings.partitions, clock=clock)
    dry = await fresh.sweep(dry_run=True)  # a walk of its own, as `parley retention run --dry-run` does
    trimmed = await sweep_trims(sweeper)  # batches of one session per partition: passes go on from there
    assert {(t.session_id, t.messages, t.done) for t in trimmed} == {(own, 3, True), (by_tenant, 2, True)}
    assert {(t.session_id, t.messages, t.done) for t in dry.trimmed} == {(own, 3, False), (by_tenant, 2, False)}
    assert await sweep_trims(sweeper) == []  # nothing more to free until it grows
    await parley.sessions.add_message("acme", own, MessageCreate(role="user", content="m5"))
    await d.project()
    clock.days_later(0.01)
    assert [(t.session_id, t.messages) for t in (await sweep_trims(sweeper))] == [(own, 1)]
    assert await listed("acme", own) == ["m4", "m5"]


def test_a_retention_needs_idle_days_or_keep_messages() -> None:
    for body in ({}, {"action": "purge"}, {"keep_messages": 0}, {"idle_days": None, "keep_messages": None}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"retention": body}, SessionCreate)
    assert msgspec.convert({"retention": {"keep_messages": 5}}, SessionCreate).retention == Retention(keep_messages=5)


async def test_a_round_names_each_session_once_however_far_apart_its_walks_end(parley: Parley) -> None:
    """The trim walk reaches more sessions than the expiry walk (a minute idle, not a day), so it ends later; the
    expiry walk must not start over meanwhile, or `parley retention run --dry-run` lists a session several times."""
    clock = Clock().drive(parley)
    d = Deployment(parley)
    expired = await session(parley, retention=Retention(idle_days=1))
    clock.days_later(1.5)
    for _ in range(12):  # a minute old by the sweep: only the trim walk reaches them
        await session(parley)
    await d.project()
    clock.days_later(0.01)
    sweeper = RetentionSweeper(parley.sessions, parley.views, parley.settings.partitions, batch=2, clock=clock)
    dry = await sweep_all(sweeper, dry_run=True)
    assert [e.session_id for e in dry] == [expired]
    assert [e.session_id for e in await sweep_all(sweeper, dry_run=True)] == [expired]  # the next round: again once


async def test_a_session_too_busy_to_remove_now_is_left_for_a_later_pass(
    parley: Parley, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Contention` (its writers keep winning, or a purge it kept changing under) must not end the sweeper's part."""
    clock = Clock().drive(parley)
    sid = await session(parley, retention=Retention(idle_days=1))
    await Deployment(parley).project()
    clock.days_later(1.5)

    async def contended(*args: object, **kwargs: object) -> None:
        raise Contention(f"session {sid} kept changing while being purged; retry")

    delete = parley.sessions.delete
    monkeypatch.setattr(parley.sessions, "delete", contended)
    sweeper = RetentionSweeper(parley.sessions, parley.views, parley.settings.partitions, clock=clock)
    assert [(e.session_id, e.done) for e in await sweep_all(sweeper)] == [(sid, False)]
    monkeypatch.setattr(parley.sessions, "delete", delete)
    assert [(e.session_id, e.done) for e in await sweep_all(sweeper)] == [(sid, True)]
    assert await gone(parley, "acme", sid)


async def test_a_session_with_a_chat_waiting_or_a_live_schedule_is_not_removed_while_so(parley: Parley) -> None:
    """Idle by its last change, yet a delayed chat waits in it (or a schedule will tick in it): removing it would
    cancel that chat, or end the schedule, unseen. Once neither holds it goes as any idle session does."""
    clock = Clock().drive(parley)
    d = Deployment(parley)
    waiting = await session(parley, retention=Retention(idle_days=1))
    scheduled = await session(parley, retention=Retention(idle_days=1))
    idle = await session(parley, retention=Retention(idle_days=1))
    ask = ChatRequest(messages=[MessageCreate(role="user", content="in a week")], delay_s=7 * 86_400)
    job = (await parley.chats.request("acme", waiting, ask)).job
    schedule, _ = await parley.schedules.create(
        "acme", scheduled, ScheduleCreate(cron="0 9 * * 1", messages=[MessageCreate(role="user", content="weekly")])
    )
    await d.project()
    clock.days_later(1.5)
    sweeper = RetentionSweeper(parley.sessions, parley.views, parley.settings.partitions, clock=clock)
    assert [e.session_id for e in await sweep_all(sweeper)] == [idle]
    assert not await gone(parley, "acme", waiting) and not await gone(parley, "acme", scheduled)
    await parley.chats.cancel("acme", waiting, job.id)
    await parley.schedules.update("acme", scheduled, schedule.id, SchedulePatch(paused=True))
    await d.project()
    clock.days_later(1.5)
    assert {e.session_id for e in await sweep_all(sweeper)} == {waiting, scheduled}
