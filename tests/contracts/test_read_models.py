"""The `ReadModels` contract: the views serve what the log says once projected, answer the head beside their own
version (read-your-writes), and `apply` writes an update exactly once, only on top of the version it starts from,
never into a purged session, and a rebuild's generation only above the live one."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import msgspec

from shared.adapters.codec import json_encode
from shared.domain.commands import (
    CreateSchedule,
    DeleteSchedule,
    DeleteSession,
    EditMessage,
    ForkSession,
    RemoveMessage,
    SkipTicks,
    Tick,
    UpdateSchedule,
    UpdateSession,
)
from shared.domain.events import SessionPurged, SessionPurgedData
from shared.domain.ids import partition_of, uuid7
from shared.domain.projection import project
from shared.domain.state import SessionState
from shared.domain.wire import (
    FunctionDef,
    Message,
    MessageCreate,
    Retention,
    ScheduleCreate,
    SchedulePatch,
    SessionPatch,
    Tool,
)
from tests.contracts.conftest import Backend, add, create, project_all, run


def contents(items: list[bytes] | None) -> list[str]:
    return [json.loads(i)["content"] for i in items or []]


async def test_views_lag_until_projected_then_serve_the_session(backend: Backend) -> None:
    log, views = backend.log, backend.views
    state = await create(log, situation="s", tools=[Tool(type="function", function=FunctionDef(name="f"))])
    view = await views.session("acme", state.id)
    assert (view.head, view.version, view.body) == (1, 0, None)
    await project_all(views, state.id)
    view = await views.session("acme", state.id)
    assert (view.head, view.version) == (1, 1)
    assert view.body == json_encode(state.session)
    tools = await views.tools("acme", state.id)
    assert tools.body is not None
    assert json.loads(tools.body) == {
        "items": [{"type": "function", "function": {"name": "f", "description": None, "parameters": None}}]
    }


async def test_other_tenants_and_unknown_ids_see_nothing(backend: Backend) -> None:
    log, views = backend.log, backend.views
    state = await create(log)
    await project_all(views, state.id)
    for view in (
        await views.session("globex", state.id),
        await views.tools("globex", state.id),
        await views.messages("globex", state.id, 10, 0),
        await views.session("acme", uuid7()),
    ):
        assert view.head == 0 and view.body is None and not view.items
    fresh, items = await views.sessions("globex", 10, 0)
    assert fresh.behind() == [] and items == []  # no lagging partition, no session


async def test_messages_page_in_conversation_order(backend: Backend) -> None:
    log, views = backend.log, backend.views
    state = await create(log)
    for i in range(7):
        state = await add(log, state, f"m{i}")
    await project_all(views, state.id)
    page = await views.messages("acme", state.id, 3, 2)
    assert contents(page.items) == ["m2", "m3", "m4"]
    assert [json.loads(m)["seq"] for m in page.items or []] == [3, 4, 5]
    assert (page.head, page.version) == (8, 8)
    assert (await views.messages("acme", state.id, 10, 7)).items == []
    assert contents((await views.messages("acme", state.id, 10, 5)).items) == ["m5", "m6"]


async def test_messages_show_each_latest_edit_skip_removed_ones_and_travel_in_time(backend: Backend) -> None:
    log, views = backend.log, backend.views
    state = await create(log)
    for i in range(4):
        state = await add(log, state, f"m{i}")
    await project_all(views, state.id)
    stored = [msgspec.json.decode(i, type=Message) for i in (await views.messages("acme", state.id, 10, 0)).items or []]
    before_edit = state.version
    state = await run(log, state, EditMessage(message=stored[1], content="m1 edited", name=None))
    edited = state.version
    state = await run(log, state, RemoveMessage(message=stored[2]))
    await project_all(views, state.id)
    assert contents((await views.messages("acme", state.id, 10, 0)).items) == ["m0", "m1 edited", "m3"]
    assert contents((await views.messages("acme", state.id, 2, 1)).items) == [
        "m1 edited",
        "m3",
    ]  # offsets count what is shown
    assert contents((await views.messages("acme", state.id, 1, 2)).items) == ["m3"]
    assert contents((await views.messages("acme", state.id, 10, 0, count=4, at=before_edit)).items) == [
        "m0",
        "m1",
        "m2",
        "m3",
    ]
    assert contents((await views.messages("acme", state.id, 10, 0, count=4, at=edited)).items) == [
        "m0",
        "m1 edited",
        "m2",
        "m3",
    ]
    assert contents((await views.messages("acme", state.id, 10, 0, count=2, at=3)).items) == ["m0", "m1"]


async def test_apply_is_exactly_once(backend: Backend) -> None:
    log, views = backend.log, backend.views
    state = await add(log, await create(log), "x")
    [p] = await views.pending([state.id])
    assert p is not None
    update = project(p.state, p.events)
    assert await views.apply([(p.tenant, update)]) == [True]
    assert await views.apply([(p.tenant, update)]) == [False]
    page = await views.messages("acme", state.id, 10, 0)
    assert len(page.items or []) == 1
    [p] = await views.pending([state.id])
    assert p is not None and p.events == [] and p.state == state


async def test_apply_answers_each_update_on_its_own(backend: Backend) -> None:
    log, views = backend.log, backend.views
    a, b = await create(log), await create(log)
    [pa, pb] = await views.pending([a.id, b.id])
    assert pa is not None and pb is not None
    ua, ub = project(pa.state, pa.events), project(pb.state, pb.events)
    assert await views.apply([(pa.tenant, ua)]) == [True]
    assert await views.apply([(pa.tenant, ua), (pb.tenant, ub)]) == [False, True]
    assert await views.apply([]) == []


async def test_pending_continues_from_the_view(backend: Backend) -> None:
    log, views = backend.log, backend.views
    state = await create(log)
    await project_all(views, state.id)
    state = await add(log, state, "new")
    [p] = await views.pending([state.id])
    assert p is not None
    assert p.tenant == "acme" and p.state.version == 1 and [e.version for e in p.events] == [2] and p.head == 2
    assert await views.pending([uuid7()]) == [None]


async def test_session_list_is_newest_first_across_partitions_and_waits_for_projection(backend: Backend) -> None:
    log, views = backend.log, backend.views
    states = [await create(log) for _ in range(9)]
    other = await create(log, tenant="globex")
    fresh, _ = await views.sessions("acme", 100, 0)
    assert fresh.behind() == sorted({partition_of(s.id, backend.partitions) for s in states})
    await project_all(views, *[s.id for s in states], other.id)
    fresh, items = await views.sessions("acme", 100, 0)
    assert not fresh.behind()
    expected = [s.id for s in reversed(states)]
    assert [json.loads(i)["id"] for i in items] == expected
    assert [json.loads(i)["id"] for i in (await views.sessions("acme", 3, 2))[1]] == expected[2:5]
    assert [json.loads(i)["id"] for i in (await views.sessions("globex", 100, 0))[1]] == [other.id]


async def test_deleted_sessions_leave_the_read_models_but_not_the_log(backend: Backend) -> None:
    log, views = backend.log, backend.views
    state = await add(log, await create(log), "bye")
    state = await run(log, state, DeleteSession())
    assert state.version == 3
    await project_all(views, state.id)
    view = await views.session("acme", state.id)
    assert (view.head, view.version, view.body) == (3, 3, None)
    assert (await views.tools("acme", state.id)).body is None
    assert (await views.messages("acme", state.id, 10, 0)).body is None
    fresh, items = await views.sessions("acme", 10, 0)
    assert fresh.behind() == [] and items == []  # no lagging partition, no session
    assert len(await log.read(state.id)) == 3
    # the message list stays, so past versions still answer (a purge erases it)
    past = await views.messages("acme", state.id, 10, 0, count=1)
    assert contents(past.items) == ["bye"]


async def test_updates_rewrite_the_session_view(backend: Backend) -> None:
    log, views = backend.log, backend.views
    state = await create(log, agent_id="a")
    state = await run(log, state, UpdateSession(patch=SessionPatch(agent_id=None, tools=[])))
    assert state.version == 3
    await project_all(views, state.id)
    body = msgspec.json.decode((await views.session("acme", state.id)).body or b"")
    assert body["agent_id"] is None and body["version"] == 3


async def test_a_purged_session_cannot_be_brought_back_by_a_late_apply(backend: Backend) -> None:
    log, views = backend.log, backend.views
    state = await add(log, await create(log), "secret")
    [p] = await views.pending([state.id])
    assert p is not None
    late = project(p.state, p.events)
    tombstone = SessionPurged(
        id=uuid7(),
        occurred_at=datetime.now(UTC),
        data=SessionPurgedData(session_id=state.id, user_id=None, event_count=2),
    )
    assert await backend.admin.purge("acme", state.id, 2, tombstone)
    assert await views.apply([(p.tenant, late)]) == [False]
    assert await views.pending([state.id]) == [None]
    assert (await views.messages("acme", state.id, 10, 0)).head == 0


async def test_a_rebuild_generation_is_written_apart_and_only_above_the_live_one(backend: Backend) -> None:
    log, views = backend.log, backend.views
    state = await add(log, await create(log), "x")
    await project_all(views, state.id)
    [fresh] = await views.pending([state.id], gen=1)
    assert fresh is not None and fresh.state == SessionState(id=state.id) and len(fresh.events) == 2
    update = project(fresh.state, fresh.events)
    assert await views.apply([("acme", update)], gen=0) == [False]  # not above the live generation
    assert await views.apply([("acme", update)], gen=1) == [True]
    assert await views.apply([("acme", update)], gen=1) == [False]  # exactly once there too
    [again] = await views.pending([state.id], gen=1)
    assert again is not None and again.events == [] and again.state == state
    view = await views.session("acme", state.id)  # the live generation is untouched until a switch
    assert (view.head, view.version) == (2, 2)


async def test_a_stale_rebuild_cannot_write_into_the_live_generation(backend: Backend) -> None:
    """Two rebuilds built generation 1; one switched to it. The other's later writes to generation 1 (now live) are
    refused: a rebuild's write skips the index, the counters and the chat jobs, so it must never land in a live one."""
    log, views = backend.log, backend.views
    state = await add(log, await create(log), "x")
    await project_all(views, state.id)
    [fresh] = await views.pending([state.id], gen=1)
    assert fresh is not None
    assert await views.apply([("acme", project(fresh.state, fresh.events))], gen=1) == [True]
    assert await backend.admin.switch([("acme", state.id, 1)]) == [1]
    state = await add(log, state, "after the switch")
    [stale] = await views.pending([state.id], gen=1)
    assert stale is not None and [e.version for e in stale.events] == [3]
    assert await views.apply([("acme", project(stale.state, stale.events))], gen=1) == [False]
    fresh, _ = await views.sessions("acme", 10, 0)
    assert fresh.behind() != []  # still unprojected: only the live projection may count it
    await project_all(views, state.id)
    fresh, items = await views.sessions("acme", 10, 0)
    assert fresh.behind() == [] and items == [json_encode(state.session)]


