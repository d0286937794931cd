"""The history use cases (`History`) on the memory adapters: export a session's log, import it elsewhere (validated
first: a bad file writes nothing), purge sessions (one, or a user's) leaving tombstones in the audit stream."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from shared import bootstrap
from shared.bootstrap import Parley
from shared.domain.errors import ChatUnanswered, Invalid, InvalidImport, NotFound, SessionExists, VersionConflict
from shared.domain.wire import ChatRequest, MessageCreate, SessionCreate
from tests.app.conftest import settings


async def export(parley: Parley, sid: str) -> list[bytes]:
    return [line async for line in parley.history.export(sid)]


async def session_with_messages(parley: Parley, n: int = 3, **fields: object) -> str:
    session, _ = await parley.sessions.create("acme", SessionCreate(**fields))  # type: ignore[arg-type]
    for i in range(n):
        await parley.sessions.add_message("acme", session.id, MessageCreate(role="user", content=f"m{i}"))
    return session.id


async def test_an_export_imports_into_another_deployment_as_it_was(parley: Parley) -> None:
    sid = await session_with_messages(parley)
    lines = await export(parley, sid)
    header = msgspec.json.decode(lines[0])
    assert header["session_id"] == sid and header["events"] == 4 and len(lines) == 5
    assert all(line.endswith(b"\n") for line in lines)
    elsewhere = await bootstrap.in_memory(settings())
    assert await elsewhere.history.import_("globex", lines) == [(sid, 4)]
    assert await elsewhere.log.read(sid) == await parley.log.read(sid)
    assert await elsewhere.sessions.messages("globex", sid, 10, 0) == await parley.sessions.messages("acme", sid, 10, 0)
    assert await export(elsewhere, sid) == lines
    with pytest.raises(SessionExists):  # an id that exists anywhere: nothing is written
        await elsewhere.history.import_("globex", lines)
    with pytest.raises(NotFound):
        await export(parley, "01a23b7b-0000-7000-8000-000000000000")


async def test_a_bad_import_writes_nothing(parley: Parley) -> None:
    sid = await session_with_messages(parley)
    lines = await export(parley, sid)
    elsewhere = await bootstrap.in_memory(settings())
    for bad in (lines[:-1], [lines[0], lines[2], lines[1], *lines[3:]], [b"{}\n"], []):
        with pytest.raises(InvalidImport):
            await elsewhere.history.import_("acme", bad)
    assert await elsewhere.admin.tenants() == []


async def test_a_purge_erases_a_session_and_leaves_a_tombstone(parley: Parley) -> None:
    sid = await session_with_messages(parley, user_id="u1")
    requested = await parley.chats.request(
        "acme", sid, ChatRequest(messages=[MessageCreate(role="user", content="hi")])
    )
    with pytest.raises(VersionConflict):
        await parley.history.purge("acme", sid, expected_version=1)
    waiting = asyncio.ensure_future(parley.chats.wait(sid, requested.job.id, 10))
    await asyncio.sleep(0.01)
    await parley.history.purge("acme", sid)
    with pytest.raises(ChatUnanswered):  # whoever waited on its chat learns it ended
        await asyncio.wait_for(waiting, 10)
    with pytest.raises(NotFound):
        await parley.sessions.get("acme", sid)
    with pytest.raises(NotFound):
        await parley.sessions.events("acme", sid, 0, 10)
    assert await parley.history.head(sid) == (0, None)
    assert await parley.log.read(sid) == []
    [stone], cursor = await parley.history.audit("acme", None, 10)
    assert cursor is None
    assert msgspec.json.decode(stone)["data"] == {
        "session_id": sid,
        "user_id": "u1",
        "event_count": 7,
    }  # created, 3 messages, the chat's message and request, deleted
    with pytest.raises(NotFound):
        await parley.history.purge("acme", sid)
    with pytest.raises(Invalid):
        await parley.history.audit("acme", "garbage", 10)


async def test_a_deleted_session_can_be_purged_and_a_users_sessions_found(parley: Parley) -> None:
    mine = [await session_with_messages(parley, 1, user_id="u1") for _ in range(2)]
    await session_with_messages(parley, 1, user_id="u2")
    await parley.sessions.delete("acme", mine[0], expected=None)
    assert await parley.history.sessions_of_user("acme", "u1") == sorted(mine)
    assert await parley.history.sessions_of_user("globex", "u1") == []
    for sid in mine:
        await parley.history.purge("acme", sid)
    assert await parley.history.sessions_of_user("acme", "u1") == []
    items, _ = await parley.history.audit("acme", None, 10)
    assert len(items) == 2
    assert await parley.history.rewrite_persistence() == []
