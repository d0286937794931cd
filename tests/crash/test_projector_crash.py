"""Crash tests for the projector: kill -9 `parley worker` while appends are in flight, restart it, and
check the read models are exactly those folded from the log (nothing lost, nothing applied twice).

The audit helpers here (`audit_session`, `audit_counters`, ...) are also used by
tests/crash/test_api_redis_crash.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Awaitable
from typing import Any

import httpx
import msgspec
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.adapters.codec import decode_state, json_encode
from shared.adapters.redis.feed import GROUP
from shared.adapters.redis.keys import Keys, partition_of
from shared.adapters.redis.store import RedisStore
from shared.app.service import SessionService
from shared.domain.commands import AddMessage, CreateSession, DeleteSession, UpdateSession
from shared.domain.errors import Contention, NotFound
from shared.domain.events import Event, MessageAdded, SessionCreated
from shared.domain.state import SessionState, fold
from shared.domain.wire import MessageCreate, SessionCreate, SessionPatch, Tool, ToolList
from tests.support import ParleyProcess, auth, wait_for

pytestmark = pytest.mark.slow

CATCH_UP_TIMEOUT_S = 20.0
"""Hard bound on waiting for the projector to reach every log's head after the last restart."""
PENDING_TIMEOUT_S = 12.0
"""Hard bound on waiting for a live projector to take over and ack a dead one's feed entries (claim idle is 2 s)."""


# -- waiting ------------------------------------------------------------------------------------


async def run_all(*coros: Awaitable[Any]) -> None:
    """Run the coroutines together; the first failure cancels the rest and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as tg:
            for c in coros:
                tg.create_task(c)
    except BaseExceptionGroup as eg:
        failed = [e for e in eg.exceptions if not isinstance(e, asyncio.CancelledError)]
        raise failed[0] if len(failed) == 1 else eg


def log_tail(proc: ParleyProcess, chars: int = 3000) -> str:
    try:
        return proc.log_path.read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"


def assert_running(proc: ParleyProcess) -> None:
    assert proc.proc is not None
    assert proc.proc.poll() is None, f"{proc.role} exited with {proc.proc.returncode}:\n{log_tail(proc)}"


async def keys_of(r: Redis) -> Keys:
    raw = await r.hget(Keys.config, "partitions")
    assert raw is not None, "no partition count in Redis: did an API or worker start?"
    return Keys(int(raw))


async def worker_registered(r: Redis, keys: Keys, worker: ParleyProcess) -> bool:
    """The worker has connected and sent its first heartbeat (its consumer name carries its pid)."""
    assert_running(worker)
    assert worker.proc is not None
    mark = f"-{worker.proc.pid}-".encode()
    return any(mark in m for m in await r.zrange(keys.projectors, 0, -1))


# -- the audit: read models versus a fresh fold of the log -----------------------------------
async def all_session_ids(r: Redis) -> set[str]:
    return {k.decode().split(":head:", 1)[1] async for k in r.scan_iter(match="parley:*:head:*", count=1000)}


async def lagging_sessions(r: Redis, keys: Keys, sids: set[str] | None = None) -> list[str]:
    """Sessions whose read model has not reached the log's head."""
    sids = sorted(sids if sids is not None else await all_session_ids(r))
    pipe = r.pipeline(transaction=False)
    for sid in sids:
        pipe.hget(keys.head(sid), "v")
        pipe.hget(keys.view(sid), "v")
    replies = await pipe.execute()
    return [sid for sid, head, view in zip(sids, replies[::2], replies[1::2]) if int(head or 0) != int(view or 0)]


async def wait_caught_up(
    r: Redis, keys: Keys, workers: list[ParleyProcess], timeout: float = CATCH_UP_TIMEOUT_S
) -> None:
    async def done() -> bool:
        for w in workers:
            assert_running(w)
        return not await lagging_sessions(r, keys)

    deadline = time.monotonic() + timeout
    while not await done():
        if time.monotonic() >= deadline:
            lag = await lagging_sessions(r, keys)
            pytest.fail(f"projector did not catch up within {timeout:.0f}s; {len(lag)} sessions behind, e.g. {lag[:3]}")
        await asyncio.sleep(0.05)


