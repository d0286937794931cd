"""The `LogAdmin` contract: enumeration of tenants and sessions, the log as export lines, rebuild generations made
live by a checked switch, rebuild progress, and the purge: erase everything of a session at an expected version,
leaving only a tombstone in the tenant's audit stream."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from shared.app.ports import IdempotencyClaim, PurgeConflict
from shared.domain.commands import AddMessage, DeleteSession, decide
from shared.domain.events import SessionPurged, SessionPurgedData
from shared.domain.ids import uuid7
from shared.domain.projection import project
from shared.domain.state import SessionState, fold
from shared.domain.wire import MessageCreate
from tests.contracts.conftest import Backend, add, create, project_all, run, stamp


def tombstone(sid: str, events: int, user: str | None = None) -> SessionPurged:
    return SessionPurged(
        id=uuid7(),
        occurred_at=datetime.now(UTC),
        data=SessionPurgedData(session_id=sid, user_id=user, event_count=events),
    )


async def rebuild(backend: Backend, sid: str) -> int:
    """Build generation g+1 from the log and switch to it, as `Rebuilder` does."""
    [g] = await backend.admin.generations([sid])
    [p] = await backend.views.pending([sid], gen=g + 1)
    assert p is not None
    assert await backend.views.apply([(p.tenant, project(p.state, p.events))], gen=g + 1) == [True]
    [done] = await backend.admin.switch([(p.tenant, sid, g + 1)])
    return done


async def test_tenants_and_sessions_are_enumerated_deleted_ones_too(backend: Backend) -> None:
    admin = backend.admin
    assert await admin.tenants() == []
    a, b = await create(backend.log), await create(backend.log)
    await run(backend.log, b, DeleteSession())
    g = await create(backend.log, tenant="globex")
    assert await admin.tenants() == ["acme", "globex"]
    assert await admin.session_ids("acme") == sorted([a.id, b.id])
    assert await admin.session_ids("globex") == [g.id]
    assert await admin.session_ids("initech") == []


async def test_heads_generations_and_the_log_as_lines(backend: Backend) -> None:
    admin = backend.admin
    state = await add(backend.log, await create(backend.log), "x")
    unknown = uuid7()
    assert await admin.head(state.id) == (2, "acme", 0)
    assert await admin.head(unknown) == (0, None, 0)
    assert await admin.heads([state.id, unknown]) == [2, 0]
    assert await admin.generations([state.id, unknown]) == [0, 0]
    lines = await admin.log_json(state.id, 0, 10)
    assert [v for v, _ in lines] == [1, 2]
    assert lines == [
        (v, page) for v, page in zip([1, 2], (await backend.log.events("acme", state.id, 0, 10)).items or [])
    ]
    assert [v for v, _ in await admin.log_json(state.id, 1, 10)] == [2]
    assert await admin.log_json(state.id, 0, 1) == lines[:1]
    logs = await admin.read_logs({state.id: 0, unknown: 0}, 10)
    assert logs == {state.id: await backend.log.read(state.id), unknown: []}
    assert (await admin.read_logs({state.id: 1}, 10))[state.id] == (await backend.log.read(state.id))[1:]


async def test_a_switch_makes_a_caught_up_generation_live(backend: Backend) -> None:
    admin, views = backend.admin, backend.views
    state = await add(backend.log, await create(backend.log), "x")
    await project_all(views, state.id)
    assert await rebuild(backend, state.id) == 1
    assert await admin.generations([state.id]) == [1]
    assert (await admin.head(state.id))[2] == 1
    view = await views.session("acme", state.id)  # the new generation serves reads
    assert (view.head, view.version) == (2, 2) and view.body is not None
    assert json.loads((await views.sessions("acme", 10, 0))[1][0])["id"] == state.id
    assert [json.loads(m)["content"] for m in (await views.messages("acme", state.id, 10, 0)).items or []] == ["x"]
    states = await admin.generation_states({state.id: 1})
    assert states == {state.id: ("acme", state)}
    assert await admin.switch([("acme", state.id, 1)]) == [2]  # already live
    assert await admin.switch([("acme", uuid7(), 1)]) == [-1]  # no such session


async def test_a_switch_waits_until_both_generations_hold_every_event(backend: Backend) -> None:
    admin, views = backend.admin, backend.views
    state = await create(backend.log)
    [p] = await views.pending([state.id], gen=1)
    assert p is not None
    assert await views.apply([(p.tenant, project(p.state, p.events))], gen=1) == [True]
    assert await admin.switch([("acme", state.id, 1)]) == [0]  # the live generation is behind
    await project_all(views, state.id)
    state = await add(backend.log, state, "meanwhile")
    await project_all(views, state.id)
    assert await admin.switch([("acme", state.id, 1)]) == [0]  # the new one is behind now
    [p] = await views.pending([state.id], gen=1)
    assert p is not None and [e.version for e in p.events] == [2]
    assert await views.apply([(p.tenant, project(p.state, p.events))], gen=1) == [True]
    assert await admin.switch([("acme", state.id, 1)]) == [1]


async def test_a_dropped_generation_starts_over(backend: Backend) -> None:
    admin, views = backend.admin, backend.views
    state = await create(backend.log)
    [p] = await views.pending([state.id], gen=1)
    assert p is not None
    assert await views.apply([(p.tenant, project(p.state, p.events))], gen=1) == [True]
    assert (await admin.generation_states({state.id: 1}))[state.id][1].version == 1
    await admin.drop(state.id, 1)
    assert await admin.generation_states({state.id: 1}) == {state.id: ("acme", SessionState(id=state.id))}
    [again] = await views.pending([state.id], gen=1)
    assert again is not None and len(again.events) == 1


async def test_a_switch_to_a_deleted_sessions_generation_keeps_it_out_of_the_list(backend: Backend) -> None:
    state = await run(backend.log, await create(backend.log), DeleteSession())
    await project_all(backend.views, state.id)
    assert await rebuild(backend, state.id) == 1
    fresh, items = await backend.views.sessions("acme", 10, 0)
    assert fresh.behind() == [] and items == []
    assert (await backend.views.session("acme", state.id)).body is None


async def test_rebuild_progress(backend: Backend) -> None:
    admin = backend.admin
    assert await admin.progress("all") is None
    await admin.set_progress("all", "")
    assert await admin.progress("all") == ""
    await admin.set_progress("all", "acme\x00abc")
    await admin.set_progress("all", "")  # a resumed run keeps its cursor
    assert await admin.progress("all") == "acme\x00abc"
    assert await admin.progress("tenant:acme") is None
    await admin.set_progress("all", None)
    assert await admin.progress("all") is None


async def test_purge_erases_the_session_and_leaves_a_tombstone(backend: Backend) -> None:
    admin, log, views = backend.admin, backend.log, backend.views
    state = await create(backend.log, user_id="u1")
    claim = IdempotencyClaim(key="k", request_hash="h", response=b"{}")
    events = decide(state, AddMessage(body=MessageCreate(role="user", content="secret")), stamp())
    assert await log.append("acme", state.id, 1, events, claim)
    state = fold(state, events)
    keep = await add(log, await create(log), "kept")
    await project_all(views, state.id, keep.id)
    assert not await admin.purge("globex", state.id, 2, tombstone(state.id, 2))  # another tenant's: none
    assert not await admin.purge("acme", uuid7(), 2, tombstone(state.id, 2))
    with pytest.raises(PurgeConflict):
        await admin.purge("acme", state.id, 1, tombstone(state.id, 1))
    stone = tombstone(state.id, 2, "u1")
    assert await admin.purge("acme", state.id, 2, stone)
    assert await log.load("acme", state.id) is None
    assert await log.read(state.id) == []
    assert (await log.events("acme", state.id, 0, 10)).head == 0
    assert await log.recall("acme", state.id, "k", "h") is None
    assert await admin.head(state.id) == (0, None, 0)
    assert await admin.session_ids("acme") == [keep.id]
    assert (await views.session("acme", state.id)).head == 0
    assert await views.pending([state.id]) == [None]
    fresh, items = await views.sessions("acme", 10, 0)
    assert fresh.behind() == [] and [json.loads(i)["id"] for i in items] == [keep.id]
    assert not await admin.purge("acme", state.id, 2, tombstone(state.id, 2))  # gone: nothing to purge twice
    page, cursor = await admin.audit("acme", None, 10)
    assert cursor is None
    [item] = [json.loads(i) for i in page]
    assert (item["type"], item["id"]) == ("SessionPurged", stone.id)
    assert item["data"] == {"session_id": state.id, "user_id": "u1", "event_count": 2}
    assert datetime.fromisoformat(item["occurred_at"]) == stone.occurred_at
    assert (await admin.audit("globex", None, 10)) == ([], None)


async def test_purging_unprojected_events_counts_them_projected(backend: Backend) -> None:
    """The tenant's list never waits for events the projector will now never apply."""
    state = await add(backend.log, await create(backend.log), "x")
    assert (await backend.views.sessions("acme", 10, 0))[0].behind() != []
    assert await backend.admin.purge("acme", state.id, 2, tombstone(state.id, 2))
    fresh, items = await backend.views.sessions("acme", 10, 0)
    assert fresh.behind() == [] and items == []


