"""The `Webhooks` contract: subscriptions per tenant (another tenant's read like none), the outbox the live
projection fills exactly once per event of a webhook type, a cursor that moves only within its epoch (a replay
starts a new one), capped delivery lists, and one lease holder at a time."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import msgspec

from shared.domain.commands import DeleteSession
from shared.domain.ids import uuid7
from shared.domain.projection import project
from shared.domain.webhooks import Subscription, before, new_secret
from tests.contracts.conftest import Backend, add, create, project_all, run
from tests.support import wait_for


def subscription(tenant: str = "acme", **fields: object) -> Subscription:
    now = datetime.now(UTC)
    values: dict[str, object] = {
        "id": uuid7(),
        "tenant": tenant,
        "url": "http://example.com/hook",
        "event_types": ["SessionCreated", "SessionDeleted"],
        "secret": new_secret(),
        "created_at": now,
        "updated_at": now,
        **fields,
    }
    return Subscription(**values)  # type: ignore[arg-type]


async def outbox(backend: Backend, after: str = "0-0") -> list:
    read = await backend.webhooks.outbox({p: after for p in range(backend.partitions)}, 1000)
    assert sorted(read) == list(range(backend.partitions))
    return [e for p in range(backend.partitions) for e in read[p]]


async def test_subscriptions_belong_to_their_tenant(backend: Backend) -> None:
    hooks = backend.webhooks
    first, second, theirs = subscription(), subscription(), subscription("globex")
    for sub in (first, second, theirs):
        await hooks.create(sub, b"{}")
    assert await hooks.get("acme", first.id) == first
    assert await hooks.get("globex", first.id) is None
    assert [s.id for s in await hooks.of("acme")] == [first.id, second.id]
    assert [s.id for s in await hooks.of("globex")] == [theirs.id]
    assert sorted(await hooks.ids()) == sorted([first.id, second.id, theirs.id])

    later = first.updated_at + timedelta(seconds=1)
    changed = msgspec.structs.replace(first, url="http://example.org/other", active=False, updated_at=later)
    assert await hooks.update(changed, b"{}", first.updated_at) is True
    assert await hooks.get("acme", first.id) == changed
    # a change decided on the subscription as it was before: refused, so it cannot undo the one in between
    stale = msgspec.structs.replace(first, secret=new_secret(), updated_at=later + timedelta(seconds=1))
    assert await hooks.update(stale, b"{}", first.updated_at) is None
    assert await hooks.get("acme", first.id) == changed

    assert not await hooks.delete("globex", first.id, b"{}")  # not theirs
    assert not await hooks.replay("globex", first.id, "0-0", b"{}")
    assert await hooks.delete("acme", first.id, b"{}")
    assert not await hooks.delete("acme", first.id, b"{}")
    assert await hooks.get("acme", first.id) is None and await hooks.load(first.id) is None
    assert await hooks.update(changed, b"{}", changed.updated_at) is False  # deleted meanwhile: not brought back
    assert await hooks.get("acme", first.id) is None
    assert first.id not in await hooks.ids()


async def test_the_live_projection_fills_the_outbox_once_per_event(backend: Backend) -> None:
    state = await create(backend.log)
    state = await add(backend.log, state, "hello")  # not a webhook type
    state = await run(backend.log, state, DeleteSession())
    [pending] = await backend.views.pending([state.id])
    assert pending is not None
    update = project(pending.state, pending.events)
    assert await backend.views.apply([("acme", update), ("acme", update)]) == [True, False]  # the fence
    assert await backend.views.apply([("acme", update)], gen=1) == [True]  # a rebuild: its views, no outbox
    entries = await outbox(backend)
    assert [(e.tenant, e.session_id, e.version, e.event_type) for e in entries] == [
        ("acme", state.id, 1, "SessionCreated"),
        ("acme", state.id, 3, "SessionDeleted"),
    ]
    logged = await backend.log.read(state.id)
    assert [e.event_id for e in entries] == [logged[0].id, logged[2].id]
    p = entries[0].partition
    assert await backend.webhooks.outbox({p: entries[0].position}, 10) == {p: [entries[1]]}
    assert await backend.webhooks.outbox({p: before(entries[0].position)}, 10) == {p: entries}
    assert await backend.webhooks.outbox({p: before(entries[0].position)}, 1) == {p: entries[:1]}
    assert await backend.webhooks.outbox({}, 10) == {}


async def test_a_cursor_starts_now_and_moves_only_in_its_epoch(backend: Backend) -> None:
    hooks = backend.webhooks
    old = await create(backend.log)
    await project_all(backend.views, old.id)
    await asyncio.sleep(0.01)  # the outbox's entry ids are milliseconds: the subscription comes after this one's
    sub = subscription()
    await hooks.create(sub, b"{}")
    new = await create(backend.log)
    await project_all(backend.views, new.id)
    loaded = await hooks.load(sub.id)
    assert loaded is not None
    _, cursor = loaded
    assert cursor.epoch == 0 and cursor.partitions == {}
    read = await hooks.outbox({p: cursor.after(p) for p in range(backend.partitions)}, 100)
    seen = [e for entries in read.values() for e in entries]
    assert [e.session_id for e in seen] == [new.id]

    [entry] = seen
    assert await hooks.advance(sub.id, 0, entry.partition, entry.position)
    loaded = await hooks.load(sub.id)
    assert loaded is not None and loaded[1].after(entry.partition) == entry.position
    assert await hooks.outbox({entry.partition: loaded[1].after(entry.partition)}, 100) == {entry.partition: []}

    assert await hooks.replay("acme", sub.id, "0-0", b"{}")  # from the outbox's beginning, in a new epoch
    assert not await hooks.advance(sub.id, 0, entry.partition, entry.position)  # a deliverer of the old epoch
    loaded = await hooks.load(sub.id)
    assert loaded is not None
    cursor = loaded[1]
    assert cursor.epoch == 1 and cursor.partitions == {} and cursor.after(entry.partition) == "0-0"
    assert await hooks.advance(sub.id, 1, entry.partition, entry.position)
    assert await hooks.delete("acme", sub.id, b"{}")
    assert not await hooks.advance(sub.id, 1, entry.partition, entry.position)


async def test_deliveries_keep_the_newest_and_go_with_their_subscription(backend: Backend) -> None:
    hooks = backend.webhooks
    sub = subscription()
    await hooks.create(sub, b"{}")
    for i in range(5):
        await hooks.record(sub.id, b'{"n":%d}' % i, keep=3)
    assert await hooks.deliveries(sub.id, 10) == [b'{"n":4}', b'{"n":3}', b'{"n":2}']
    assert await hooks.deliveries(sub.id, 1) == [b'{"n":4}']
    assert await hooks.delete("acme", sub.id, b"{}")
    await hooks.record(sub.id, b'{"n":5}', keep=3)
    assert await hooks.deliveries(sub.id, 10) == []


async def test_one_lease_holder_at_a_time(backend: Backend) -> None:
    hooks = backend.webhooks
    sub = subscription()
    await hooks.create(sub, b"{}")
    assert await hooks.lease(sub.id, "w1", 60_000)
    assert await hooks.lease(sub.id, "w1", 60_000)  # renewed
    assert not await hooks.lease(sub.id, "w2", 60_000)
    await hooks.release(sub.id, "w2")  # not its to give back
    assert not await hooks.lease(sub.id, "w2", 60_000)
    await hooks.release(sub.id, "w1")
    assert await hooks.lease(sub.id, "w2", 200)

    async def taken_over() -> bool:  # w2 died: its lease lapses
        return await hooks.lease(sub.id, "w3", 60_000)

    await wait_for(taken_over, 10, "the lapsed lease to be taken")
    assert not await hooks.lease(sub.id, "w2", 60_000)


async def test_changes_are_recorded_with_them_and_paged(backend: Backend) -> None:
    hooks = backend.webhooks
    sub = subscription()
    await hooks.create(sub, b'{"n":1}')
    assert await hooks.update(sub, b'{"n":2}', sub.updated_at)
    assert await hooks.update(sub, b'{"n":"no"}', sub.updated_at - timedelta(seconds=1)) is None  # not recorded
    assert await hooks.replay("acme", sub.id, "0-0", b'{"n":3}')
    assert not await hooks.replay("globex", sub.id, "0-0", b'{"n":"no"}')  # refused: not recorded
    assert not await hooks.delete("globex", sub.id, b'{"n":"no"}')
    assert await hooks.delete("acme", sub.id, b'{"n":4}')
    assert await hooks.update(sub, b'{"n":"no"}', sub.updated_at) is False  # deleted: not recorded
    assert await hooks.changes("globex", None, 10) == ([], None)
    first, cursor = await hooks.changes("acme", None, 3)
    assert first == [b'{"n":1}', b'{"n":2}', b'{"n":3}'] and cursor is not None
    assert await hooks.changes("acme", cursor, 3) == ([b'{"n":4}'], None)
    assert await hooks.changes("acme", None, 4) == ([*first, b'{"n":4}'], None)