async def test_the_idle_index_walks_live_sessions_by_last_change_oldest_first(backend: Backend) -> None:
    """What the retention sweeper reads: per partition, each live session with its last change, oldest first,
    resumable from a cursor; a session leaves it when deleted, or when forgotten (purged)."""
    log, views = backend.log, backend.views
    states = [await create(log) for _ in range(12)] + [await create(log, tenant="globex") for _ in range(4)]
    await project_all(views, *[s.id for s in states])
    gone = await run(log, states[0], DeleteSession())
    await project_all(views, gone.id)
    changed = await add(log, states[1], "later")
    await project_all(views, changed.id)
    now_ms = int(datetime.now(UTC).timestamp() * 1000) + 1_000
    expected = {s.id: s for s in states[2:]} | {changed.id: changed}
    seen: dict[str, int] = {}
    for p in range(backend.partitions):
        walked, cursor = [], None
        while page := await views.idle(p, now_ms, cursor, 2):
            walked += page
            cursor = page[-1]
        assert walked == sorted(walked)  # by (last change, tenant/id)
        assert walked == await views.idle(p, now_ms, None, 100)
        for entry in walked:
            assert partition_of(entry.session_id, backend.partitions) == p
            seen[entry.session_id] = entry.changed_ms
            s = expected[entry.session_id]
            assert s.session is not None and entry.changed_ms == int(s.session.updated_at.timestamp() * 1000)
            assert entry.tenant == ("globex" if s in states[12:] else "acme")
    assert set(seen) == set(expected)  # the deleted one left
    p = partition_of(changed.id, backend.partitions)
    assert [e.session_id for e in await views.idle(p, seen[changed.id] - 1, None, 100)].count(changed.id) == 0
    await views.forget_idle(p, "acme", changed.id)
    assert changed.id not in [e.session_id for e in await views.idle(p, now_ms, None, 100)]


