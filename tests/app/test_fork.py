"""Forks on the memory adapters: a fork's history is its parent's up to a version, made its own (its log starts with
`SessionForked`); the two then go their own ways; chats running and schedules at that version stay with the parent;
a fork adds nothing to the tenant's usage, reads its parent's history (which is not purged while it does: a user's
purge takes forks first), exports and imports, and its read models rebuild to what they were."""

from __future__ import annotations

import msgspec
import pytest

from shared import bootstrap
from shared.adapters.memory import MemoryEventLog
from shared.app import history
from shared.app.rebuild import Scope
from shared.bootstrap import Parley
from shared.domain.errors import DeletedAtVersion, HasForks, InvalidImport, NotFound, VersionNotFound
from shared.domain.events import (
    ChatCancelled,
    ChatCompleted,
    MessageAdded,
    ScheduleDeleted,
    SessionCreated,
    SessionForked,
)
from shared.domain.fork import MAX_CHAIN
from shared.domain.fork import inherited as inherited_events
from shared.domain.wire import ChatRequest, ForkRequest, MessageCreate, MessagePatch, ScheduleCreate, SessionCreate
from tests.app.conftest import Deployment, settings


def ask(text: str) -> ChatRequest:
    return ChatRequest(messages=[MessageCreate(role="user", content=text)])


async def conversation(parley: Parley, sid: str) -> list[tuple[str, str]]:
    return [
        (m["id"], m["content"]) for m in map(msgspec.json.decode, await parley.sessions.messages("acme", sid, 100, 0))
    ]


async def test_a_fork_starts_with_its_parents_history_then_goes_its_own_way(parley: Parley) -> None:
    d = Deployment(parley)
    parent, _ = await parley.sessions.create("acme", SessionCreate(situation="Be kind.", metadata={"plan": "pro"}))
    await parley.chats.request("acme", parent.id, ask("hello"))
    await d.settle()
    before = await conversation(parley, parent.id)
    head = (await parley.sessions.get("acme", parent.id))[1]

    fork, version = await parley.sessions.fork("acme", parent.id, ForkRequest(metadata={"branch": "b"}))
    assert fork.id != parent.id and version == head + 2  # SessionForked, the copies, the metadata
    assert fork.forked_from is not None and (fork.forked_from.session_id, fork.forked_from.version) == (parent.id, head)
    assert (fork.situation, fork.metadata) == ("Be kind.", {"branch": "b"})
    await d.settle()
    assert await conversation(parley, fork.id) == before  # the same messages, the same ids
    log = await parley.log.read(fork.id, 0, 100)
    assert isinstance(log[0], SessionForked) and isinstance(log[1], SessionCreated)
    assert all(m.data.session_id == fork.id for m in log if isinstance(m, MessageAdded))
    # nothing inherited names the parent or its jobs: a ChatCompleted's response names the fork and its job
    assert not any(parent.id in msgspec.json.encode(e.data).decode() for e in log[1:])
    parent_jobs = {e.data.job_id for e in await parley.log.read(parent.id, 0, 100) if isinstance(e, ChatCompleted)}
    assert parent_jobs and not any(j in msgspec.json.encode(e.data).decode() for e in log for j in parent_jobs)
    jobs = [msgspec.json.decode(j)["id"] for j in await parley.chats.list("acme", fork.id, 10, 0)]
    parents = [msgspec.json.decode(j)["id"] for j in await parley.chats.list("acme", parent.id, 10, 0)]
    assert len(jobs) == 1 and jobs != parents  # the fork's own job record, not the parent's

    # each goes its own way
    first_id = before[0][0]
    await parley.sessions.edit_message("acme", fork.id, first_id, MessagePatch(content="hello, fork"))
    await parley.sessions.add_message("acme", parent.id, MessageCreate(role="user", content="parent only"))
    await d.settle()
    assert (await conversation(parley, parent.id))[0] == before[0]
    assert (await conversation(parley, fork.id))[0] == (first_id, "hello, fork")
    assert [s["id"] for s in map(msgspec.json.decode, await parley.sessions.forks("acme", parent.id))] == [fork.id]
    assert await parley.sessions.forks("acme", fork.id) == []


