"""Copy-on-write forks in the log (`shared.domain.fork`, `shared.adapters.forks`): a fork's log stores its
`SessionForked` and its own events, and every read (pages, `/events`, load, time travel, export, rebuild, the
projector's, message pages) shows its parent's history up to the fork's version as the fork's own, through any
depth of forks of forks; a session that forks read is not purged until they are."""

from __future__ import annotations

import json

import msgspec
import pytest

from shared.adapters.codec import event_json, log_fields
from shared.adapters.memory import MemoryEventLog
from shared.app.ports import Appended, Forked, Missing, PurgeConflict
from shared.domain.commands import DeleteSession, EditMessage, ForkSession, decide
from shared.domain.events import Event, SessionForked, SessionPurged, SessionPurgedData
from shared.domain.fork import inherited
from shared.domain.ids import partition_of, uuid7
from shared.domain.state import SessionState, fold
from shared.domain.wire import Message
from tests.contracts.conftest import PARTITIONS, Backend, add, create, project_all, run, stamp


async def fork(backend: Backend, parent: SessionState, version: int | None = None) -> tuple[str, list[Event]]:
    """(the fork's id, every event its log should show), appended as the service does: only what it stores."""
    history = await backend.log.read(parent.id, 0, version or parent.version)
    child = uuid7()
    while partition_of(child, PARTITIONS) != partition_of(parent.id, PARTITIONS):  # as the service chooses it
        child = uuid7()
    at = fold(SessionState(id=parent.id), history)
    events = decide(SessionState(id=child), ForkSession(parent=at), stamp())
    head = at.version + len(events)  # its SessionForked, the inherited versions, its own
    assert await backend.log.append("acme", child, 0, events, None, (parent.id, at.version + 1)) == Appended(head)
    return child, [events[0], *inherited(parent.id, child, history), *events[1:]]


async def stored_entries(backend: Backend, session_id: str) -> int:
    """How many events the session's log really stores."""
    if isinstance(backend.log, MemoryEventLog):
        return sum(1 for f in backend.log.memory.logs[session_id] if f is not None)
    store = backend.log
    return int(await store.redis.xlen(store.keys.log(session_id)))  # type: ignore[attr-defined]


async def messages(backend: Backend, session_id: str, **at: int) -> list[dict[str, object]]:
    page = await backend.views.messages("acme", session_id, 100, 0, **at)
    return [json.loads(m) for m in page.items or []]


async def test_a_fork_stores_its_own_events_and_reads_its_parents(backend: Backend) -> None:
    log, admin = backend.log, backend.admin
    parent = await create(log, situation="s")
    for i in range(6):
        parent = await add(log, parent, f"m{i}")
    await project_all(backend.views, parent.id)
    [first] = (await messages(backend, parent.id))[:1]
    edit = EditMessage(message=msgspec.convert(first, Message), content="m0, edited")
    parent = await run(log, parent, edit)  # an edit in the inherited history: its page reads it from the parent
    child, shown = await fork(backend, parent)
    assert await stored_entries(backend, child) == 1  # its SessionForked: the parent's 8 events are not copied
    parent = await add(log, parent, "after the fork")  # the parent goes on; the fork does not see it

    assert await log.read(child, 0, 100) == shown
    assert await log.read(child, 3, 2) == shown[3:5]
    assert await log.read(child, len(shown), 10) == []
    items = (await log.events("acme", child, 1, 4)).items or []
    assert items == [event_json(e.version, log_fields(e)) for e in shown[1:5]]
    assert await log.load("acme", child) == fold(SessionState(id=child), shown)
    assert (await log.at_version("acme", child, 4))[1] == fold(SessionState(id=child), shown[:4])
    assert [v for v, _ in await admin.log_json(child, 0, 100)] == [e.version for e in shown]
    assert (await admin.read_logs({child: 2}, 3))[child] == shown[2:5]

    await project_all(backend.views, child)
    own = await messages(backend, child)
    assert [m["content"] for m in own] == ["m0, edited", "m1", "m2", "m3", "m4", "m5"]
    assert [m["id"] for m in own] == [m["id"] for m in (await messages(backend, parent.id))[:6]]
    assert {m["session_id"] for m in own} == {child}
    assert [m["content"] for m in await messages(backend, child, count=2, at=3)] == ["m0", "m1"]  # time travel

    more = await add(log, fold(SessionState(id=child), shown), "the fork's own")
    assert more.version == len(shown) + 1 and await stored_entries(backend, child) == 2
    assert (await log.read(child, len(shown), 10))[0].version == more.version


async def generations(backend: Backend, n: int) -> tuple[SessionState, str, str, list[Event]]:
    """(a root of `n` messages, its fork with one message of its own, that one's fork, every event the
    last one's log shows)."""
    root = await create(backend.log)
    for i in range(n):
        root = await add(backend.log, root, f"r{i}")
    middle, shown = await fork(backend, root)
    mid = await add(backend.log, fold(SessionState(id=middle), shown), "middle's")
    leaf, leaf_shown = await fork(backend, mid)
    return root, middle, leaf, leaf_shown