async def held_by(r: Redis, keys: Keys, worker: ParleyProcess) -> int:
    """Feed entries the worker's consumer has read and not acknowledged (for the report only)."""
    assert worker.proc is not None
    mark = f"-{worker.proc.pid}-".encode()
    held = 0
    for p in range(keys.partitions):
        try:
            summary = await r.xpending(keys.feed(p), GROUP)
        except ResponseError:  # the group is not created yet: nothing held there
            continue
        for c in (summary or {}).get("consumers") or []:
            if mark in c["name"]:
                held += int(c["pending"])
    return held


async def feed_pending(r: Redis, keys: Keys) -> int:
    """Feed entries read by some consumer but never acknowledged."""
    total = 0
    for p in range(keys.partitions):
        try:
            summary = await r.xpending(keys.feed(p), GROUP)
        except ResponseError as e:  # a worker killed while starting may not have created every group yet
            if "NOGROUP" not in str(e):
                raise
            total += 1  # not taken over yet: keep waiting for a live worker to create it
            continue
        total += int(summary["pending"] or 0) if summary else 0
    return total


class SessionAudit(msgspec.Struct):
    sid: str
    tenant: str
    state: SessionState
    events: list[Event]
    messages: list[MessageAdded]


async def audit_session(r: Redis, keys: Keys, store: RedisStore, sid: str) -> SessionAudit:
    """Assert the session's read models equal what a fresh fold of its whole log gives."""
    head_v, head_t = await r.hmget(keys.head(sid), "v", "t")
    assert head_v is not None and head_t is not None, f"session {sid}: no head"
    tenant = head_t.decode()
    events = await store.read(sid, after=0, limit=100_000)
    assert [e.version for e in events] == list(range(1, len(events) + 1)), f"session {sid}: log versions not 1..n"
    assert len(events) == int(head_v), f"session {sid}: head says {int(head_v)} events, log holds {len(events)}"
    assert isinstance(events[0], SessionCreated), f"session {sid}: log does not start with SessionCreated"
    state = fold(SessionState(id=sid), events)

    view = await r.hgetall(keys.view(sid))
    assert view, f"session {sid}: no read model at all (log has {len(events)} events)"
    assert int(view[b"v"]) == state.version, f"session {sid}: read model at v{int(view[b'v'])}, log at v{state.version}"
    assert view.get(b"t") == head_t, f"session {sid}: read model tenant {view.get(b't')!r} != {head_t!r}"
    assert decode_state(view[b"st"]) == state, f"session {sid}: read model state snapshot != fold of the log"

    messages = [e for e in events if isinstance(e, MessageAdded)]
    assert [m.data.seq for m in messages] == list(range(1, len(messages) + 1)), f"session {sid}: message seqs not 1..n"
    assert len({m.data.id for m in messages}) == len(messages), f"session {sid}: a message id appears twice in the log"

    listed = [int(x.split(b"|")[0]) for x in await r.lrange(keys.messages(sid), 0, -1)]
    indexed = await r.zscore(keys.index(partition_of(sid, keys.partitions), tenant), sid) is not None
    if state.exists:
        assert state.session is not None
        assert view.get(b"j") == json_encode(state.session), f"session {sid}: session JSON != fold of the log"
        assert view.get(b"tools") == json_encode(ToolList(state.session.tools)), f"session {sid}: tools JSON != fold"
        expected = [m.version for m in messages]
        missing = sorted(set(expected) - set(listed))
        doubled = sorted({v for v in listed if listed.count(v) > 1})
        assert listed == expected, (
            f"session {sid}: message list != MessageAdded versions of the log "
            f"(listed {len(listed)}, log {len(expected)}, missing {missing[:10]}, doubled {doubled[:10]})"
        )
        assert indexed, f"session {sid}: live session not in tenant {tenant}'s index"
    else:
        assert b"j" not in view and b"tools" not in view, f"session {sid}: deleted session still has a read model body"
        # the pointers stay after a delete (time travel reads them); they must still match the log
        assert listed == [m.version for m in messages], f"session {sid}: deleted session's message pointers != log"
        assert not indexed, f"session {sid}: deleted session still in tenant {tenant}'s index"
    return SessionAudit(sid, tenant, state, events, messages)