async def test_a_purged_id_can_be_imported_again(backend: Backend) -> None:
    state = await add(backend.log, await create(backend.log), "x")
    events = await backend.log.read(state.id)
    assert await backend.admin.purge("acme", state.id, 2, tombstone(state.id, 2))
    assert await backend.log.append("globex", state.id, 0, events)
    assert await backend.log.load("globex", state.id) == state
    assert await backend.admin.session_ids("globex") == [state.id]


async def test_a_state_known_from_before_a_purge_is_not_trusted(backend: Backend) -> None:
    """Purged and imported again, shorter: a process that still knows the old, longer state loads the new one."""
    first = await create(backend.log)
    old = await add(backend.log, await add(backend.log, first, "a"), "b")
    imported = (await backend.log.read(first.id))[:1]
    assert await backend.admin.purge("acme", first.id, 3, tombstone(first.id, 3))
    assert await backend.log.append("acme", first.id, 0, imported)
    assert await backend.log.load("acme", first.id, known=old) == first


async def test_the_audit_stream_pages_with_a_cursor_across_partitions(backend: Backend) -> None:
    admin = backend.admin
    stones = []
    for _ in range(7):
        s = await create(backend.log)
        stone = tombstone(s.id, 1)
        assert await admin.purge("acme", s.id, 1, stone)
        stones.append(stone.id)
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        page, cursor = await admin.audit("acme", cursor, 3)
        seen += [json.loads(i)["id"] for i in page]
        if cursor is None:
            break
    assert sorted(seen) == sorted(stones) and len(seen) == 7
    with pytest.raises(ValueError):
        await admin.audit("acme", "not a cursor", 3)


async def test_rewrite_persistence_answers_what_it_started(backend: Backend) -> None:
    if backend.name == "fakeredis":
        pytest.skip("fakeredis has no CONFIG GET (and nothing of it is on disk); `parley purge` cannot reach it anyway")
    started = await backend.admin.rewrite_persistence()
    assert set(started) <= {"BGREWRITEAOF", "BGSAVE"}
