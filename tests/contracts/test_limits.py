"""The `Limits` contract: a tenant's request rate (GCRA: a burst, then the sustained rate), its slots (concurrent
chats, open streams) held until given back or expired, its own limits over the deployment's defaults, and its usage
per day (requests admitted; chats and tokens from the projected chat events)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from shared.domain.commands import CompleteChat, RecordContext, RequestChat
from shared.domain.ids import uuid7
from shared.domain.wire import (
    AssistantMessage,
    ChatChoice,
    ChatRequest,
    ChatResponse,
    ContextReport,
    MessageCreate,
    TenantLimits,
    Usage,
)
from tests.contracts.conftest import Backend, create, project_all, run

DEFAULTS = TenantLimits(rps=1.0, burst=3, concurrent_chats=2, chat_tokens_per_day=0, streams=0)


async def test_a_burst_is_admitted_then_the_rate_holds(backend: Backend) -> None:
    limits = backend.limits(DEFAULTS)
    first = await limits.admit("acme")
    assert first.admitted and first.burst == 3 and first.remaining == 2 and first.rps == 1.0
    assert [(await limits.admit("acme")).admitted for _ in range(2)] == [True, True]
    refused = await limits.admit("acme")
    assert not refused.admitted and refused.remaining == 0 and 0 < refused.wait_ms <= 1_000
    assert (await limits.admit("globex")).admitted  # each tenant has its own


async def test_a_grant_of_several_takes_what_fits_and_unused_ones_go_back(backend: Backend) -> None:
    limits = backend.limits(TenantLimits(rps=0.01, burst=3))  # no refill within the test

    async def requests() -> int:
        return (await limits.usage("acme", 1))[0].requests

    two = await limits.admit("acme", want=2)
    assert (two.admitted, two.granted, two.remaining) == (True, 2, 1) and two.day
    one = await limits.admit("acme", want=5)  # as many as fit
    assert (one.granted, one.remaining) == (1, 0)
    refused = await limits.admit("acme", want=5)
    assert (refused.admitted, refused.granted) == (False, 0) and refused.wait_ms > 0
    assert await requests() == 3
    back = await limits.admit("acme", 0, unused=2, unused_day=two.day)  # a lease's two unspent: nothing granted
    assert back.granted == 0 and await requests() == 1
    again = await limits.admit("acme", want=5)
    assert (again.granted, again.remaining) == (2, 0) and await requests() == 3
    await limits.admit("acme", 0, unused=7, unused_day="2000-01-01")  # a day long gone: nothing to take back
    assert await requests() == 3


async def test_an_unlimited_tenants_grants_are_whole_and_counted(backend: Backend) -> None:
    limits = backend.limits(TenantLimits(rps=0, burst=0))
    grant = await limits.admit("acme", want=10)
    assert (grant.admitted, grant.granted, grant.burst) == (True, 10, 0)
    await limits.admit("acme", 0, unused=4, unused_day=grant.day)
    assert (await limits.usage("acme", 1))[0].requests == 6


async def test_a_rate_of_0_is_unlimited_and_a_tenants_own_limits_win(backend: Backend) -> None:
    limits = backend.limits(TenantLimits(rps=0, burst=0))
    assert all([(await limits.admit("acme")).admitted for _ in range(20)])
    assert (await limits.admit("acme")).burst == 0
    await limits.set_limits("acme", {"rps": 1, "burst": 1})
    assert await limits.overrides("acme") == {"rps": "1", "burst": "1"}
    assert (await limits.admit("acme")).admitted
    assert not (await limits.admit("acme")).admitted
    assert (await limits.admit("globex")).admitted


async def test_limits_merge_overrides_with_the_defaults_and_reset_them(backend: Backend) -> None:
    limits, other = backend.limits(DEFAULTS), backend.limits(DEFAULTS)
    assert await limits.limits("acme", max_age_s=0) == DEFAULTS
    assert await limits.overrides("acme") == {}
    assert (await other.report("acme", 1))[0] == await other.limits("acme") == DEFAULTS
    await limits.set_limits("acme", {"concurrent_chats": 7, "chat_tokens_per_day": 1000})
    own = await limits.limits("acme", max_age_s=0)
    assert (own.concurrent_chats, own.chat_tokens_per_day, own.rps, own.burst) == (7, 1000, 1.0, 3)
    assert (await other.report("acme", 1))[0] == own  # as they apply now: never another process's stale copy
    await limits.set_limits("acme", {}, reset=["concurrent_chats"])
    assert await limits.overrides("acme") == {"chat_tokens_per_day": "1000"}
    assert (await limits.limits("acme", max_age_s=0)).concurrent_chats == 2
    with pytest.raises(ValueError):
        await limits.set_limits("acme", {"nonsense": 1})
    with pytest.raises(ValueError):
        await limits.set_limits("acme", {}, reset=["nonsense"])


async def test_slots_are_held_up_to_the_limit_and_given_back(backend: Backend) -> None:
    limits = backend.limits(DEFAULTS)
    a = await limits.take("acme", "chats", "a", 60)
    assert (a.taken, a.limit, a.held) == (True, 2, 1)
    assert (await limits.take("acme", "chats", "a", 60)).held == 1  # the same member holds one slot
    assert (await limits.take("acme", "chats", "b", 60)).taken
    refused = await limits.take("acme", "chats", "c", 60)
    assert (refused.taken, refused.limit, refused.held) == (False, 2, 2)
    assert (await limits.take("acme", "chats", "a", 60)).taken  # a holder renews by taking again
    assert (await limits.take("globex", "chats", "c", 60)).taken  # each tenant has its own
    assert (await limits.take("acme", "streams", "c", 60)).limit == 0  # 0: unlimited
    await limits.give("acme", "chats", "a", "never-held")
    assert (await limits.take("acme", "chats", "c", 60)).taken
    await limits.give("acme", "chats")  # nothing to give: fine


async def test_a_slot_whose_holder_vanished_expires_unless_renewed(backend: Backend) -> None:
    limits = backend.limits(DEFAULTS)
    assert (await limits.take("acme", "chats", "lost", 0.05)).taken
    assert (await limits.take("acme", "chats", "kept", 0.05)).taken
    await limits.renew("acme", "chats", ["kept", "never-held"], 60)
    await asyncio.sleep(0.2)
    again = await limits.take("acme", "chats", "new", 60)
    assert (again.taken, again.held) == (True, 2)  # "lost" expired, "kept" was renewed
    assert not (await limits.take("acme", "chats", "never-held", 60)).taken  # renew does not take a slot


async def test_usage_counts_requests_chats_and_tokens_per_day(backend: Backend) -> None:
    limits = backend.limits(TenantLimits(rps=0, burst=0))
    for _ in range(3):
        await limits.admit("acme")
    state = await create(backend.log)
    job = uuid7()
    state = await run(
        backend.log,
        state,
        RequestChat(
            job_id=job, request=ChatRequest(messages=[MessageCreate(role="user", content="hi")]), default_model="m"
        ),
    )
    report = ContextReport(included=[], dropped=[], summarized=[], prompt_tokens=11, budget=None, max_tokens=150)
    state = await run(backend.log, state, RecordContext(job_id=job, report=report))
    answer = ChatResponse(
        id=job,
        session_id=state.id,
        created_at=datetime.now(UTC),
        model="m",
        choices=[ChatChoice(finish_reason="stop", message=AssistantMessage(content="hello"))],
        usage=Usage(prompt_tokens=11, completion_tokens=5, total_tokens=16),
    )
    state = await run(backend.log, state, CompleteChat(job_id=job, response=answer, save=True))
    [today] = await limits.usage("acme", 1)
    assert (today.prompt_tokens, today.completion_tokens) == (0, 0)  # counted once projected
    await project_all(backend.views, state.id)
    await project_all(backend.views, state.id)  # projecting again counts nothing twice
    [today, yesterday] = await limits.usage("acme", 2)
    assert (today.requests, today.chats, today.prompt_tokens, today.completion_tokens) == (3, 1, 11, 5)
    assert today.day == datetime.now(UTC).date().isoformat()
    assert (yesterday.requests, yesterday.chats, yesterday.prompt_tokens) == (0, 0, 0)
    assert (await limits.usage("globex", 1))[0].chats == 0
    assert await limits.report("acme", 2) == (await limits.limits("acme", max_age_s=0), [today, yesterday])
