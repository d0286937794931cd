"""An old log still replays: a checked-in schema-1 session (tests/fixtures/schema1_session.ndjson) is read,
folded, projected, time-travelled and re-exported in today's shape, on fakeredis and on redis-server."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from shared.adapters.codec import json_encode
from shared.adapters.redis.history import RedisHistory
from shared.adapters.redis.keys import Keys
from shared.adapters.redis.store import RedisStore
from shared.app.history import export_lines, import_sessions, parse_export
from shared.app.projection import Projection
from shared.app.service import SessionService
from shared.domain.events import SCHEMA_VERSION, ChatFailed, ChatRequested
from shared.domain.state import SessionState, fold

FIXTURE = Path(__file__).parent.parent / "fixtures" / "schema1_session.ndjson"
SID = "01954c00-0000-7000-8000-000000000001"
FIRST_JOB = "01954c00-0000-7000-8000-0000000000a1"
SECOND_JOB = "01954c00-0000-7000-8000-0000000000a2"


def lines() -> list[bytes]:
    return FIXTURE.read_bytes().splitlines()


def test_the_fixture_is_written_under_an_older_schema():
    header = msgspec.json.decode(lines()[0])
    assert header["schema"] == 1 < SCHEMA_VERSION
    failed = [msgspec.json.decode(x) for x in lines()[1:] if b'"ChatFailed"' in x][0]
    assert set(failed["data"]) == {"job_id", "code", "message"}  # the schema-1 shape


def test_an_old_export_parses_into_todays_events_and_folds_into_todays_state():
    [(sid, events)] = parse_export(lines())
    failed = next(e for e in events if isinstance(e, ChatFailed))
    assert (failed.data.error.code, failed.data.error.message) == ("model_unavailable", "the model server answered 503")
    assert all(not hasattr(e.data, "up_to_seq") for e in events if isinstance(e, ChatRequested))
    state = fold(SessionState(id=sid), events)
    assert state.version == 8 and state.message_count == 3
    assert [c.job_id for c in state.active_chats] == [SECOND_JOB]
    assert state.session is not None and state.session.metadata == {"plan": "pro"} and state.session.user_id == "user-7"


async def _write_raw_schema1_log(store: RedisStore, tenant: str) -> None:
    """The log as schema-1 code wrote it: each entry marked `s: 1`, payloads in the old shape."""
    k = store.keys
    for line in lines()[1:]:
        raw = msgspec.json.decode(line)
        fields = {"t": raw["type"], "i": raw["id"], "a": raw["occurred_at"], "s": 1, "d": json_encode(raw["data"])}
        await store.redis.xadd(k.log(SID), fields, id=f"{raw['version']}-0")
    await store.redis.hset(k.head(SID), mapping={"v": 8, "t": tenant})


@pytest.fixture
def store(redis) -> RedisStore:
    return RedisStore(redis, Keys(4))


async def test_a_schema1_log_in_redis_replays_projects_and_time_travels(store):
    await _write_raw_schema1_log(store, "acme")
    [(_, expected_events)] = parse_export(lines())
    expected = fold(SessionState(id=SID), expected_events)

    assert await store.load("acme", SID) == expected
    page = await store.events("acme", SID, 0, 100)
    failed = [msgspec.json.decode(i) for i in page.items if b'"ChatFailed"' in i][0]
    assert failed["data"] == {
        "job_id": FIRST_JOB,
        "error": {"code": "model_unavailable", "message": "the model server answered 503"},
    }

    await Projection(store, feed=None).catch_up([SID])  # type: ignore[arg-type]
    view = await store.session("acme", SID)
    assert view.version == 8 and view.body == json_encode(expected.session)
    messages = await store.messages("acme", SID, 10, 0)
    assert [msgspec.json.decode(m)["content"] for m in messages.items or []] == [
        "Where is invoice 42?",
        "Please look it up.",
        "Try again, please.",
    ]
    _, at5 = await store.at_version("acme", SID, 5)
    assert at5 is not None and at5.version == 5 and at5.active_chats == ()


async def test_an_old_export_imports_and_exports_in_todays_schema_stably(store):
    service = SessionService(store, store, store.keys.partitions)
    history = RedisHistory(store.redis, store.keys)
    assert await import_sessions(service, history, "acme", lines()) == [(SID, 8)]
    first = [line async for line in export_lines(history, SID)]
    assert msgspec.json.decode(first[0])["schema"] == SCHEMA_VERSION
    assert b'"code":"model_unavailable"' in b"".join(first) and b'"up_to_seq"' not in b"".join(first)

    await store.redis.flushall()
    await import_sessions(service, history, "globex", [line.rstrip(b"\n") for line in first])
    again = [line async for line in export_lines(history, SID)]
    assert again == first