async def audit_counters(r: Redis, keys: Keys) -> None:
    """Per partition and tenant, events projected == events appended: no event applied twice or skipped."""
    for p in range(keys.partitions):
        written = {k.decode(): int(v) for k, v in (await r.hgetall(keys.written(p))).items()}
        projected = {k.decode(): int(v) for k, v in (await r.hgetall(keys.projected(p))).items()}
        assert projected == written, f"partition {p}: projected counts {projected} != written counts {written}"


async def audit_all(r: Redis, keys: Keys) -> dict[str, SessionAudit]:
    store = RedisStore(r, keys)
    await audit_counters(r, keys)
    return {sid: await audit_session(r, keys, store, sid) for sid in sorted(await all_session_ids(r))}


def as_json(value: Any) -> Any:
    return json.loads(json_encode(value))


async def http_messages(client: httpx.AsyncClient, api_url: str, sid: str, tenant: str) -> list[dict]:
    items: list[dict] = []
    while True:
        r = await client.get(
            f"{api_url}/sessions/{sid}/messages", params={"limit": 1000, "offset": len(items)}, headers=auth(tenant)
        )
        assert r.status_code == 200, f"GET messages of {sid}: {r.status_code} {r.text}"
        page = r.json()["items"]
        items.extend(page)
        if len(page) < 1000:
            return items


async def http_session_ids(client: httpx.AsyncClient, api_url: str, tenant: str) -> set[str]:
    r = await client.get(f"{api_url}/sessions", params={"limit": 1000}, headers=auth(tenant))
    assert r.status_code == 200, f"GET /sessions as {tenant}: {r.status_code} {r.text}"
    return {s["id"] for s in r.json()["items"]}


async def audit_over_http(client: httpx.AsyncClient, api_url: str, audits: dict[str, SessionAudit]) -> None:
    """GET answers exactly the folded state: the session, its messages in seq order, the tenant's list."""
    for a in audits.values():
        got = await client.get(f"{api_url}/sessions/{a.sid}", headers=auth(a.tenant))
        if a.state.exists:
            assert got.status_code == 200, f"GET session {a.sid}: {got.status_code} {got.text}"
            assert got.json() == as_json(a.state.session), f"GET session {a.sid} != fold of the log"
            listed = await http_messages(client, api_url, a.sid, a.tenant)
            want = [as_json(m.data) for m in a.messages]
            assert [m["seq"] for m in listed] == list(range(1, len(listed) + 1)), f"GET messages of {a.sid}: seqs"
            assert listed == want, f"GET messages of {a.sid}: {len(listed)} items != the log's {len(want)} messages"
        else:
            assert got.status_code == 404, f"GET deleted session {a.sid}: {got.status_code}"
    for tenant in sorted({a.tenant for a in audits.values()}):
        live = {a.sid for a in audits.values() if a.tenant == tenant and a.state.exists}
        assert await http_session_ids(client, api_url, tenant) == live, f"GET /sessions as {tenant} != live sessions"


# -- test 1: 10 sessions x 100 messages over HTTP, worker killed three times mid-run ---------
SESSIONS = 10
MESSAGES = 100
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


