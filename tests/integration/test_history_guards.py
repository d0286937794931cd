"""Edges of history found in review: two rebuilds of one session, imports the read models could not store,
read models written before `open_tool_calls`, and a session purged and imported again under the same id."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from shared.adapters.codec import decode_state, encode_state, json_encode
from shared.adapters.redis.history import RedisHistory
from shared.adapters.redis.keys import Keys, partition_of
from shared.adapters.redis.store import RedisStore
from shared.app.history import ExportHeader, parse_export
from shared.app.projection import Projection
from shared.app.rebuild import Rebuilder, Scope
from shared.domain.commands import AddMessage, CreateSession, Stamp, decide
from shared.domain.errors import InvalidImport
from shared.domain.ids import uuid7
from shared.domain.projection import project
from shared.domain.state import SessionState, fold
from shared.domain.wire import FunctionCall, MessageCreate, SessionCreate, ToolCall


def stamp() -> Stamp:
    return Stamp(now=datetime.now(UTC), new_id=uuid7)


@pytest.fixture
def store(redis) -> RedisStore:
    return RedisStore(redis, Keys(4))


async def _session(store: RedisStore, messages: int) -> SessionState:
    state = SessionState(id=uuid7())
    events = decide(state, CreateSession(body=SessionCreate(user_id="u")), stamp())
    for i in range(messages):
        events += decide(fold(state, events), AddMessage(body=MessageCreate(role="user", content=f"m{i}")), stamp())
    await store.append("acme", state.id, 0, events)
    return fold(state, events)


async def _counters(store: RedisStore, sid: str) -> tuple[int, int]:
    p = partition_of(sid, store.keys.partitions)
    written = int(await store.redis.hget(store.keys.written(p), "acme") or 0)
    projected = int(await store.redis.hget(store.keys.projected(p), "acme") or 0)
    return written, projected


async def test_a_second_rebuild_of_the_same_generation_neither_writes_the_live_one_nor_switches(store):
    live = Projection(store, feed=None)  # type: ignore[arg-type]
    state = await _session(store, 3)
    await live.catch_up([state.id])
    history = RedisHistory(store.redis, store.keys)
    first, second = Rebuilder(store, history, live), Rebuilder(store, history, live)
    await first.rebuild([("acme", state.id)])  # generation 1 is live now
    assert await history.generations([state.id]) == [1]

    # the second rebuild planned generation 1 too: after an append, its writes into generation 1 are refused
    more = decide(state, AddMessage(body=MessageCreate(role="user", content="late")), stamp())
    await store.append("acme", state.id, state.version, more)
    pending = await store.pending([state.id], gen=1)
    assert pending[0] is not None and pending[0].events
    update = project(pending[0].state, pending[0].events)
    assert await store.apply([("acme", update)], gen=1) == [False]
    assert await history.switch([("acme", state.id, 1)]) == [2]
    await second._build([state.id], {state.id: 1})  # what the second rebuild does with its stale plan

    await live.catch_up([state.id])  # the projector still owns generation 1: it applies and counts the append
    written, projected = await _counters(store, state.id)
    assert written == projected == state.version + 1
    assert (await store.session("acme", state.id)).version == state.version + 1


def test_import_refuses_a_log_the_read_models_could_not_store():
    sid = uuid7()
    state = SessionState(id=sid)
    events = decide(state, CreateSession(body=SessionCreate(metadata={"n": 1})), stamp())
    raw = msgspec.json.decode(msgspec.json.encode(events[0]))
    raw["data"]["metadata"]["n"] = 2**70
    lines = [json_encode(ExportHeader(session_id=sid, events=1)), json_encode(raw)]
    with pytest.raises(InvalidImport, match="session"):
        parse_export(lines)


def test_a_state_written_before_open_tool_calls_keeps_its_calls_answerable():
    call = ToolCall(id="call_1", function=FunctionCall(name="f", arguments="{}"))
    state = fold(
        SessionState(id=uuid7()), decide(SessionState(id=uuid7()), CreateSession(body=SessionCreate()), stamp())
    )
    old = msgspec.to_builtins(msgspec.msgpack.decode(encode_state(state)))
    del old["open_tool_calls"]
    old["tool_call_ids"] = ["call_1", "call_0"]
    restored = decode_state(msgspec.msgpack.encode(old))
    assert restored.open_tool_calls == {"call_1", "call_0"}
    decide(restored, AddMessage(body=MessageCreate(role="tool", content="x", tool_call_id=call.id)), stamp())  # allowed
    # a current state whose metadata merely mentions the old name decodes exactly
    tricky = msgspec.structs.replace(state, open_tool_calls=frozenset({"c9"}))
    tricky.session.metadata["tool_call_ids"] = "just text"  # type: ignore[union-attr]
    assert decode_state(encode_state(tricky)) == tricky


async def test_a_session_purged_and_imported_again_is_not_decided_on_what_a_process_remembered(store):
    state = await _session(store, 5)
    remembered = await store.load("acme", state.id)
    assert remembered is not None and remembered.version == 6
    await store.redis.flushall()  # gone (as after a purge), then a shorter log under the same id
    again = SessionState(id=state.id)
    events = decide(again, CreateSession(body=SessionCreate(user_id="v")), stamp())
    await store.append("acme", state.id, 0, events)
    loaded = await store.load("acme", state.id, remembered)
    assert loaded is not None and loaded.version == 1 and loaded.session is not None and loaded.session.user_id == "v"


async def test_a_rebuild_that_is_not_resuming_its_own_run_starts_partial_generations_over(store):
    """A partial generation left by some earlier killed run (maybe of older projection code) is not trusted."""
    live = Projection(store, feed=None)  # type: ignore[arg-type]
    state = await _session(store, 3)
    await live.catch_up([state.id])
    k = store.keys
    first = fold(SessionState(id=state.id), (await store.read(state.id))[:1])
    await store.redis.hset(k.view(state.id, 1), mapping={"v": 1, "t": "acme", "st": encode_state(first)})
    await store.redis.rpush(k.messages(state.id, 1), 999)  # what an older, wrong projection left behind
    await Rebuilder(store, RedisHistory(store.redis, k), live).run(Scope(session_id=state.id))
    assert await RedisHistory(store.redis, k).generations([state.id]) == [1]
    assert [int(v.split(b"|")[0]) for v in await store.redis.lrange(k.messages(state.id, 1), 0, -1)] == [2, 3, 4]
    assert not await store.redis.exists(k.rebuild(Scope(session_id=state.id).name))
