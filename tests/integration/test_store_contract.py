"""The EventLog and ReadModels contract, run against every backend: fakeredis and a real redis-server."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from itertools import count

import msgspec
import pytest

from shared.adapters.codec import json_encode
from shared.domain.commands import AddMessage, CreateSession, DeleteSession, Stamp, UpdateSession, decide
from shared.domain.ids import uuid7
from shared.domain.wire import FunctionDef, MessageCreate, SessionCreate, SessionPatch, Tool
from shared.domain.projection import project
from shared.domain.state import SessionState, fold
from shared.app.ports import Appended, Conflict, IdempotencyClaim, IdempotencyMismatch, Missing, Replayed
from shared.adapters.redis.api_keys import RedisApiKeys
from shared.domain.ids import key_id
from shared.adapters.redis.keys import Keys, partition_of
from shared.adapters.redis.store import LOAD_BATCH, RedisStore

_ids = count()


def stamp() -> Stamp:
    return Stamp(now=datetime.now(UTC), new_id=uuid7)


@pytest.fixture
def store(redis) -> RedisStore:
    return RedisStore(redis, Keys(4))


async def create(store: RedisStore, tenant: str = "acme", **fields) -> SessionState:
    state = SessionState(id=uuid7())
    events = decide(state, CreateSession(body=SessionCreate(**fields)), stamp())
    assert await store.append(tenant, state.id, 0, events) == Appended(1)
    return fold(state, events)


async def add(store: RedisStore, state: SessionState, content: str, tenant: str = "acme") -> SessionState:
    events = decide(state, AddMessage(body=MessageCreate(role="user", content=content)), stamp())
    assert await store.append(tenant, state.id, state.version, events) == Appended(state.version + 1)
    return fold(state, events)


async def project_all(store: RedisStore, *session_ids: str) -> None:
    for p in await store.pending(list(session_ids)):
        assert p is not None
        update = project(p.state, p.events)
        assert await store.apply([(p.tenant, update)]) == [True]


# -- EventLog ---------------------------------------------------------------------------
async def test_append_then_read_returns_the_same_events(store):
    state = SessionState(id=uuid7())
    events = decide(state, CreateSession(body=SessionCreate(situation="s")), stamp())
    state = fold(state, events)
    more = decide(state, AddMessage(body=MessageCreate(role="user", content="hé ✓")), stamp())
    assert await store.append("acme", state.id, 0, events) == Appended(1)
    assert await store.append("acme", state.id, 1, more) == Appended(2)
    assert await store.read(state.id) == events + more
    assert await store.read(state.id, after=1) == more
    assert await store.read(state.id, after=2) == []


async def test_stale_expected_version_conflicts_and_writes_nothing(store):
    state = await add(store, await create(store), "one")
    stale = decide(state, AddMessage(body=MessageCreate(role="user", content="x")), stamp())
    assert await store.append("acme", state.id, 1, stale) == Conflict(2)
    assert await store.append("acme", state.id, 0, stale) == Conflict(2)
    assert len(await store.read(state.id)) == 2


async def test_an_append_repeated_after_a_lost_reply_is_recognised_not_written_twice(store):
    """A client library that retries an append whose reply it lost (redis-py's cluster client does) sends the very
    same events again: APPEND answers 'appended' at their version, even after later appends, and stores them once."""
    state = await create(store)
    events = decide(state, AddMessage(body=MessageCreate(role="user", content="once")), stamp())
    assert await store.append("acme", state.id, 1, events) == Appended(2)
    assert await store.append("acme", state.id, 1, events) == Appended(2)
    later = await add(store, fold(state, events), "later")
    assert await store.append("acme", state.id, 1, events) == Appended(2)
    stored = await store.read(state.id)
    assert len(stored) == later.version == 3 and [e.id for e in stored].count(events[0].id) == 1
    other = decide(state, AddMessage(body=MessageCreate(role="user", content="new")), stamp())
    assert await store.append("acme", state.id, 1, other) == Conflict(3)  # other events at a stale version: a conflict


async def test_another_tenant_cannot_append_or_load(store):
    state = await create(store)
    events = decide(state, AddMessage(body=MessageCreate(role="user", content="x")), stamp())
    assert await store.append("globex", state.id, 1, events) == Missing()
    assert await store.load("globex", state.id) is None
    assert await store.load("acme", state.id) == state


async def test_idempotent_append_replays_the_first_response_and_appends_once(store):
    state = await create(store)
    claim = IdempotencyClaim(key="k1", request_hash="h1", response=b'{"first":true}')
    events = decide(state, AddMessage(body=MessageCreate(role="user", content="x")), stamp())
    assert await store.append("acme", state.id, 1, events, claim) == Appended(2)
    again = decide(fold(state, events), AddMessage(body=MessageCreate(role="user", content="x")), stamp())
    assert await store.append("acme", state.id, 2, again, claim) == Replayed(b'{"first":true}')
    other = IdempotencyClaim(key="k1", request_hash="h2", response=b"{}")
    assert await store.append("acme", state.id, 2, again, other) == IdempotencyMismatch()
    assert len(await store.read(state.id)) == 2
    assert await store.recall("acme", state.id, "k1", "h1") == b'{"first":true}'
    assert await store.recall("acme", state.id, "k1", "h2") == b""
    assert await store.recall("globex", state.id, "k1", "h1") is None


async def test_load_folds_long_logs_and_starts_from_the_view(store):
    state = await create(store)
    for i in range(LOAD_BATCH + 20):
        state = await add(store, state, f"m{i}")
    assert await store.load("acme", state.id) == state
    await project_all(store, state.id)
    state = await add(store, state, "after projection")
    assert await store.load("acme", state.id) == state
    half = fold(SessionState(id=state.id), (await store.read(state.id, limit=100)))
    assert await store.load("acme", state.id, known=half) == state


async def test_load_of_an_unknown_session_is_none(store):
    assert await store.load("acme", uuid7()) is None


# -- ReadModels ------------------------------------------------------------------------
async def test_views_lag_until_projected_then_serve_the_session(store):
    state = await create(store, situation="s", tools=[Tool(type="function", function=FunctionDef(name="f"))])
    view = await store.session("acme", state.id)
    assert (view.head, view.version, view.body) == (1, 0, None)
    await project_all(store, state.id)
    view = await store.session("acme", state.id)
    assert (view.head, view.version) == (1, 1)
    assert view.body == json_encode(state.session)
    tools = await store.tools("acme", state.id)
    assert json.loads(tools.body) == {"items": [{"type": "function", "function": {"name": "f", "description": None, "parameters": None}}]}


async def test_other_tenants_and_unknown_ids_see_nothing(store):
    state = await create(store)
    await project_all(store, state.id)
    for view in (
        await store.session("globex", state.id),
        await store.tools("globex", state.id),
        await store.messages("globex", state.id, 10, 0),
        await store.session("acme", uuid7()),
    ):
        assert view.head == 0 and not view.items
    assert (await store.sessions("globex", 10, 0)) == ([], [])  # no lagging partition, no session


async def test_messages_page_in_conversation_order(store):
    state = await create(store)
    for i in range(7):
        state = await add(store, state, f"m{i}")
    await project_all(store, state.id)
    page = await store.messages("acme", state.id, 3, 2)
    assert [json.loads(m)["content"] for m in page.items] == ["m2", "m3", "m4"]
    assert [json.loads(m)["seq"] for m in page.items] == [3, 4, 5]
    assert (page.head, page.version) == (8, 8)
    assert (await store.messages("acme", state.id, 10, 7)).items == []


async def test_apply_is_exactly_once(store):
    state = await add(store, await create(store), "x")
    [p] = await store.pending([state.id])
    update = project(p.state, p.events)
    assert await store.apply([(p.tenant, update)]) == [True]
    assert await store.apply([(p.tenant, update)]) == [False]
    page = await store.messages("acme", state.id, 10, 0)
    assert len(page.items) == 1
    [p] = await store.pending([state.id])
    assert p.events == [] and p.state == state


async def test_pending_continues_from_the_view(store):
    state = await create(store)
    await project_all(store, state.id)
    state = await add(store, state, "new")
    [p] = await store.pending([state.id])
    assert p.state.version == 1 and [e.version for e in p.events] == [2] and p.head == 2
    assert await store.pending([uuid7()]) == [None]


async def test_session_list_is_newest_first_across_partitions_and_waits_for_projection(store):
    states = [await create(store) for _ in range(9)]
    other = await create(store, tenant="globex")
    lagging, _ = await store.sessions("acme", 100, 0)
    assert lagging == sorted({partition_of(s.id, store.keys.partitions) for s in states})
    await project_all(store, *[s.id for s in states], other.id)
    lagging, items = await store.sessions("acme", 100, 0)
    assert not lagging
    expected = [s.id for s in reversed(states)]
    assert [json.loads(i)["id"] for i in items] == expected
    assert [json.loads(i)["id"] for i in (await store.sessions("acme", 3, 2))[1]] == expected[2:5]
    assert [json.loads(i)["id"] for i in (await store.sessions("globex", 100, 0))[1]] == [other.id]


async def test_deleted_sessions_leave_the_read_models_but_not_the_log(store):
    state = await add(store, await create(store), "bye")
    events = decide(state, DeleteSession(), stamp())
    assert await store.append("acme", state.id, 2, events) == Appended(3)
    await project_all(store, state.id)
    view = await store.session("acme", state.id)
    assert (view.head, view.version, view.body) == (3, 3, None)
    assert (await store.messages("acme", state.id, 10, 0)).body is None
    assert (await store.sessions("acme", 10, 0)) == ([], [])  # no lagging partition, no session
    assert len(await store.read(state.id)) == 3
    # the message pointers stay (no content: versions into the log) so past versions still answer
    past = await store.messages("acme", state.id, 10, 0, count=1)
    assert [msgspec.json.decode(i)["content"] for i in past.items] == ["bye"]


async def test_updates_rewrite_the_session_view(store):
    state = await create(store, agent_id="a")
    events = decide(state, UpdateSession(patch=SessionPatch(agent_id=None, tools=[])), stamp())
    assert await store.append("acme", state.id, 1, events) == Appended(3)
    await project_all(store, state.id)
    body = msgspec.json.decode((await store.session("acme", state.id)).body)
    assert body["agent_id"] is None and body["version"] == 3


# -- API keys ----------------------------------------------------------------------------
async def test_api_keys_create_lookup_and_revoke(redis):
    keys = RedisApiKeys(redis)
    k1, k2 = await keys.create("acme"), await keys.create("globex")
    assert await keys.tenant_of(k1) == "acme" and await keys.tenant_of(k2) == "globex"
    assert await keys.tenant_of("pk_nope") is None
    assert sorted(await keys.list()) == sorted([(key_id(k1), "acme"), (key_id(k2), "globex")])
    assert await keys.revoke(key_id(k1))
    assert await keys.revoke(k2)
    assert not await keys.revoke(k2)
    assert await keys.tenant_of(k1) is None and await keys.tenant_of(k2) is None