async def test_projector_killed_mid_batch_repeatedly_read_models_equal_fold(fresh_redis, spawn):
    server = fresh_redis()
    api, worker = await asyncio.gather(
        asyncio.to_thread(spawn, "api", server.url), asyncio.to_thread(spawn, "worker", server.url)
    )
    r = Redis.from_url(server.url)
    client = httpx.AsyncClient(timeout=10.0, limits=httpx.Limits(max_connections=32))
    try:
        keys = await keys_of(r)
        # Sessions: 8 for acme, 2 for globex, plus one that gets deleted halfway.
        tenants = ["acme"] * (SESSIONS - 2) + ["globex"] * 2
        sessions: list[tuple[str, str]] = []
        for j, tenant in enumerate(tenants):
            body = {"situation": f"crash-{j}", "tools": TOOLS if j % 3 == 0 else [], "metadata": {"j": j}}
            created = await client.post(f"{api.url}/sessions", json=body, headers=auth(tenant))
            assert created.status_code == 201, created.text
            sessions.append((created.json()["id"], tenant))
        doomed = await client.post(f"{api.url}/sessions", json={"situation": "doomed"}, headers=auth("acme"))
        assert doomed.status_code == 201, doomed.text
        doomed_id = doomed.json()["id"]

        acked: dict[str, list[dict]] = {sid: [] for sid, _ in sessions}
        count = [0]
        errors: list[str] = []

        async def write_session(j: int, sid: str, tenant: str) -> None:
            for i in range(MESSAGES):
                if i == MESSAGES // 2:  # a SessionUpdated + ToolsChanged pair in the middle of the stream
                    patch = {
                        "metadata": {"j": j, "half": True},
                        "tools": TOOLS + [{"type": "function", "function": {"name": f"t{j}"}}],
                    }
                    res = await client.patch(f"{api.url}/sessions/{sid}", json=patch, headers=auth(tenant))
                    if res.status_code != 200:
                        errors.append(f"PATCH {sid}: {res.status_code} {res.text}")
                body = {"role": "user" if i % 2 == 0 else "assistant", "content": f"s{j}-m{i}"}
                res = await client.post(f"{api.url}/sessions/{sid}/messages", json=body, headers=auth(tenant))
                if res.status_code == 201:
                    acked[sid].append(res.json())
                    count[0] += 1
                else:
                    errors.append(f"POST message {i} to {sid}: {res.status_code} {res.text}")
                await asyncio.sleep(0.02)

        async def write_doomed() -> None:
            for i in range(20):
                res = await client.post(
                    f"{api.url}/sessions/{doomed_id}/messages",
                    json={"role": "user", "content": f"d{i}"},
                    headers=auth(),
                )
                if res.status_code != 201:
                    errors.append(f"POST message to doomed: {res.status_code} {res.text}")
                await asyncio.sleep(0.05)
            res = await client.delete(f"{api.url}/sessions/{doomed_id}", headers=auth())
            if res.status_code != 202:
                errors.append(f"DELETE doomed: {res.status_code} {res.text}")

        kills: list[tuple[int, int]] = []
        workers = [worker]

        async def acked_at_least(n: int) -> None:
            await wait_for(lambda: _true_if(count[0] >= n or count[0] >= SESSIONS * MESSAGES), 30, f"{n} acked appends")

        async def crash_and_restart() -> None:
            """Three kills: one in steady state, one the moment a restarted worker starts on its backlog (so in
            the middle of a batch), one more in steady state after another restart; then a last restart."""
            nonlocal worker

            async def kill() -> None:
                worker.kill()
                kills.append((count[0], await held_by(r, keys, worker)))

            async def restart(kill_on_start: bool) -> None:
                nonlocal worker
                worker = await asyncio.to_thread(spawn, "worker", server.url)
                workers.append(worker)
                # Poll tightly: the new worker reads the backlog right after its first heartbeat.
                await wait_for(
                    lambda: worker_registered(r, keys, worker), 15, "the restarted worker to register", 0.005
                )
                if kill_on_start:
                    await kill()

            await wait_for(lambda: worker_registered(r, keys, worker), 15, "the first worker to register")
            await acked_at_least(300)
            await kill()
            await acked_at_least(450)  # a backlog builds up while no projector runs
            await restart(kill_on_start=True)
            await acked_at_least(550)
            await restart(kill_on_start=False)
            await acked_at_least(700)
            await kill()
            await acked_at_least(800)
            await restart(kill_on_start=False)

        await run_all(
            *(write_session(j, sid, tenant) for j, (sid, tenant) in enumerate(sessions)),
            write_doomed(),
            crash_and_restart(),
        )

        print(
            f"worker killed at (acknowledged appends of {SESSIONS * MESSAGES}, feed entries it held unacked): {kills}"
        )
        assert errors == [], f"{len(errors)} writes failed, e.g. {errors[:5]}"
        assert len(kills) == 3
        live_worker = workers[-1]
        await wait_caught_up(r, keys, [live_worker])
        await wait_for(
            lambda: _true_if_zero(feed_pending(r, keys)),
            PENDING_TIMEOUT_S,
            "the dead workers' feed entries to be taken over and acked",
        )

        audits = await audit_all(r, keys)
        assert set(audits) == {sid for sid, _ in sessions} | {doomed_id}
        assert not audits[doomed_id].state.exists
        for sid, tenant in sessions:
            a = audits[sid]
            assert a.tenant == tenant
            assert len(acked[sid]) == MESSAGES
            assert [as_json(m.data) for m in a.messages] == acked[sid], (
                f"session {sid}: log messages != acknowledged ones"
            )
        await audit_over_http(client, api.url, audits)
        for sid, _ in sessions:  # the acknowledged bodies, over HTTP, in seq order
            assert await http_messages(client, api.url, sid, audits[sid].tenant) == acked[sid]
        assert_running(live_worker)
    finally:
        await client.aclose()
        await r.aclose()