async def test_the_schedule_index_names_each_session_by_its_next_tick(backend: Backend) -> None:
    """What the scheduler reads: per partition, each session with a running schedule and its next tick, soonest
    first; pausing its only schedule, deleting it or the session takes it out; firing a tick moves it on."""
    log, views = backend.log, backend.views
    body = ScheduleCreate(cron="0 * * * *", messages=[MessageCreate(role="user", content="hourly")])
    states = [await create(log) for _ in range(6)]
    states = [await run(log, s, CreateSchedule(schedule_id=uuid7(), body=body)) for s in states]
    await project_all(views, *[s.id for s in states])
    since = states[0].schedules[0].since  # (all made within the same hour but at its very end)
    hour = since.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    assert all(s.schedules[0].since < hour for s in states)
    far = int((hour + timedelta(days=1)).timestamp() * 1000)
    due = [e for p in range(backend.partitions) for e in await views.due(p, far, 100)]
    assert sorted(e.session_id for e in due) == sorted(s.id for s in states)
    assert {e.due_ms for e in due} == {int(hour.timestamp() * 1000)} and {e.tenant for e in due} == {"acme"}
    assert [e for p in range(backend.partitions) for e in await views.due(p, int(hour.timestamp() * 1000) - 1, 9)] == []

    [paused, deleted, gone, fired, *_] = states
    paused = await run(
        log, paused, UpdateSchedule(schedule_id=paused.schedules[0].id, patch=SchedulePatch(paused=True))
    )
    deleted = await run(log, deleted, DeleteSchedule(schedule_id=deleted.schedules[0].id))
    gone = await run(log, gone, DeleteSession())
    tick = Tick(schedule_id=fired.schedules[0].id, at=hour)
    fired = await run(log, fired, SkipTicks(tick=tick, reason="missed", missed_from=hour))
    await project_all(views, paused.id, deleted.id, gone.id, fired.id)
    due = {e.session_id: e.due_ms for p in range(backend.partitions) for e in await views.due(p, far, 100)}
    assert set(due) == {s.id for s in states[3:]}
    assert due[fired.id] == int((hour + timedelta(hours=1)).timestamp() * 1000)
    p = partition_of(fired.id, backend.partitions)
    await views.forget_due(p, "acme", fired.id)
    assert fired.id not in [e.session_id for e in await views.due(p, far, 100)]


