"""The `EventLog` contract: appends are atomic under an expected version, exactly once per event id, idempotent under
a key; loads fold to the head; reads, pages and time travel answer from the log alone."""

from __future__ import annotations

import json

import pytest

from shared.app.ports import CONFLICT_TAIL, Appended, Conflict, IdempotencyClaim, IdempotencyMismatch, Missing, Replayed
from shared.domain.commands import AddMessage, CreateSession, DeleteSession, decide
from shared.domain.ids import uuid7
from shared.domain.projection import SNAPSHOT_EVERY
from shared.domain.state import SessionState, fold
from shared.domain.wire import MessageCreate, SessionCreate
from tests.contracts.conftest import Backend, add, create, project_all, run, stamp

LOAD_BATCH = 500
"""Events per load step in both adapters: a longer log is folded in several."""


async def test_append_then_read_returns_the_same_events(backend: Backend) -> None:
    log = backend.log
    state = SessionState(id=uuid7())
    events = decide(state, CreateSession(body=SessionCreate(situation="s")), stamp())
    state = fold(state, events)
    more = decide(state, AddMessage(body=MessageCreate(role="user", content="hé ✓")), stamp())
    assert await log.append("acme", state.id, 0, events) == Appended(1)
    assert await log.append("acme", state.id, 1, more) == Appended(2)
    assert await log.read(state.id) == events + more
    assert await log.read(state.id, after=1) == more
    assert await log.read(state.id, after=2) == []
    assert await log.read(state.id, after=0, limit=1) == events


async def test_an_append_needs_events(backend: Backend) -> None:
    with pytest.raises(ValueError):
        await backend.log.append("acme", uuid7(), 0, [])


async def test_stale_expected_version_conflicts_and_writes_nothing(backend: Backend) -> None:
    log = backend.log
    state = await add(log, await create(log), "one")
    stale = decide(state, AddMessage(body=MessageCreate(role="user", content="x")), stamp())
    logged = await log.read(state.id)
    # the events the writer missed come back with the refusal, so it can decide again without loading them
    assert await log.append("acme", state.id, 1, stale) == Conflict(2, tuple(logged[1:]))
    assert await log.append("acme", state.id, 0, stale) == Conflict(2, tuple(logged))
    assert await log.append("acme", state.id, 5, stale) == Conflict(2)  # ahead of the head: a conflict too
    assert len(await log.read(state.id)) == 2


async def test_a_conflict_far_behind_the_head_answers_no_events(backend: Backend) -> None:
    """Only a few missed events come back with a conflict (`CONFLICT_TAIL`): a writer further behind reloads."""
    log = backend.log
    state = await create(log)
    for i in range(CONFLICT_TAIL + 1):
        state = await add(log, state, f"m{i}")
    stale = decide(state, AddMessage(body=MessageCreate(role="user", content="x")), stamp())
    assert await log.append("acme", state.id, 1, stale) == Conflict(CONFLICT_TAIL + 2)
    near = await log.append("acme", state.id, 2, stale)
    assert isinstance(near, Conflict) and [e.version for e in near.newer] == list(range(3, CONFLICT_TAIL + 3))


async def test_an_unknown_session_conflicts_at_version_0_and_stays_unknown(backend: Backend) -> None:
    state = SessionState(id=uuid7())
    created = fold(state, decide(state, CreateSession(body=SessionCreate()), stamp()))
    events = decide(created, AddMessage(body=MessageCreate(role="user", content="x")), stamp())
    assert await backend.log.append("acme", state.id, 1, events) == Conflict(0)
    assert await backend.log.load("acme", state.id) is None
    assert (await backend.log.events("acme", state.id, 0, 10)).head == 0


async def test_an_append_repeated_after_a_lost_reply_is_recognised_not_written_twice(backend: Backend) -> None:
    """A client library that retries an append whose reply it lost (redis-py's cluster client does) sends the very
    same events again: APPEND answers 'appended' at their version, even after later appends, and stores them once."""
    log = backend.log
    state = await create(log)
    events = decide(state, AddMessage(body=MessageCreate(role="user", content="once")), stamp())
    assert await log.append("acme", state.id, 1, events) == Appended(2)
    assert await log.append("acme", state.id, 1, events) == Appended(2)
    later = await add(log, fold(state, events), "later")
    assert await log.append("acme", state.id, 1, events) == Appended(2)
    stored = await log.read(state.id)
    assert len(stored) == later.version == 3 and [e.id for e in stored].count(events[0].id) == 1
    other = decide(state, AddMessage(body=MessageCreate(role="user", content="new")), stamp())
    refused = await log.append("acme", state.id, 1, other)  # other events at a stale version: a conflict
    assert refused == Conflict(3, tuple(stored[1:]))


async def test_another_tenant_cannot_append_or_load(backend: Backend) -> None:
    log = backend.log
    state = await create(log)
    events = decide(state, AddMessage(body=MessageCreate(role="user", content="x")), stamp())
    assert await log.append("globex", state.id, 1, events) == Missing()
    assert await log.append("globex", state.id, 0, events) == Missing()
    assert await log.load("globex", state.id) is None
    assert await log.load("acme", state.id) == state