async def test_a_fork_of_a_past_version_and_what_is_not_carried_over(parley: Parley) -> None:
    d = Deployment(parley)
    parent, _ = await parley.sessions.create("acme", SessionCreate())
    for i in range(3):
        await parley.sessions.add_message("acme", parent.id, MessageCreate(role="user", content=f"m{i}"))
    await parley.schedules.create("acme", parent.id, ScheduleCreate(cron="0 9 * * *"))
    running = await parley.chats.request("acme", parent.id, ask("still running"))

    past, _ = await parley.sessions.fork("acme", parent.id, ForkRequest(version=3))
    await d.project()
    assert [c for _, c in await conversation(parley, past.id)] == ["m0", "m1"]

    now, _ = await parley.sessions.fork("acme", parent.id, ForkRequest())
    log = await parley.log.read(now.id, 0, 100)
    [cancelled] = [e for e in log if isinstance(e, ChatCancelled)]
    assert cancelled.data.job_id != running.job.id and cancelled.data.reason == "not carried into the fork"
    assert [e for e in log if isinstance(e, ScheduleDeleted)] and (await parley.schedules.list("acme", now.id))[
        0
    ].items == []
    await d.settle()
    assert msgspec.json.decode(await parley.chats.job("acme", parent.id, running.job.id))["status"] == "succeeded"
    assert len((await parley.schedules.list("acme", parent.id))[0].items) == 1
    after = await parley.tenancy.usage("acme", 1)
    assert after.days[0].chats == 1  # the parent's chat; the fork's copy of it counts nothing

    with pytest.raises(VersionNotFound):
        await parley.sessions.fork("acme", parent.id, ForkRequest(version=999))
    with pytest.raises(NotFound):
        await parley.sessions.fork("globex", parent.id, ForkRequest())
    await parley.sessions.delete("acme", parent.id, None)
    with pytest.raises(DeletedAtVersion):  # deleted at its latest version: an earlier one can still be forked
        await parley.sessions.fork("acme", parent.id, ForkRequest())
    assert (await parley.sessions.fork("acme", parent.id, ForkRequest(version=2)))[0].forked_from is not None


async def test_a_fork_reads_its_parents_history_which_is_not_purged_while_it_does(parley: Parley) -> None:
    d = Deployment(parley)
    parent, _ = await parley.sessions.create("acme", SessionCreate())
    await parley.sessions.add_message("acme", parent.id, MessageCreate(role="user", content="kept"))
    fork, _ = await parley.sessions.fork("acme", parent.id, ForkRequest())
    await d.settle()
    with pytest.raises(HasForks) as refused:
        await parley.sessions.delete("acme", parent.id, None, purge=True)
    assert refused.value.details == {"forks": [fork.id]}
    assert (await parley.sessions.get("acme", parent.id))[0]  # nothing changed: not even deleted
    await parley.sessions.delete("acme", parent.id, None)  # a delete keeps the log the fork reads
    assert [c for _, c in await conversation(parley, fork.id)] == ["kept"]
    assert (await parley.sessions.get("acme", fork.id, version=2))[0]  # time travel into the inherited history

    lines = [line async for line in parley.history.export(fork.id)]
    elsewhere = await bootstrap.in_memory(settings())
    try:
        assert await elsewhere.history.import_("globex", lines) == [(fork.id, 3)]
        assert await elsewhere.sessions.messages("globex", fork.id, 10, 0) == await parley.sessions.messages(
            "acme", fork.id, 10, 0
        )
    finally:
        await elsewhere.close()

    live = (await parley.sessions.get("acme", fork.id), await parley.sessions.messages("acme", fork.id, 10, 0))
    await parley.rebuilder(lambda n: None).run(Scope(session_id=fork.id))
    assert (await parley.sessions.get("acme", fork.id), await parley.sessions.messages("acme", fork.id, 10, 0)) == live

    await parley.sessions.delete("acme", fork.id, None, purge=True)  # the fork first, then its parent
    await parley.sessions.delete("acme", parent.id, None, purge=True)
    with pytest.raises(NotFound):
        await parley.sessions.get("acme", parent.id)