async def test_a_fork_of_a_fork_reads_through_both_and_counts_them(backend: Backend) -> None:
    log = backend.log
    root, middle, leaf, leaf_shown = await generations(backend, 3)
    assert await stored_entries(backend, leaf) == 1
    assert await log.read(leaf, 0, 100) == leaf_shown
    assert isinstance(leaf_shown[1], SessionForked) and leaf_shown[1].data.parent_id == root.id  # middle's origin
    state = await log.load("acme", leaf)
    assert state is not None and state.forked_from is not None and state.forked_from.session_id == middle
    await project_all(backend.views, leaf)
    assert [m["content"] for m in await messages(backend, leaf)] == ["r0", "r1", "r2", "middle's"]
    assert [await log.fork_depth(s, 8) for s in (root.id, middle, leaf)] == [0, 1, 2]  # parents a read walks
    assert await log.fork_depth(leaf, 1) == 1 and await log.fork_depth(uuid7(), 8) == 0


async def test_events_of_a_fork_of_a_fork_read_its_parents_in_the_same_step(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`events` (the `/events` page) of a range reaching back through two parents: what a copy would show, and on
    Redis one script, the parents' ranges read with the fork's (no read of theirs after it)."""
    log = backend.log
    _, _, leaf, leaf_shown = await generations(backend, 4)
    leaf_state = await add(log, fold(SessionState(id=leaf), leaf_shown), "leaf's")
    expected = [*leaf_shown, *(await log.read(leaf, len(leaf_shown), 10))]
    assert len(expected) == leaf_state.version
    if not isinstance(log, MemoryEventLog):
        from shared.adapters.redis import store

        async def no_second_read(*args: object) -> None:
            raise AssertionError("a parent's log was read after the fork's")

        monkeypatch.setattr(store, "log_entries", no_second_read)
        monkeypatch.setattr(store, "fork_origin", no_second_read)
    for after, limit in ((0, 100), (2, 3), (5, 4), (len(expected) - 1, 5)):
        page = (await log.events("acme", leaf, after, limit)).items or []
        assert page == [event_json(e.version, log_fields(e)) for e in expected[after : after + limit]], (after, limit)


def tombstone(sid: str, version: int) -> SessionPurged:
    return SessionPurged(
        id=uuid7(), occurred_at=stamp().now, data=SessionPurgedData(session_id=sid, user_id=None, event_count=version)
    )


async def test_a_session_forks_read_is_not_purged_until_they_are(backend: Backend) -> None:
    log, admin = backend.log, backend.admin
    parent = await add(log, await create(log), "kept")
    child, shown = await fork(backend, parent)
    assert await admin.readers(parent.id) == [child]
    with pytest.raises(PurgeConflict):
        await admin.purge("acme", parent.id, parent.version, tombstone(parent.id, parent.version))
    assert await log.read(parent.id) != [] and await log.read(child, 0, 100) == shown  # nothing erased
    delete = decide(parent, DeleteSession(purge=True), stamp())
    assert await log.append("acme", parent.id, parent.version, delete, purging=True) == Forked(1)
    assert (await log.load("acme", parent.id)) == parent  # the purge's delete refused: nothing written
    assert await admin.purge("acme", child, len(shown), tombstone(child, len(shown)))
    assert await admin.readers(parent.id) == []
    assert await log.append("acme", parent.id, parent.version, delete, purging=True) == Appended(parent.version + 1)
    late = uuid7()
    while partition_of(late, PARTITIONS) != partition_of(parent.id, PARTITIONS):
        late = uuid7()
    events = decide(SessionState(id=late), ForkSession(parent=parent), stamp())  # of a version before the delete
    inherits = (parent.id, parent.version + 1)
    assert await log.append("acme", late, 0, events, None, inherits) == Missing()  # a purge has begun
    assert await admin.readers(parent.id) == []
    deleted = parent.version + 1
    assert await admin.purge("acme", parent.id, deleted, tombstone(parent.id, deleted))


async def test_a_purged_fork_leaves_its_parents_list_of_forks(backend: Backend) -> None:
    """The list (`ReadModels.forks`) is a read model the fork's projection writes; the purge erases the fork's
    entry too, or the list would grow for ever with ids of sessions that are gone."""
    log, admin = backend.log, backend.admin
    parent = await add(log, await create(log), "kept")
    kept, _ = await fork(backend, parent)
    gone, shown = await fork(backend, parent)
    await project_all(backend.views, parent.id, kept, gone)
    assert await backend.views.forks(parent.id) == [kept, gone]
    assert await admin.purge("acme", gone, len(shown), tombstone(gone, len(shown)), parent.id)
    assert await backend.views.forks(parent.id) == [kept]


async def test_a_fork_of_another_tenants_or_a_shorter_parent_is_refused(backend: Backend) -> None:
    log = backend.log
    parent = await add(log, await create(log), "one")
    child, events = await fork(backend, parent)
    for tenant, parent_id in (("globex", parent.id), ("acme", uuid7())):
        other = uuid7()
        while partition_of(other, PARTITIONS) != partition_of(parent_id, PARTITIONS):
            other = uuid7()
        forked = msgspec.structs.replace(events[0], data=msgspec.structs.replace(events[0].data, parent_id=parent_id))
        assert await log.append(tenant, other, 0, [forked], None, (parent_id, 2)) == Missing()
        assert await log.read(other) == [] and await backend.admin.head(other) == (0, None, 0)
    assert await backend.admin.readers(parent.id) == [child]
