"""The session use cases (`Sessions`) on the memory adapters: writes decided and appended, reads that see their own
writes, idempotent retries, messages edited and removed, time travel, the log and its live follow, stream tokens."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import pytest

from shared import bootstrap
from shared.adapters.memory.store import Memory
from shared.app.service import Idempotency
from shared.bootstrap import Parley, in_memory
from shared.config import Settings
from shared.domain.errors import IdempotencyKeyReused, NotFound, VersionConflict, VersionNotFound
from shared.domain.stream_tokens import verify
from shared.domain.wire import MessageCreate, MessagePatch, SessionCreate, SessionPatch
from tests.app.conftest import ids, settings


def content(items: list[bytes]) -> list[str]:
    return [msgspec.json.decode(i)["content"] for i in items]


async def test_a_session_is_created_read_changed_and_listed(parley: Parley) -> None:
    s = parley.sessions
    created, version = await s.create("acme", SessionCreate(agent_id="a", situation="be brief"))
    assert version == 1
    body, v = await s.get("acme", created.id)  # read-your-writes: no projector runs, the read catches up
    assert v == 1 and msgspec.json.decode(body)["situation"] == "be brief"
    changed, v = await s.update("acme", created.id, SessionPatch(agent_id="b"), expected=1)
    assert changed.agent_id == "b" and v == 2
    with pytest.raises(VersionConflict):
        await s.update("acme", created.id, SessionPatch(agent_id="c"), expected=1)
    assert msgspec.json.decode((await s.get("acme", created.id))[0])["agent_id"] == "b"
    assert msgspec.json.decode((await s.get("acme", created.id, version=1))[0])["agent_id"] == "a"
    newer, _ = await s.create("acme", SessionCreate())
    assert ids(await s.list("acme", 10, 0)) == [newer.id, created.id]
    assert await s.list("globex", 10, 0) == []
    with pytest.raises(NotFound):
        await s.get("globex", created.id)


async def test_an_idempotent_create_is_answered_once(parley: Parley) -> None:
    s = parley.sessions
    idem = Idempotency.of("key-1", "POST", "/sessions", b"{}")
    first = await s.create("acme", SessionCreate(), idem)
    again = await s.create("acme", SessionCreate(), idem)
    assert again == first
    assert len(await s.list("acme", 10, 0)) == 1
    with pytest.raises(IdempotencyKeyReused):
        await s.create(
            "acme", SessionCreate(agent_id="x"), Idempotency.of("key-1", "POST", "/sessions", b'{"agent_id":"x"}')
        )


async def test_messages_are_added_edited_removed_and_read_as_they_were(parley: Parley) -> None:
    s = parley.sessions
    session, _ = await s.create("acme", SessionCreate())
    added = [await s.add_message("acme", session.id, MessageCreate(role="user", content=f"m{i}")) for i in range(3)]
    assert [m.seq for m in added] == [1, 2, 3]
    assert content(await s.messages("acme", session.id, 10, 0)) == ["m0", "m1", "m2"]
    await s.edit_message("acme", session.id, added[1].id, MessagePatch(content="m1!"))
    await s.remove_message("acme", session.id, added[0].id)
    assert content(await s.messages("acme", session.id, 10, 0)) == ["m1!", "m2"]
    assert (await s.message("acme", session.id, added[1].id)).content == "m1!"
    with pytest.raises(NotFound):
        await s.message("acme", session.id, added[0].id)
    assert content(await s.messages("acme", session.id, 10, 0, version=4)) == ["m0", "m1", "m2"]
    assert content(await s.messages("acme", session.id, 10, 0, version=3)) == ["m0", "m1"]
    with pytest.raises(VersionNotFound):
        await s.messages("acme", session.id, 10, 0, version=99)


async def test_an_edit_that_changes_nothing_writes_nothing(parley: Parley) -> None:
    s = parley.sessions
    session, _ = await s.create("acme", SessionCreate())
    m = await s.add_message("acme", session.id, MessageCreate(role="user", content="same", name="ann"))
    for patch in (
        MessagePatch(),
        MessagePatch(content="same"),
        MessagePatch(name="ann"),
        MessagePatch(content="same", name="ann"),
    ):
        assert await s.edit_message("acme", session.id, m.id, patch) == m
    assert (await parley.log.load("acme", session.id)).version == 2  # type: ignore[union-attr]
    edited = await s.edit_message("acme", session.id, m.id, MessagePatch(name=None))
    assert edited.name is None and edited.edited_at is not None
    assert (await parley.log.load("acme", session.id)).version == 3  # type: ignore[union-attr]


async def test_a_deleted_session_is_gone_from_reads_but_its_log_stays(parley: Parley) -> None:
    s = parley.sessions
    session, _ = await s.create("acme", SessionCreate())
    await s.add_message("acme", session.id, MessageCreate(role="user", content="hi"))
    deletion = await s.delete("acme", session.id, expected=2)
    assert deletion.id == session.id and not deletion.purged
    with pytest.raises(NotFound):
        await s.get("acme", session.id)
    assert await s.list("acme", 10, 0) == []
    page = await s.events("acme", session.id, 0, 10)
    assert [msgspec.json.decode(i)["type"] for i in page.items] == ["SessionCreated", "MessageAdded", "SessionDeleted"]
    assert page.next is None
    assert await s.seen_to_the_end("acme", session.id, 3)
    assert not await s.seen_to_the_end("acme", session.id, 2)


async def test_the_log_pages_and_follows_new_events(parley: Parley) -> None:
    s = parley.sessions
    session, _ = await s.create("acme", SessionCreate())
    for i in range(4):
        await s.add_message("acme", session.id, MessageCreate(role="user", content=f"m{i}"))
    page = await s.events("acme", session.id, 0, 2)
    assert page.next == 2 and len(page.items) == 2
    assert (await s.events("acme", session.id, 4, 2)).next is None
    with pytest.raises(NotFound):
        await s.events("globex", session.id, 0, 2)
    async with contextlib.aclosing(s.follow_events("acme", session.id, 5, keepalive_s=30)) as stream:
        nxt = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.01)
        await s.add_message("acme", session.id, MessageCreate(role="user", content="live"))
        batch = await asyncio.wait_for(nxt, 10)  # woken by the append, not by a re-check
    assert [msgspec.json.decode(i)["data"]["content"] for i in batch] == ["live"]


async def test_a_purge_ends_a_followed_log(parley: Parley) -> None:
    s = parley.sessions
    session, _ = await s.create("acme", SessionCreate())
    async with contextlib.aclosing(s.follow_events("acme", session.id, 1, keepalive_s=30)) as stream:
        rest = asyncio.ensure_future(_drain(stream))
        await asyncio.sleep(0.01)
        await s.delete("acme", session.id, expected=None, purge=True)
        batches = await asyncio.wait_for(rest, 10)  # the stream ends
    # the delete before the purge may or may not be seen before the log is gone; nothing else is
    assert {msgspec.json.decode(i)["type"] for b in batches for i in b} <= {"SessionDeleted"}


async def _drain(stream: object) -> list[list[bytes]]:
    out: list[list[bytes]] = []
    async for batch in stream:  # type: ignore[attr-defined]
        out.append(list(batch))
    return out


async def test_a_stream_token_grants_one_session_to_its_tenant(parley: Parley) -> None:
    s = parley.sessions
    session, _ = await s.create("acme", SessionCreate())
    token = await s.stream_token("acme", session.id, 60)
    grant = verify(parley.stream_secret, token.token, 0)
    assert grant is not None and (grant.tenant, grant.session_id) == ("acme", session.id)
    with pytest.raises(NotFound):
        await s.stream_token("globex", session.id, 60)


async def test_a_write_on_a_stale_state_decides_again_on_what_the_conflict_answered() -> None:
    """Two processes write to one session: the one whose cached state is behind is refused with the events it
    missed, folds them and appends again, without another round trip to load the session."""
    memory = Memory(settings().partitions)
    first, second = await in_memory(settings(), memory), await in_memory(settings(), memory)
    session, _ = await first.sessions.create("acme", SessionCreate())
    await first.sessions.add_message("acme", session.id, MessageCreate(role="user", content="a"))
    for text in ("b", "c"):
        await second.sessions.add_message("acme", session.id, MessageCreate(role="user", content=text))
    loads = 0
    load = first.service.log.load

    async def counted(*args: object, **kwargs: object) -> object:
        nonlocal loads
        loads += 1
        return await load(*args, **kwargs)  # type: ignore[arg-type]

    first.service.log.load = counted  # type: ignore[method-assign]
    added = await first.sessions.add_message("acme", session.id, MessageCreate(role="user", content="d"))
    assert (added.seq, loads) == (4, 0)
    assert content(await first.sessions.messages("acme", session.id, 10, 0)) == ["a", "b", "c", "d"]


async def test_a_writer_that_keeps_losing_races_to_another_process_gets_through() -> None:
    """Another process's writer wins this one's first ten appends to the session (a process starved of CPU while
    the other writes the session every few milliseconds): each loss folds what it missed, and the write lands."""
    memory = Memory(settings().partitions)
    mine, theirs = await in_memory(settings(), memory), await in_memory(settings(), memory)
    session, _ = await mine.sessions.create("acme", SessionCreate())
    append, lost = mine.service.log.append, 0

    async def racing(*args: object, **kwargs: object) -> object:
        nonlocal lost
        if lost < 10:  # the other writer appends first
            lost += 1
            await theirs.sessions.add_message("acme", session.id, MessageCreate(role="user", content=f"theirs {lost}"))
        return await append(*args, **kwargs)  # type: ignore[arg-type]

    mine.service.log.append = racing  # type: ignore[method-assign]
    added = await mine.sessions.add_message("acme", session.id, MessageCreate(role="user", content="mine"))
    assert (lost, added.seq) == (10, 11)
    assert content(await mine.sessions.messages("acme", session.id, 20, 0))[-1] == "mine"


async def test_two_edits_of_one_message_made_at_once_both_stick(real_redis) -> None:
    """Each edit applies its fields to the message as written, not as it read it: one read before the other edit
    landed is read again (`MessageChanged`), so a rename beside a rewrite keeps both."""
    settings = Settings.from_env({}, partitions=4, read_assist_s=0.0, read_timeout_s=5.0)
    parley = await bootstrap.start(settings, redis=real_redis)
    try:
        s = parley.sessions
        session, _ = await s.create("acme", SessionCreate())
        for i in range(5):
            m = await s.add_message("acme", session.id, MessageCreate(role="user", content=f"old {i}"))
            await asyncio.gather(
                s.edit_message("acme", session.id, m.id, MessagePatch(content=f"new {i}")),
                s.edit_message("acme", session.id, m.id, MessagePatch(name="alice")),
            )
            now = await s.message("acme", session.id, m.id)
            assert (now.content, now.name) == (f"new {i}", "alice")
    finally:
        await parley.close()


async def test_a_message_is_found_by_its_id_in_any_page_newest_first(parley: Parley) -> None:
    """Pages of 1,000 from the newest back: the first message, one on a page boundary and the newest are found
    alike, after removals that shift the positions of the messages shown; a removed one is 404."""
    s = parley.sessions
    session, _ = await s.create("acme", SessionCreate())
    added = [await s.add_message("acme", session.id, MessageCreate(role="user", content=f"m{i}")) for i in range(2_500)]
    for i in (3, 1_499, 2_000):
        await s.remove_message("acme", session.id, added[i].id)
    for i in (0, 2, 4, 500, 1_498, 1_500, 1_501, 2_001, 2_499):
        assert (await s.message("acme", session.id, added[i].id)).content == f"m{i}"
    for i in (3, 1_499, 2_000):
        with pytest.raises(NotFound):
            await s.message("acme", session.id, added[i].id)
    with pytest.raises(NotFound):
        await s.message("globex", session.id, added[0].id)  # never across tenants


async def test_a_write_that_changes_nothing_still_refuses_a_key_used_for_another_request(parley: Parley) -> None:
    """It stores nothing, its key included; but a key that already records another request is a 422, as on any
    write, and a retry of the request it records answers what that request answered."""
    s = parley.sessions
    sid = (await s.create("acme", SessionCreate()))[0].id
    m = await s.add_message("acme", sid, MessageCreate(role="user", content="before"))
    path = f"/sessions/{sid}/messages/{m.id}"
    first = Idempotency.of("k-1", "PATCH", path, b'{"content":"after"}')
    edited = await s.edit_message("acme", sid, m.id, MessagePatch(content="after"), first)
    assert await s.edit_message("acme", sid, m.id, MessagePatch(content="after"), first) == edited  # a retry
    other = Idempotency.of("k-1", "PATCH", path, b'{"name":null}')  # changes nothing now: the name is null
    with pytest.raises(IdempotencyKeyReused):
        await s.edit_message("acme", sid, m.id, MessagePatch(name=None), other)