async def test_a_fork_made_while_a_purge_begins_refuses_the_purge_which_changes_nothing(
    parley: Parley, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork made right after the purge's first check: the purge's delete is refused (409 `has_forks`), so the
    parent is not left deleted; once that delete is in, a fork of the parent is refused (404) until it is gone."""
    parent, _ = await parley.sessions.create("acme", SessionCreate())
    await parley.sessions.add_message("acme", parent.id, MessageCreate(role="user", content="kept"))
    checked = history._no_readers
    made: list[str] = []

    async def then_a_fork(admin: object, session_id: str) -> None:
        await checked(admin, session_id)  # type: ignore[arg-type]
        if not made:
            made.append((await parley.sessions.fork("acme", parent.id, ForkRequest()))[0].id)

    monkeypatch.setattr(history, "_no_readers", then_a_fork)
    with pytest.raises(HasForks) as refused:
        await parley.sessions.delete("acme", parent.id, None, purge=True)
    assert refused.value.details == {"forks": made}
    session, version = await parley.sessions.get("acme", parent.id)
    assert version == 2 and b'"version":2' in session  # not deleted: nothing changed
    monkeypatch.setattr(history, "_no_readers", checked)

    class ForkFirst:  # the purge's delete is in: a fork tried before its erase is refused
        async def __call__(self, state: object) -> None:
            with pytest.raises(NotFound):  # of a version before the delete, which a fork may otherwise take
                await parley.sessions.fork("acme", parent.id, ForkRequest(version=2))

    await parley.sessions.delete("acme", made[0], None, purge=True)
    monkeypatch.setattr(parley.history, "end_chats", ForkFirst())
    await parley.sessions.delete("acme", parent.id, None, purge=True)
    with pytest.raises(NotFound):
        await parley.sessions.get("acme", parent.id)


async def test_a_fork_of_a_fork_and_a_users_purge_takes_forks_first_in_passes(parley: Parley) -> None:
    d = Deployment(parley)
    root, _ = await parley.sessions.create("acme", SessionCreate(user_id="u1"))
    await parley.sessions.add_message("acme", root.id, MessageCreate(role="user", content="root"))
    middle, _ = await parley.sessions.fork("acme", root.id, ForkRequest())
    await parley.sessions.add_message("acme", middle.id, MessageCreate(role="user", content="middle"))
    leaf, _ = await parley.sessions.fork("acme", middle.id, ForkRequest())
    await d.settle()
    assert [c for _, c in await conversation(parley, leaf.id)] == ["root", "middle"]
    assert leaf.forked_from is not None and leaf.forked_from.session_id == middle.id
    mine = await parley.history.sessions_of_user("acme", "u1")
    assert mine == [root.id, middle.id, leaf.id]  # parents first: each waits for its forks
    assert await parley.history.purge_all("acme", mine[:2]) == [root.id, middle.id]  # the leaf reads both
    assert (await parley.sessions.get("acme", root.id))[0]  # nothing of them changed
    purged: list[str] = []
    assert await parley.history.purge_all("acme", mine, purged.append) == []
    assert purged == [leaf.id, middle.id, root.id]
    assert await parley.history.sessions_of_user("acme", "u1") == []


async def test_a_chain_of_forks_this_deep_stores_its_inherited_events_and_a_lone_fork_event_is_no_import(
    parley: Parley,
) -> None:
    assert isinstance(parley.log, MemoryEventLog)
    memory = parley.log.memory
    sid = (await parley.sessions.create("acme", SessionCreate()))[0].id
    await parley.sessions.add_message("acme", sid, MessageCreate(role="user", content="root"))
    chain = [sid]
    for _ in range(MAX_CHAIN + 3):
        chain.append((await parley.sessions.fork("acme", chain[-1], ForkRequest()))[0].id)
    inherited = [sum(1 for f in memory.logs[s] if f is None) for s in chain[1:]]
    assert all(inherited[:MAX_CHAIN]) and inherited[MAX_CHAIN] == 0  # the ninth stores its history
    assert all(inherited[MAX_CHAIN + 1 :])  # and the chain starts again from it: its forks read it
    assert [await parley.log.fork_depth(s, 100) for s in chain] == [*range(MAX_CHAIN + 1), 0, 1, 2]
    await Deployment(parley).settle()
    for s in chain[MAX_CHAIN:]:
        assert [c for _, c in await conversation(parley, s)] == ["root"]
    copied = chain[MAX_CHAIN + 1]
    assert await parley.log.read(copied, 0, 100) == [
        *(await parley.log.read(copied, 0, 100))[:1],
        *inherited_events(chain[MAX_CHAIN], copied, await parley.log.read(chain[MAX_CHAIN], 0, 100)),
    ]

    lines = [line async for line in parley.history.export(chain[1])]
    header = msgspec.json.decode(lines[0])
    header["events"] = 1
    with pytest.raises(InvalidImport):  # a fork's SessionForked alone: it would name a history it does not hold
        await parley.history.import_("globex", [msgspec.json.encode(header), lines[1]])
