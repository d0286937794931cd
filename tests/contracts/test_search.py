"""The `ReadModels` search contract (`find`, `count`): live sessions matching every filter, in the query's order, a
page at a time from a cursor that returns each match exactly once; the index moves with the projection (updates,
deletes, chats), follows a rebuild's switch and a purge, and never shows another tenant's sessions."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from shared.domain.commands import DeleteSession, RequestChat, UpdateSession
from shared.domain.ids import partition_of, uuid7
from shared.domain.search import Position, Query, ms, query_of
from shared.domain.wire import ChatRequest, MessageCreate, SessionPatch
from tests.contracts.conftest import Backend, add, create, project_all, run
from tests.contracts.test_log_admin import rebuild, tombstone


async def walk(backend: Backend, query: Query, limit: int, tenant: str = "acme") -> list[str]:
    """Every session id a cursor walk answers, in order."""
    out: list[str] = []
    after: Position | None = None
    for _ in range(1_000):
        fresh, items, after = await backend.views.find(tenant, query, after, limit)
        assert not fresh.behind()
        assert len(items) <= limit
        out += [json.loads(i)["id"] for i in items]
        if after is None:
            return out
    raise AssertionError("the walk did not end")


async def ids(backend: Backend, query: Query, tenant: str = "acme") -> list[str]:
    _, items, after = await backend.views.find(tenant, query, None, 1000)
    assert after is None
    return [json.loads(i)["id"] for i in items]


async def count(backend: Backend, query: Query, tenant: str = "acme") -> int:
    fresh, n, exact = await backend.views.count(tenant, query)
    assert not fresh.behind() and exact
    return n


async def seed(backend: Backend) -> list[Any]:
    """Twelve sessions: agent a or b, user u0..u2, metadata tier 1 (an int) or "gold"; one of globex's."""
    log = backend.log
    states = []
    for i in range(12):
        tier: Any = 1 if i % 3 == 0 else "gold"
        states.append(
            await create(log, agent_id="a" if i % 2 else "b", user_id=f"u{i % 3}", metadata={"tier": tier, "n": i})
        )
    other = await create(log, tenant="globex", agent_id="a")
    await project_all(backend.views, *[s.id for s in states], other.id)
    return states


async def test_filters_and_orders_answer_every_match_once_across_partitions(backend: Backend) -> None:
    states = await seed(backend)
    newest_first = [s.id for s in reversed(states)]
    assert await ids(backend, Query()) == newest_first
    assert await ids(backend, Query(sort="created_at")) == newest_first[::-1]
    a = [s.id for s in reversed(states) if s.session.agent_id == "a"]
    assert await ids(backend, Query(agent_id="a")) == a
    assert await ids(backend, query_of(agent_id="a", user_id="u0")) == [
        s.id for s in reversed(states) if s.session.agent_id == "a" and s.session.user_id == "u0"
    ]
    ones = [s.id for s in reversed(states) if s.session.metadata["tier"] == 1]
    assert await ids(backend, query_of(metadata={"tier": "1"})) == ones  # the int 1 as text
    assert await ids(backend, query_of(metadata={"tier": "gold", "n": "4"})) == [states[4].id]
    assert await ids(backend, query_of(agent_id="nobody")) == []
    assert await ids(backend, query_of(status="idle")) == newest_first
    assert await ids(backend, query_of(status="busy")) == []
    # a cursor walk, one and five at a time, answers exactly the one-page answer
    for limit in (1, 5):
        assert await walk(backend, Query(), limit) == newest_first
        assert await walk(backend, query_of(agent_id="a", sort="created_at"), limit) == a[::-1]
    # counts equal the lists' lengths
    assert await count(backend, Query()) == 12
    assert await count(backend, query_of(agent_id="a")) == len(a)
    assert await count(backend, query_of(metadata={"tier": "1"})) == len(ones)
    assert await count(backend, query_of(agent_id="a", user_id="u0")) == 2
    # tenants are isolated
    assert len(await ids(backend, query_of(agent_id="a"), tenant="globex")) == 1
    assert await ids(backend, Query(), tenant="initech") == []