async def test_a_parents_forks_are_indexed_across_partitions(backend: Backend) -> None:
    """`forks` names every fork of a session, oldest first, whatever partition each fork hashed into."""
    log, views = backend.log, backend.views
    parent = await add(log, await create(log), "hello")
    other = await create(log)
    events = tuple(await log.read(parent.id, 0, 100))
    forks = []
    while len(forks) < 6 or len({partition_of(f.id, backend.partitions) for f in forks}) < 2:
        forks.append(await run(log, SessionState(id=uuid7()), ForkSession(parent=parent, events=events)))
    await project_all(views, parent.id, other.id, *[f.id for f in forks])
    assert await views.forks(parent.id) == [f.id for f in forks]
    assert await views.forks(other.id) == [] and await views.forks(forks[0].id) == []


async def test_a_keep_messages_retention_hides_the_oldest_from_the_list_and_trim_frees_their_copies(
    backend: Backend,
) -> None:
    """The list shows the newest N shown messages (the tenant's N, or the session's own retention's); a past
    version and a lookup (`keep_messages=None`) still see every one; trimming frees the hidden ones' copies in
    budgeted steps, and everything reads the same after it, from the log."""
    log, views = backend.log, backend.views
    state = await create(log)
    for i in range(6):
        state = await add(log, state, f"m{i}")
    await project_all(views, state.id)
    stored = [msgspec.json.decode(i, type=Message) for i in (await views.messages("acme", state.id, 10, 0)).items or []]
    state = await run(log, state, RemoveMessage(message=stored[4]))
    await project_all(views, state.id)
    every = ["m0", "m1", "m2", "m3", "m5"]
    assert contents((await views.messages("acme", state.id, 10, 0)).items) == every
    assert contents((await views.messages("acme", state.id, 10, 0, keep_messages=0)).items) == every
    assert contents((await views.messages("acme", state.id, 10, 0, keep_messages=3)).items) == ["m2", "m3", "m5"]
    assert contents((await views.messages("acme", state.id, 1, 1, keep_messages=3)).items) == ["m3"]
    assert contents((await views.messages("acme", state.id, 10, 0, count=6, at=7, keep_messages=3)).items) == [
        "m0",
        "m1",
        "m2",
        "m3",
        "m4",
        "m5",
    ]  # a past version is the log's: every message it had
    assert contents((await views.messages("acme", state.id, 10, 0, keep_messages=9)).items) == every

    assert await views.trim("acme", state.id, 3, 1, dry_run=True) == 1  # a budget of one entry per call
    assert await views.trim("acme", state.id, 3, 100, dry_run=True) == 3  # 6 positions, the newest 3 kept
    assert await views.trim("acme", state.id, 3, 2, dry_run=False) == 2
    assert await views.trim("acme", state.id, 3, 100, dry_run=False) == 1
    assert await views.trim("acme", state.id, 3, 100, dry_run=False) == 0  # nothing more until it grows
    assert await views.trim("globex", state.id, 3, 100, dry_run=False) == 0  # not another tenant's to trim
    assert contents((await views.messages("acme", state.id, 10, 0, keep_messages=3)).items) == ["m2", "m3", "m5"]
    assert contents((await views.messages("acme", state.id, 10, 0)).items) == every  # freed copies: from the log
    assert contents((await views.messages("acme", state.id, 10, 0, count=6, at=7)).items)[:3] == ["m0", "m1", "m2"]

    state = await run(log, state, UpdateSession(patch=SessionPatch(retention=Retention(keep_messages=1))))
    state = await add(log, state, "m6")
    await project_all(views, state.id)
    for tenants in (0, 3):  # the session's own retention wins over its tenant's
        assert contents((await views.messages("acme", state.id, 10, 0, keep_messages=tenants)).items) == ["m6"]
    assert await views.trim("acme", state.id, 0, 100, dry_run=False) == 3  # positions 4..6 (m3, m4, m5)
    state = await run(log, state, UpdateSession(patch=SessionPatch(retention=Retention(idle_days=9))))
    await project_all(views, state.id)  # its own retention keeps every message: the tenant's N does not apply
    assert contents((await views.messages("acme", state.id, 10, 0, keep_messages=3)).items) == [*every, "m6"]
    assert await views.trim("acme", state.id, 3, 100, dry_run=False) == 0