async def _true_if(value: bool) -> bool:
    return value


async def _true_if_zero(pending: Awaitable[int]) -> bool:
    return await pending == 0


# -- test 2: in-process writer, two workers, one of them killed 3-5 times at random moments ---
def _reply_with(events: list[Event]) -> bytes:
    data = events[0].data if isinstance(events[0], MessageAdded) else {"version": events[-1].version}
    return json_encode(data)


async def test_projector_killed_at_random_moments_projects_exactly_once(fresh_redis, spawn):
    seed = int(os.environ.get("PARLEY_CRASH_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    print(f"PARLEY_CRASH_SEED={seed}")
    server = fresh_redis()
    # Two projectors race on the same sessions (the read model's version check must keep that exactly once);
    # one of them, chosen at random, is killed each time.
    api, *workers = await asyncio.gather(
        asyncio.to_thread(spawn, "api", server.url),
        asyncio.to_thread(spawn, "worker", server.url),
        asyncio.to_thread(spawn, "worker", server.url),
    )
    r = Redis.from_url(server.url)
    writer_redis = Redis.from_url(server.url)
    client = httpx.AsyncClient(timeout=10.0)
    try:
        keys = await keys_of(r)
        store = RedisStore(writer_redis, keys)
        await store.load_scripts()
        service = SessionService(store, store, keys.partitions)

        live: list[tuple[str, str]] = []
        acked_messages: dict[str, dict[str, dict]] = {}
        deleted: set[str] = set()
        stop = asyncio.Event()
        errors: list[str] = []
        writes = [0]

        async def create(tenant: str) -> None:
            sid = service.new_session_id(tenant, None)
            body = SessionCreate(situation=f"rnd-{writes[0]}", tools=[], metadata={"n": writes[0]})
            await service.execute(tenant, sid, CreateSession(body=body), lambda s, ev: _reply_with(ev))
            live.append((sid, tenant))
            acked_messages[sid] = {}

        for t in ("acme", "acme", "acme", "globex"):
            await create(t)

        async def writer(w: int) -> None:
            wrng = random.Random(seed * 31 + w)
            n = 0
            while not stop.is_set() and writes[0] < 4000:
                n += 1
                sid, tenant = wrng.choice(live)
                roll = wrng.random()
                try:
                    if roll < 0.04:
                        await create(wrng.choice(["acme", "globex"]))
                    elif roll < 0.08:
                        patch = SessionPatch(
                            metadata={"w": w, "n": n}, tools=msgspec.convert(TOOLS, list[Tool]) if n % 2 else []
                        )
                        await service.execute(tenant, sid, UpdateSession(patch=patch), lambda s, ev: _reply_with(ev))
                    elif roll < 0.09 and len(live) > 4:
                        live.remove((sid, tenant))
                        await service.execute(tenant, sid, DeleteSession(), lambda s, ev: _reply_with(ev))
                        deleted.add(sid)
                    else:
                        msg = MessageCreate(role="user", content=f"w{w}-n{n}")
                        reply = await service.execute(tenant, sid, AddMessage(body=msg), lambda s, ev: _reply_with(ev))
                        body = json.loads(reply)
                        acked_messages[sid][body["id"]] = body
                    writes[0] += 1
                except (NotFound, Contention):
                    pass  # another writer deleted it, or raced it too often: not acknowledged, not counted
                except Exception as e:
                    errors.append(f"{type(e).__name__}: {e}")
                await asyncio.sleep(wrng.uniform(0, 0.01))

        kills: list[tuple[int, int, str, int]] = []

        async def killer() -> None:
            for _ in range(rng.randint(3, 5)):
                slot = rng.randrange(len(workers))
                victim = workers[slot]
                # When: while it starts up, the moment it registers (it then reads its backlog), or a while later.
                when = rng.choice(["starting", "registered", "registered", "later", "later"])
                if when != "starting":
                    await wait_for(lambda: worker_registered(r, keys, victim), 15, "the worker to register", 0.005)
                if when == "later":
                    await asyncio.sleep(rng.uniform(0.0, 0.4))
                victim.kill()
                kills.append((writes[0], slot, when, await held_by(r, keys, victim)))
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                workers[slot] = await asyncio.to_thread(spawn, "worker", server.url)
            for w in workers:
                await wait_for(lambda: worker_registered(r, keys, w), 15, "the last workers to register")
            await asyncio.sleep(0.3)
            stop.set()

        await run_all(*(writer(w) for w in range(4)), killer())

        print(
            f"seed {seed}: {writes[0]} writes; kills (writes so far, worker slot, when, feed entries it held): {kills}"
        )
        assert errors == [], f"seed {seed}: {len(errors)} writes failed, e.g. {errors[:5]}"
        assert 3 <= len(kills) <= 5
        await wait_caught_up(r, keys, workers)
        await wait_for(
            lambda: _true_if_zero(feed_pending(r, keys)), PENDING_TIMEOUT_S, "dead workers' feed entries to be acked"
        )

        audits = await audit_all(r, keys)
        assert set(audits) == set(acked_messages), f"seed {seed}: sessions in Redis != sessions created"
        for sid, acked in acked_messages.items():
            a = audits[sid]
            assert a.state.exists == (sid not in deleted), f"seed {seed}: session {sid} deleted state"
            in_log = {m.data.id: as_json(m.data) for m in a.messages}
            missing = sorted(set(acked) - set(in_log))
            assert not missing, f"seed {seed}: session {sid}: {len(missing)} acknowledged messages not in the log"
            assert all(in_log[i] == body for i, body in acked.items()), (
                f"seed {seed}: session {sid}: logged message != acknowledged"
            )
        await audit_over_http(client, api.url, audits)
        for w in workers:
            assert_running(w)
    finally:
        await client.aclose()
        await r.aclose()
        await writer_redis.aclose()