async def test_time_ranges_bound_either_order(backend: Backend) -> None:
    states = await seed(backend)
    mid = states[6].session.created_at  # times compare to the millisecond

    def created(s: Any) -> int:
        return ms(s.session.created_at)

    later = [s.id for s in reversed(states) if created(s) >= ms(mid)]
    assert await ids(backend, query_of(created_after=mid)) == later
    assert await ids(backend, query_of(created_before=mid, sort="created_at")) == [
        s.id for s in states if created(s) <= ms(mid)
    ]
    # a range on the other order than the sort
    assert await ids(backend, query_of(updated_after=mid)) == later
    assert await count(backend, query_of(updated_after=mid)) == len(later)
    assert await count(backend, query_of(created_after=mid, agent_id="a")) == sum(
        1 for s in states if created(s) >= ms(mid) and s.session.agent_id == "a"
    )
    assert await ids(backend, query_of(created_after=datetime(2100, 1, 1, tzinfo=UTC))) == []


async def test_an_update_moves_a_session_and_a_delete_or_purge_drops_it(backend: Backend) -> None:
    log, views = backend.log, backend.views
    states = await seed(backend)
    first = states[1]  # agent a, oldest change of agent a
    assert first.id in await ids(backend, query_of(agent_id="a"))
    await asyncio.sleep(0.002)  # times are milliseconds: the update comes after every session's last change
    moved = await run(log, first, UpdateSession(patch=SessionPatch(agent_id="c")))
    await project_all(views, moved.id)
    assert first.id not in await ids(backend, query_of(agent_id="a"))
    assert await ids(backend, query_of(agent_id="c")) == [first.id]
    assert (await ids(backend, Query(sort="-updated_at")))[0] == first.id  # last changed now
    assert (await ids(backend, Query()))[-2] == first.id  # creation order kept
    gone = await run(log, states[0], DeleteSession())
    await project_all(views, gone.id)
    assert gone.id not in await ids(backend, Query())
    assert await count(backend, Query()) == 11
    victim = states[2]
    assert await backend.admin.purge("acme", victim.id, victim.version, tombstone(victim.id, victim.version))
    assert victim.id not in await ids(backend, Query())
    assert await count(backend, query_of(user_id="u2")) == 3


async def test_a_requested_chat_makes_a_session_busy_until_it_ends(backend: Backend) -> None:
    states = await seed(backend)
    s = states[3]
    command = RequestChat(
        job_id=uuid7(), request=ChatRequest(messages=[MessageCreate(role="user", content="hi")]), default_model="m"
    )
    busy = await run(backend.log, s, command)
    await project_all(backend.views, s.id)
    assert await ids(backend, query_of(status="busy")) == [s.id]
    assert s.id not in await ids(backend, query_of(status="idle"))
    assert busy.active_chats


async def test_a_rebuild_reproduces_the_index(backend: Backend) -> None:
    states = await seed(backend)
    states[0] = await add(backend.log, states[0], "x")
    await project_all(backend.views, states[0].id)
    before = {q: await ids(backend, q) for q in (Query(), Query(sort="updated_at"), query_of(agent_id="b"))}
    for s in states:
        assert await rebuild(backend, s.id) == 1
    assert {q: await ids(backend, q) for q in before} == before
    # and a deleted session's rebuilt generation stays out
    gone = await run(backend.log, states[5], DeleteSession())
    await project_all(backend.views, gone.id)
    assert await rebuild(backend, gone.id) == 1
    assert gone.id not in await ids(backend, Query())


async def test_lagging_partitions_are_named(backend: Backend) -> None:
    s = await create(backend.log)
    fresh, _, _ = await backend.views.find("acme", Query(), None, 10)
    assert fresh.behind() == [partition_of(s.id, backend.partitions)]
    fresh, n, _ = await backend.views.count("acme", Query())
    assert fresh.behind() == [partition_of(s.id, backend.partitions)] and n == 0


async def test_a_small_walk_budget_gives_short_pages_but_every_match_once(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend.name == "memory":
        pytest.skip("the memory adapter walks without a budget")
    monkeypatch.setattr("shared.adapters.redis.store.SCAN_BUDGET", 3)
    monkeypatch.setattr("shared.adapters.redis.store.COUNT_BUDGET", 3)
    states = await seed(backend)
    expected = [s.id for s in reversed(states) if s.session.agent_id == "a" and s.session.user_id == "u1"]
    assert await walk(backend, query_of(agent_id="a", user_id="u1"), 2) == expected
    assert await walk(backend, Query(sort="updated_at"), 4) == [s.id for s in states]
    lagging, n, exact = await backend.views.count("acme", query_of(agent_id="a", user_id="u1"))
    assert n == len(expected) if exact else n <= len(expected)  # a walk cut short counts a lower bound