async def test_idempotent_append_replays_the_first_response_and_appends_once(backend: Backend) -> None:
    log = backend.log
    state = await create(log)
    claim = IdempotencyClaim(key="k1", request_hash="h1", response=b'{"first":true}')
    events = decide(state, AddMessage(body=MessageCreate(role="user", content="x")), stamp())
    assert await log.append("acme", state.id, 1, events, claim) == Appended(2)
    again = decide(fold(state, events), AddMessage(body=MessageCreate(role="user", content="x")), stamp())
    assert await log.append("acme", state.id, 2, again, claim) == Replayed(b'{"first":true}')
    other = IdempotencyClaim(key="k1", request_hash="h2", response=b"{}")
    assert await log.append("acme", state.id, 2, again, other) == IdempotencyMismatch()
    assert len(await log.read(state.id)) == 2
    assert await log.recall("acme", state.id, "k1", "h1") == b'{"first":true}'
    assert await log.recall("acme", state.id, "k1", "h2") == b""
    assert await log.recall("globex", state.id, "k1", "h1") is None
    assert await log.recall("acme", state.id, "k2", "h1") is None


async def test_a_replay_wins_over_a_stale_version_and_another_tenant(backend: Backend) -> None:
    """The idempotency record is checked first: a retry answers the stored response even though the session moved
    on since (its expected version is stale now)."""
    log = backend.log
    state = await create(log)
    claim = IdempotencyClaim(key="k", request_hash="h", response=b'"r"')
    events = decide(state, AddMessage(body=MessageCreate(role="user", content="x")), stamp())
    assert await log.append("acme", state.id, 1, events, claim) == Appended(2)
    await add(log, fold(state, events), "later")
    assert await log.append("acme", state.id, 1, events, claim) == Replayed(b'"r"')
    assert len(await log.read(state.id)) == 3


async def test_a_claim_is_stored_only_with_an_append_that_lands(backend: Backend) -> None:
    log = backend.log
    state = await add(log, await create(log), "one")
    stale = decide(state, AddMessage(body=MessageCreate(role="user", content="x")), stamp())
    claim = IdempotencyClaim(key="k", request_hash="h", response=b"{}")
    assert isinstance(await log.append("acme", state.id, 1, stale, claim), Conflict)
    assert await log.recall("acme", state.id, "k", "h") is None
    assert await log.append("acme", state.id, 2, stale, claim) == Appended(3)
    assert await log.recall("acme", state.id, "k", "h") == b"{}"


async def test_load_folds_long_logs_and_starts_from_the_view(backend: Backend) -> None:
    log = backend.log
    state = await create(log)
    for i in range(LOAD_BATCH + 20):
        state = await add(log, state, f"m{i}")
    assert await log.load("acme", state.id) == state
    await project_all(backend.views, state.id)
    state = await add(log, state, "after projection")
    assert await log.load("acme", state.id) == state
    half = fold(SessionState(id=state.id), (await log.read(state.id, limit=100)))
    assert await log.load("acme", state.id, known=half) == state


async def test_load_from_a_known_state_reads_only_what_follows(backend: Backend) -> None:
    log = backend.log
    state = await add(log, await create(log), "a")
    known = state
    state = await add(log, state, "b")
    assert await log.load("acme", state.id, known=known) == state
    assert await log.load("acme", state.id, known=state) == state  # nothing new: the same state


async def test_load_of_an_unknown_session_is_none(backend: Backend) -> None:
    assert await backend.log.load("acme", uuid7()) is None


async def test_events_pages_the_log_as_wire_json(backend: Backend) -> None:
    log = backend.log
    state = await create(log)
    for i in range(4):
        state = await add(log, state, f"m{i}")
    page = await log.events("acme", state.id, 1, 2)
    assert page.head == page.version == 5 and page.body is not None
    items = [json.loads(i) for i in page.items or []]
    assert [(i["type"], i["version"], i["data"]["content"]) for i in items] == [
        ("MessageAdded", 2, "m0"),
        ("MessageAdded", 3, "m1"),
    ]
    stored = await log.read(state.id, after=1, limit=2)
    assert [i["id"] for i in items] == [e.id for e in stored]
    end = await log.events("acme", state.id, 5, 10)
    assert (end.head, end.items) == (5, [])
    assert (await log.events("acme", state.id, 99, 10)).items == []
    for nobody in (await log.events("globex", state.id, 0, 10), await log.events("acme", uuid7(), 0, 10)):
        assert (nobody.head, nobody.body, nobody.items) == (0, None, None)


async def test_at_version_folds_the_past_from_the_nearest_snapshot(backend: Backend) -> None:
    log = backend.log
    state = await create(log)
    states = {1: state}
    for i in range(SNAPSHOT_EVERY + 10):
        state = await add(log, state, f"m{i}")
        states[state.version] = state
    await project_all(backend.views, state.id)  # writes the snapshot at SNAPSHOT_EVERY
    for version in (1, 2, SNAPSHOT_EVERY - 1, SNAPSHOT_EVERY, SNAPSHOT_EVERY + 1, state.version):
        assert await log.at_version("acme", state.id, version) == (state.version, states[version])
    assert await log.at_version("acme", state.id, state.version + 1) == (state.version, None)
    assert await log.at_version("globex", state.id, 1) == (0, None)
    assert await log.at_version("acme", uuid7(), 1) == (0, None)


async def test_a_deleted_session_still_loads_and_refuses_writes_by_decision_only(backend: Backend) -> None:
    log = backend.log
    state = await run(log, await create(log), DeleteSession())
    loaded = await log.load("acme", state.id)
    assert loaded is not None and loaded.deleted and loaded.version == 2
