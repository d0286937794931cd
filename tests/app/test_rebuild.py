"""`Rebuilder` on the memory adapters: the read models are folded again from the log into a new generation and
switched to atomically; what a reader sees does not change; a killed run resumes after its cursor."""

from __future__ import annotations

from shared.app.rebuild import Scope
from shared.bootstrap import Parley
from shared.domain.wire import MessageCreate, SessionCreate, SessionPatch


async def snapshot(parley: Parley, tenant: str, sids: list[str]) -> list[tuple[bytes, list[bytes]]]:
    return [
        ((await parley.sessions.get(tenant, sid))[0], await parley.sessions.messages(tenant, sid, 100, 0))
        for sid in sids
    ]


async def populate(parley: Parley, tenant: str, sessions: int) -> list[str]:
    out = []
    for n in range(sessions):
        s, _ = await parley.sessions.create(tenant, SessionCreate(agent_id=f"a{n}"))
        for i in range(3):
            await parley.sessions.add_message(tenant, s.id, MessageCreate(role="user", content=f"{n}:{i}"))
        await parley.sessions.update(tenant, s.id, SessionPatch(agent_id="changed"), expected=None)
        out.append(s.id)
    return out


async def test_a_rebuild_switches_every_session_to_a_new_generation_unchanged(parley: Parley) -> None:
    acme, globex = await populate(parley, "acme", 3), await populate(parley, "globex", 2)
    deleted = acme[0]
    await parley.sessions.delete("acme", deleted, expected=None)
    before = await snapshot(parley, "acme", acme[1:]), await snapshot(parley, "globex", globex)
    counted: list[int] = []
    rebuilder = parley.rebuilder(counted.append)
    targets = await rebuilder.targets(Scope())
    assert targets == [("acme", sid) for sid in sorted(acme)] + [("globex", sid) for sid in sorted(globex)]
    report = await rebuilder.run(Scope())
    assert (report.sessions, report.events, report.resumed_after) == (5, 5 * 5 + 1, None)
    assert sum(counted) == report.events
    assert await parley.admin.generations(acme + globex) == [1] * 5
    assert (await snapshot(parley, "acme", acme[1:]), await snapshot(parley, "globex", globex)) == before
    assert sorted(await parley.sessions.list("acme", 10, 0)) == sorted(
        b for b, _ in before[0]
    )  # the deleted one stays out
    assert not await rebuilder.resuming(Scope())


async def test_a_rebuild_of_one_tenant_or_session_touches_only_those(parley: Parley) -> None:
    acme, globex = await populate(parley, "acme", 2), await populate(parley, "globex", 1)
    assert (await parley.rebuilder().run(Scope(tenant="globex"))).sessions == 1
    assert await parley.admin.generations(acme + globex) == [0, 0, 1]
    assert (await parley.rebuilder().run(Scope(session_id=acme[1]))).sessions == 1
    assert await parley.admin.generations(acme + globex) == [0, 1, 1]


async def test_a_killed_rebuild_resumes_after_its_cursor(parley: Parley) -> None:
    sids = sorted(await populate(parley, "acme", 3))
    rebuilder = parley.rebuilder()
    await parley.admin.set_progress("all", "")  # a run that was killed after its first session
    await rebuilder.rebuild([("acme", sids[0])])
    await parley.admin.set_progress("all", f"acme\x00{sids[0]}")
    assert await rebuilder.resuming(Scope())
    report = await rebuilder.run(Scope())
    assert (report.sessions, report.resumed_after) == (2, f"acme\x00{sids[0]}")
    assert await parley.admin.generations(sids) == [1, 1, 1]


async def test_writes_after_a_rebuild_land_in_the_new_generation(parley: Parley) -> None:
    [sid] = await populate(parley, "acme", 1)
    await parley.rebuilder().run(Scope())
    await parley.sessions.add_message("acme", sid, MessageCreate(role="user", content="after"))
    assert [m.split(b'"content":"')[1].split(b'"')[0] for m in await parley.sessions.messages("acme", sid, 10, 0)] == [
        b"0:0",
        b"0:1",
        b"0:2",
        b"after",
    ]
