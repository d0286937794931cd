"""History as a property, at the service layer (no HTTP), on fakeredis and on a real redis-server.

For randomly generated histories of a few sessions of two tenants (create, update/patch, tool changes,
messages with content parts, tool calls and tool results, chats requested / cancelled / failed, delete):

1. the read models `parley rebuild` (the `Rebuilder`) folds from the log equal the live ones the projector
   wrote (the views the store serves and the raw view state), and both equal a fresh fold of the log;
2. time travel at every version equals what the service answered right after the write that produced it;
3. rebuilding twice is idempotent, and a rebuilt deleted session stays out of the tenant index with its
   past versions readable.

Plus two deterministic tests: time travel across the real snapshot interval, and a session purged while a
rebuild reads the logs ahead (the other sessions' new generations must still be their own logs' fold).

The property tests shrink the snapshot interval (the default argument of `project` and the constant the
time-travel call passes to its script) to `SNAP`, so short histories cross several snapshots; one
deterministic test checks the real interval (`SNAPSHOT_EVERY`) with a history of ~350 events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import fakeredis
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

import shared.adapters.redis.store as store_module
import shared.domain.projection as projection_module
from shared.adapters.codec import decode_state, json_encode
from shared.adapters.redis.connect import connect
from shared.adapters.redis.feed import RedisFeed
from shared.adapters.redis.history import RedisHistory
from shared.adapters.redis.keys import Keys, partition_of
from shared.adapters.redis.store import TIME_TRAVEL, RedisStore
from shared.app import history as history_ops
from shared.app.projection import Projection
from shared.app.rebuild import READ_BATCH, Rebuilder, Scope
from shared.app.service import SessionService
from shared.domain.commands import (
    AddMessage,
    CancelChat,
    Command,
    CreateSchedule,
    CreateSession,
    DeleteSchedule,
    DeleteSession,
    FailChat,
    ForkSession,
    RequestChat,
    SkipTicks,
    Stamp,
    Tick,
    UpdateSchedule,
    UpdateSession,
    decide,
)
from shared.domain.errors import DomainError, NotFound, VersionNotFound
from shared.domain.events import Event, MessageAdded
from shared.domain.ids import uuid7
from shared.domain.projection import SNAPSHOT_EVERY, next_tick_ms
from shared.domain.state import SessionState, fold
from shared.domain.wire import (
    ChatRequest,
    FunctionCall,
    FunctionDef,
    ImagePart,
    ImageUrl,
    MessageCreate,
    ScheduleCreate,
    SchedulePatch,
    SessionCreate,
    SessionPatch,
    TextPart,
    Tool,
    ToolCall,
    ToolList,
)

KEYS = Keys(4)
TENANTS = ("acme", "globex")
OWNERS = ("acme", "acme", "globex")
"""Session i belongs to OWNERS[i]: two sessions share a tenant (its list holds both), one is another's."""
SNAP = 3
"""The snapshot interval of the property tests."""
PAGE = 1000
REBUILD_TIMEOUT_S = 10.0
"""Hard bound on a rebuild of a few thousand events (it takes well under a second)."""

PROPERTY_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


# -- backends ---------------------------------------------------------------------------------------


@pytest.fixture(params=["fakeredis", "redis-server", "redis-cluster"])
def backend(request: pytest.FixtureRequest) -> str | None:
    """None: a fresh fakeredis per example; else the URL of the session's redis-server or Redis Cluster (flushed
    per example).

    The hypothesis examples run their own event loop (asyncio.run), so they connect inside the example
    rather than through the async `redis` fixture of conftest.py."""
    if request.param == "fakeredis":
        return None
    if request.param == "redis-cluster":
        return request.getfixturevalue("redis_cluster").url
    return request.getfixturevalue("redis_server").url


@contextlib.asynccontextmanager
async def connected(url: str | None) -> AsyncIterator[Redis]:
    if url is None:
        client: Redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    else:
        client = connect(url)  # one Redis, or a cluster's client
        await client.flushall()  # on a cluster: every primary
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.contextmanager
def snapshot_interval(n: int) -> Iterator[None]:
    """Snapshots every `n` versions: `project`'s default (the projector and the rebuild call it without one)
    and the interval time travel passes to TIME_TRAVEL, which must agree."""
    defaults, constant = projection_module.project.__defaults__, store_module.SNAPSHOT_EVERY
    projection_module.project.__defaults__ = (n,)
    store_module.SNAPSHOT_EVERY = n
    try:
        yield
    finally:
        projection_module.project.__defaults__ = defaults
        store_module.SNAPSHOT_EVERY = constant


# -- commands ---------------------------------------------------------------------------------------

TOOL_NAMES = ["lookup", "search", "fetch"]
CALL_IDS = ["call_a", "call_b", "call_c"]
text = st.text(max_size=12)
maybe = lambda s: st.none() | s  # noqa: E731
tool = st.builds(
    lambda name, description, params: Tool(
        type="function", function=FunctionDef(name=name, description=description, parameters=params)
    ),
    st.sampled_from(TOOL_NAMES),
    maybe(text),
    st.sampled_from([None, {"type": "object", "properties": {"q": {"type": "string"}}}]),
)
tools = st.lists(tool, max_size=3, unique_by=lambda t: t.function.name)
parts = st.lists(
    st.one_of(
        text.map(lambda t: TextPart(text=t)),
        st.builds(
            lambda u, d: ImagePart(image_url=ImageUrl(url="https://x.test/" + u, detail=d)),
            text,
            st.sampled_from([None, "low"]),
        ),
    ),
    min_size=1,
    max_size=2,
)
content = st.one_of(text, text, parts)
plain_message = st.builds(
    MessageCreate,
    role=st.sampled_from(["system", "user", "assistant"]),
    content=content,
    name=st.sampled_from([None, "alice"]),
)
tool_call_message = st.builds(
    lambda c, ids, name: MessageCreate(
        role="assistant",
        content=c,
        tool_calls=[ToolCall(id=i, function=FunctionCall(name=name, arguments='{"q": "%s"}' % i)) for i in ids],
    ),
    maybe(text),
    st.lists(st.sampled_from(CALL_IDS), min_size=1, max_size=2, unique=True),
    st.sampled_from(TOOL_NAMES),
)
tool_result_message = st.builds(
    lambda c, i: MessageCreate(role="tool", content=c, tool_call_id=i), content, st.sampled_from(CALL_IDS)
)
message = st.one_of(plain_message, plain_message, tool_call_message, tool_result_message)
patch = st.builds(
    SessionPatch,
    agent_id=maybe(text),
    situation=maybe(text),
    token_budget=maybe(st.integers(1, 10_000)),
    context_overflow=st.sampled_from([None, "truncate", "adaptive"]),
    multitask=st.sampled_from(["enqueue", "reject", "interrupt"]),
    tools=maybe(tools),
    metadata=maybe(st.dictionaries(st.sampled_from(["k", "j"]), st.integers(-5, 5))),
)
create = st.builds(
    SessionCreate,
    agent_id=maybe(text),
    user_id=maybe(text),
    situation=maybe(text),
    token_budget=maybe(st.integers(1, 10_000)),
    tools=tools,
    metadata=st.dictionaries(st.sampled_from(["plan", "tier"]), text, max_size=2),
)


@dataclass(frozen=True)
class Chat:
    """RequestChat, built when it runs (it needs a fresh job id)."""

    messages: list[MessageCreate]
    save: bool
    multitask: str | None


@dataclass(frozen=True)
class EndChat:
    """CancelChat or FailChat of the n-th chat requested in the session (refused if it is not active)."""

    n: int
    fail: bool


@dataclass(frozen=True)
class ToolRound:
    """An assistant message calling tools, then one tool result per call (several writes)."""

    call: MessageCreate
    results: list[Any]


@dataclass(frozen=True)
class ScheduleRound:
    """Schedule commands, each on the session's n-th schedule (a new one if it has none), one write each: create,
    pause, resume, delete, fire its next tick as a chat, or skip it."""

    ops: list[tuple[str, int]]


@dataclass(frozen=True)
class Fork:
    """Fork the session at a fraction of its versions (a new session of the same tenant; refused at a version
    where the session was deleted)."""

    fraction: float


tool_round = st.builds(ToolRound, tool_call_message, st.lists(content, min_size=2, max_size=2))
chat = st.builds(
    Chat,
    st.lists(st.one_of(plain_message, plain_message, tool_result_message), max_size=2),
    st.booleans(),
    st.sampled_from([None, "enqueue", "interrupt", "reject"]),
)
end_chat = st.builds(EndChat, st.integers(0, 3), st.booleans())
schedule_round = st.builds(
    ScheduleRound,
    st.lists(
        st.tuples(st.sampled_from(["create", "pause", "resume", "delete", "fire", "skip"]), st.integers(0, 2)),
        min_size=1,
        max_size=4,
    ),
)
step = st.one_of(  # hypothesis favours the first branches: the delete, which ends a session, comes last
    chat,
    schedule_round,
    st.builds(Fork, st.floats(0.0, 1.0)),
    tool_round,
    message.map(lambda m: AddMessage(body=m)),
    end_chat,
    message.map(lambda m: AddMessage(body=m)),
    patch.map(lambda p: UpdateSession(patch=p)),
    tools.map(lambda t: UpdateSession(patch=SessionPatch(tools=t))),
    chat,
    tool_round,
    message.map(lambda m: AddMessage(body=m)),
    st.just(DeleteSession()),
)
history = st.tuples(
    st.lists(create, min_size=len(OWNERS), max_size=len(OWNERS)),
    st.lists(st.tuples(st.integers(0, len(OWNERS) - 1), step), min_size=4, max_size=20),
)


# -- running a history --------------------------------------------------------------------------------

Answer = tuple[bytes | None, bytes | None, list[bytes] | None]
"""(session JSON, tools JSON, message JSONs) as the service answers them; None for 404 (deleted)."""


@dataclass
class World:
    redis: Redis
    store: RedisStore
    service: SessionService
    history: RedisHistory
    live: Projection
    sessions: list[tuple[str, str]] = field(default_factory=list)
    """(tenant, session id), in creation order."""
    answers: dict[str, dict[int, Answer]] = field(default_factory=dict)
    """Per session: the version a write ended at → what the service answered right after it."""
    jobs: dict[str, list[str]] = field(default_factory=dict)
    schedules: dict[str, list[str]] = field(default_factory=dict)
    """Per session: its schedules' ids, in creation order."""

    @classmethod
    def on(cls, redis: Redis) -> World:
        store = RedisStore(redis, KEYS)
        service = SessionService(store, store, KEYS.partitions, read_timeout_s=5)
        live = Projection(RedisStore(redis, KEYS), RedisFeed(redis, KEYS, "live"))
        return cls(redis, store, service, RedisHistory(redis, KEYS), live)

    def rebuilder(self) -> Rebuilder:
        # the rebuild's own catch-up projector, as `parley rebuild` builds one beside the worker's
        return Rebuilder(self.store, self.history, Projection(self.store, RedisFeed(self.redis, KEYS, "ops")))

    def add_session(self, tenant: str, parent_id: str | None = None) -> str:
        sid = self.service.new_session_id(tenant, None, parent_id)
        self.sessions.append((tenant, sid))
        self.answers[sid], self.jobs[sid], self.schedules[sid] = {}, [], []
        return sid

    async def run(self, creates: list[SessionCreate], steps: list[tuple[int, Any]]) -> None:
        for tenant, body in zip(OWNERS, creates):
            sid = self.add_session(tenant)
            assert await self.write(tenant, sid, CreateSession(body=body))
        for which, s in steps:
            tenant, sid = self.sessions[which]
            if isinstance(s, ToolRound):
                if await self.write(tenant, sid, AddMessage(body=s.call)):
                    for call, c in zip(s.call.tool_calls or [], s.results):
                        await self.write(
                            tenant, sid, AddMessage(body=MessageCreate(role="tool", content=c, tool_call_id=call.id))
                        )
                continue
            if isinstance(s, Fork):
                events = await self.log(sid)
                version = max(1, round(len(events) * s.fraction))
                child = self.add_session(tenant, sid)  # copy-on-write: it reads the parent's log
                parent = fold(SessionState(id=sid), events[:version])
                if not await self.write(tenant, child, ForkSession(parent=parent)):
                    self.sessions.pop()
                    continue
                # decided on the parent's state renamed, not by folding the history: what the log folds to
                assert self.service.cache.get(tenant, child) == await self.store.load(tenant, child)
                continue
            if isinstance(s, ScheduleRound):
                for kind, n in s.ops:
                    await self.write(tenant, sid, self.schedule_command(sid, kind, n))
                continue
            await self.write(tenant, sid, self.command(sid, s))
        for _, sid in self.sessions:  # what the examples covered (--hypothesis-show-statistics)
            events = await self.log(sid)
            for kind in sorted({type(e).__name__ for e in events}):
                event(kind)
            event(f"log of {len(events) // 5 * 5}+ events")
            if any(isinstance(e, MessageAdded) and e.data.role == "tool" for e in events):
                event("tool result")

    def command(self, sid: str, s: Any) -> Command:
        if isinstance(s, Chat):
            job = uuid7()
            self.jobs[sid].append(job)
            request = ChatRequest(messages=s.messages, save=s.save, multitask=s.multitask)  # type: ignore[arg-type]
            return RequestChat(job_id=job, request=request, default_model="parley-offline")
        if isinstance(s, EndChat):
            jobs = self.jobs[sid] or ["00000000-0000-7000-8000-000000000000"]
            job = jobs[s.n % len(jobs)]
            return FailChat(job_id=job, code="model_error", message="boom") if s.fail else CancelChat(job_id=job)
        return s

    def schedule_command(self, sid: str, kind: str, n: int) -> Command:
        ids = self.schedules[sid]
        if kind == "create" or not ids:
            ids.append(uuid7())
            body = ScheduleCreate(cron="*/5 * * * *", messages=[MessageCreate(role="user", content="tick")])
            return CreateSchedule(schedule_id=ids[-1], body=body)
        target = ids[n % len(ids)]
        tick = Tick(schedule_id=target, at=datetime.now(UTC) + timedelta(minutes=n + 1))
        if kind in ("pause", "resume"):
            return UpdateSchedule(schedule_id=target, patch=SchedulePatch(paused=kind == "pause"))
        if kind == "delete":
            return DeleteSchedule(schedule_id=target)
        if kind == "fire":
            self.jobs[sid].append(job := uuid7())
            return RequestChat(job_id=job, request=ChatRequest(), default_model="parley-offline", tick=tick)
        return SkipTicks(tick=tick, reason="missed")

    async def write(self, tenant: str, sid: str, command: Command) -> bool:
        """Execute through the service layer; once the projector caught up, record what the service answers.
        False: refused, or nothing to append."""
        ended: list[int] = []

        def respond(state: SessionState, events: list[Event]) -> None:
            ended[:] = [state.version] if events else []
            return None

        try:
            await self.service.execute(tenant, sid, command, respond)
        except DomainError:
            return False
        if not ended:
            return False
        await self.live.catch_up([sid])
        self.answers[sid][ended[0]] = await self.answer(tenant, sid)
        return True

    async def answer(self, tenant: str, sid: str) -> Answer:
        """GET session / tools / messages as the API reads them (read-your-writes through the service)."""
        out: list[Any] = []
        for fetch in (
            lambda: self.store.session(tenant, sid),
            lambda: self.store.tools(tenant, sid),
            lambda: self.store.messages(tenant, sid, PAGE, 0),
        ):
            try:
                view = await self.service.read(sid, fetch)
            except NotFound:
                out.append(None)
                continue
            out.append(view.items if view.items is not None else view.body)
        return out[0], out[1], out[2]

    async def past(self, tenant: str, sid: str, version: int) -> Answer:
        """GET session / tools / messages ?version=N as the API answers them (None: 404 at a deletion)."""
        try:
            state = await self.service.at_version(tenant, sid, version)
        except VersionNotFound:
            raise
        except NotFound:
            return None, None, None
        assert state.session is not None
        view = await self.service.read_past(
            sid, lambda: self.store.messages(tenant, sid, PAGE, 0, state.message_count, version), version
        )
        return json_encode(state.session), json_encode(ToolList(state.session.tools)), view.items

    async def log(self, sid: str) -> list[Event]:
        return await self.store.read(sid, 0, 100_000)


def no_body(_state: SessionState, _events: list[Event]) -> None:
    return None


def folded_answer(state: SessionState, events: list[Event]) -> Answer:
    """What the service must answer for this fold of `events`."""
    if not state.exists:
        return None, None, None
    assert state.session is not None
    messages = [json_encode(e.data) for e in events if isinstance(e, MessageAdded)]
    return json_encode(state.session), json_encode(ToolList(state.session.tools)), messages


# -- reading the read models ------------------------------------------------------------------------


async def read_models(w: World) -> dict[str, Any]:
    """Everything the read side holds, generation-independent: the views the store serves (with their
    versions), the raw view hash (state decoded), the message pointers, the snapshots, the chat records,
    the tenant index and each tenant's session list."""
    r, out = w.redis, {}
    for tenant, sid in w.sessions:
        _, _, g = await w.history.head(sid)
        raw = {k.decode(): v for k, v in (await r.hgetall(KEYS.view(sid, g))).items()}
        state = decode_state(raw.pop("st")) if "st" in raw else None
        snaps = {int(v): decode_state(s) for v, s in (await r.hgetall(KEYS.snapshots(sid, g))).items()}
        jobs = sorted(j.decode() for j in await r.zrange(KEYS.chats(sid), 0, -1))
        out[sid] = {
            "session": await w.store.session(tenant, sid),
            "tools": await w.store.tools(tenant, sid),
            "messages": await w.store.messages(tenant, sid, PAGE, 0),
            "view": raw,
            "state": state,
            "pointers": [int(v.split(b"|")[0]) for v in await r.lrange(KEYS.messages(sid, g), 0, -1)],
            "snapshots": snaps,
            "jobs": {j: await r.hgetall(KEYS.chat(sid, j)) for j in jobs},
            "indexed": await r.zscore(KEYS.index(partition_of(sid, KEYS.partitions), tenant), sid) is not None,
            "next_tick": await r.zscore(KEYS.schedules(partition_of(sid, KEYS.partitions)), f"{tenant}/{sid}"),
        }
    for tenant in TENANTS:
        out[tenant] = await w.service.read_sessions(tenant, PAGE, 0)
    return out


async def assert_read_models_equal_fold(w: World, models: dict[str, Any]) -> None:
    live_of: dict[str, list[tuple[str, bytes]]] = {t: [] for t in TENANTS}
    for tenant, sid in w.sessions:
        events = await w.log(sid)
        state = fold(SessionState(id=sid), events)
        m = models[sid]
        assert m["state"] == state
        assert m["view"]["v"] == b"%d" % state.version and m["view"]["t"] == tenant.encode()
        for name in ("session", "tools", "messages"):
            assert (m[name].head, m[name].version) == (state.version, state.version), name
        session, tools_json, messages = folded_answer(state, events)
        assert m["session"].body == session
        assert m["tools"].body == tools_json
        assert m["messages"].items == (messages if state.exists else [])
        assert m["pointers"] == [e.version for e in events if isinstance(e, MessageAdded)]
        assert m["snapshots"] == {
            e.version: fold(SessionState(id=sid), events[: e.version]) for e in events if e.version % SNAP == 0
        }
        assert m["indexed"] == state.exists
        assert m["next_tick"] == next_tick_ms(state)
        if state.exists:
            live_of[tenant].append((sid, json_encode(state.session)))
    for tenant in TENANTS:
        assert models[tenant] == [body for _, body in sorted(live_of[tenant], reverse=True)]


async def generation_keys(redis: Redis, sid: str) -> set[str]:
    """Every read-model key of the session that exists, any generation."""
    found: set[str] = set()
    for kind in ("view", "msgs", "snaps"):
        async for key in redis.scan_iter(match=f"*:{kind}:{sid}*", count=1000):
            found.add(key.decode())
    return found


async def assert_only_live_generation(w: World) -> None:
    for _, sid in w.sessions:
        _, _, g = await w.history.head(sid)
        live = {KEYS.view(sid, g), KEYS.messages(sid, g), KEYS.snapshots(sid, g)}
        found = await generation_keys(w.redis, sid)
        assert KEYS.view(sid, g) in found
        assert found <= live, f"session {sid} (generation {g}) keeps other generations' keys: {sorted(found - live)}"


async def assert_time_travel(w: World) -> None:
    """At every version: what the service answered right after the write that ended there, and the fold
    of the log up to it (for versions inside a multi-event write, the fold only)."""
    checked = 0
    for tenant, sid in w.sessions:
        events = await w.log(sid)
        head = len(events)
        state = SessionState(id=sid)
        for v in range(1, head + 1):
            state = fold(state, [events[v - 1]])
            got = await w.past(tenant, sid, v)
            assert got == folded_answer(state, events[:v]), f"{sid} at version {v}"
            if v in w.answers[sid]:
                assert got == w.answers[sid][v], f"{sid} at version {v}: not what the service answered then"
                checked += 1
        for outside in (0, head + 1):
            with pytest.raises(VersionNotFound):
                await w.service.at_version(tenant, sid, outside)
    assert checked == sum(len(a) for a in w.answers.values())


def run_example(url: str | None, scenario) -> None:
    async def main() -> None:
        async with connected(url) as redis:
            with snapshot_interval(SNAP):
                await scenario(redis)

    asyncio.run(main())


# -- the properties ------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(h=history, scope_kind=st.sampled_from(["session", "tenant", "all"]), which=st.integers(0, len(OWNERS) - 1))
def test_rebuilt_read_models_equal_the_live_ones_and_a_fresh_fold(backend, h, scope_kind, which):
    creates, steps = h

    async def scenario(redis: Redis) -> None:
        w = World.on(redis)
        await w.run(creates, steps)
        before = await read_models(w)
        await assert_read_models_equal_fold(w, before)
        gens = {sid: (await w.history.head(sid))[2] for _, sid in w.sessions}

        tenant, sid = w.sessions[which]
        scope = {"session": Scope(session_id=sid), "tenant": Scope(tenant=tenant), "all": Scope()}[scope_kind]
        rebuilt = {
            s for t, s in w.sessions if scope_kind == "all" or (scope_kind == "tenant" and t == tenant) or s == sid
        }
        report = await w.rebuilder().run(scope)

        assert report.sessions == len(rebuilt)
        assert report.events == sum([(await w.history.head(s))[0] for s in rebuilt])
        after = await read_models(w)
        assert after == before
        await assert_read_models_equal_fold(w, after)
        for _, s in w.sessions:
            assert (await w.history.head(s))[2] == gens[s] + (s in rebuilt), f"generation of {s}"
        await assert_only_live_generation(w)
        assert not await redis.exists(KEYS.rebuild(scope.name))

    run_example(backend, scenario)


@PROPERTY_SETTINGS
@given(h=history)
def test_time_travel_at_every_version_equals_what_the_service_answered(backend, h):
    creates, steps = h

    async def scenario(redis: Redis) -> None:
        w = World.on(redis)
        await w.run(creates, steps)
        await assert_time_travel(w)
        for tenant, sid in w.sessions:  # writes the live projection has not caught up with: the rebuild brings both
            with contextlib.suppress(DomainError):
                await w.service.execute(
                    tenant, sid, AddMessage(body=MessageCreate(role="user", content="late")), no_body
                )
        await asyncio.wait_for(w.rebuilder().run(Scope()), REBUILD_TIMEOUT_S)
        assert all([(await w.history.head(s))[2] == 1 for _, s in w.sessions])  # snapshots and pointers of gen 1
        await assert_read_models_equal_fold(w, await read_models(w))
        await assert_time_travel(w)

    run_example(backend, scenario)


@PROPERTY_SETTINGS
@given(h=history, doomed=st.integers(0, len(OWNERS) - 1))
def test_rebuilding_twice_is_idempotent_and_a_deleted_session_stays_deleted(backend, h, doomed):
    creates, steps = h

    async def scenario(redis: Redis) -> None:
        w = World.on(redis)
        await w.run(creates, steps)
        tenant, sid = w.sessions[doomed]
        await w.write(tenant, sid, DeleteSession())  # refused if the history already deleted it
        deleted_at = len(await w.log(sid))
        index = KEYS.index(partition_of(sid, KEYS.partitions), tenant)
        total = sum([len(await w.log(s)) for _, s in w.sessions])

        before = await read_models(w)
        # damage the read models as a bug in projection code would: the rebuild repairs them from the log
        await redis.zadd(index, {sid: 0})
        _, other = w.sessions[(doomed + 1) % len(OWNERS)]
        await redis.hset(KEYS.view(other), "j", b'{"damaged":true}')
        first = await w.rebuilder().run(Scope())
        once = await read_models(w)
        second = await w.rebuilder().run(Scope())
        twice = await read_models(w)

        assert once == before
        assert twice == before
        assert (first.sessions, first.events) == (second.sessions, second.events) == (len(w.sessions), total)
        await assert_read_models_equal_fold(w, twice)
        await assert_only_live_generation(w)
        for _, s in w.sessions:
            assert (await w.history.head(s))[2] == 2

        assert await redis.zscore(index, sid) is None
        with pytest.raises(NotFound):
            await w.service.read(sid, lambda: w.store.session(tenant, sid))
        with pytest.raises(NotFound):
            await w.service.at_version(tenant, sid, deleted_at)
        assert sid not in [json.loads(b)["id"] for b in await w.service.read_sessions(tenant, PAGE, 0)]
        assert sid in await w.history.session_ids(tenant)  # still in the registry a rebuild walks
        events = await w.log(sid)
        for v in range(1, deleted_at):
            got = await w.past(tenant, sid, v)
            assert got == folded_answer(fold(SessionState(id=sid), events[:v]), events[:v]), f"version {v}"
            if v in w.answers[sid]:
                assert got == w.answers[sid][v], f"version {v}: not what the service answered then"

    run_example(backend, scenario)


# -- the real snapshot interval ----------------------------------------------------------------------


async def test_time_travel_across_real_snapshots_of_a_long_history(redis):
    """~350 events with the real interval: snapshots at 100, 200 and 300, time travel around each of them
    equals what the service answered then, folds from the nearest snapshot, and survives a rebuild."""
    assert SNAPSHOT_EVERY == 100
    w = World.on(redis)
    tenant = "acme"
    sid = w.add_session(tenant)
    tool_list = [Tool(type="function", function=FunctionDef(name="lookup"))]
    assert await w.write(tenant, sid, CreateSession(body=SessionCreate(agent_id="a", tools=tool_list)))
    i, v, last_call = 0, 1, None
    while v < 350:
        i += 1
        if v in (99, 199, 297):  # one write of two events: 100-101 and 200-201 (a snapshot inside a write), 298-299
            command: Command = UpdateSession(patch=SessionPatch(situation=f"s{i}", tools=tool_list[: i % 2]))
        elif last_call is not None:
            command = AddMessage(body=MessageCreate(role="tool", content=f"result {i}", tool_call_id=last_call))
            last_call = None
        elif i % 7 == 0:
            last_call = f"c{i}"
            call = ToolCall(id=last_call, function=FunctionCall(name="lookup", arguments="{}"))
            command = AddMessage(body=MessageCreate(role="assistant", content=None, tool_calls=[call]))
        else:
            command = AddMessage(
                body=MessageCreate(role="user", content=[TextPart(text=f"m{i}")] if i % 3 else f"m{i}")
            )
        assert await w.write(tenant, sid, command), f"write {i} was refused"
        v = max(w.answers[sid])
    events = await w.log(sid)
    head = len(events)
    assert head == v == 350
    assert not {100, 200, 298} & set(w.answers[sid])
    assert {101, 201, 299} <= set(w.answers[sid])

    snaps = {int(n): decode_state(s) for n, s in (await redis.hgetall(KEYS.snapshots(sid))).items()}
    assert snaps == {n: fold(SessionState(id=sid), events[:n]) for n in (100, 200, 300)}

    async def check(versions: list[int]) -> None:
        for n in versions:
            got = await w.past(tenant, sid, n)
            assert got == folded_answer(fold(SessionState(id=sid), events[:n]), events[:n]), f"version {n}"
            if n in w.answers[sid]:
                assert got == w.answers[sid][n], f"version {n}: not what the service answered then"

    await check([1, 2, 99, 100, 101, 102, 150, 199, 200, 201, 202, 298, 299, 300, 301, 302, head - 1, head])
    # the script folds from the nearest snapshot at or below the version: at most one interval of events
    for n, base in ((99, 0), (100, 100), (101, 100), (299, 200), (300, 300), (head, 300)):
        reply = await TIME_TRAVEL(
            redis, [KEYS.head(sid), KEYS.snapshots(sid), KEYS.log(sid)], [tenant, n, SNAPSHOT_EVERY, 0]
        )
        assert int(reply[1]) == base and len(reply[3]) == n - base, f"version {n}"

    await w.rebuilder().run(Scope(session_id=sid))
    assert (await w.history.head(sid))[2] == 1
    rebuilt = {int(n): decode_state(s) for n, s in (await redis.hgetall(KEYS.snapshots(sid, 1))).items()}
    assert rebuilt == snaps
    assert await generation_keys(redis, sid) == {KEYS.view(sid, 1), KEYS.messages(sid, 1), KEYS.snapshots(sid, 1)}
    await check(list(range(1, head + 1)))


# -- a purge while the rebuild reads ahead ----------------------------------------------------------------


class HookedRedis:
    """The Redis client, with a hook run after each pipeline that reads logs (XRANGE, beside their heads) got its
    replies (before its caller sees them): lets a test decide how a read and a write in flight interleave."""

    def __init__(self, redis: Redis, after_xrange) -> None:
        self._redis, self._after_xrange = redis, after_xrange

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self._redis.pipeline(*args, **kwargs)
        execute = pipe.execute

        async def hooked(*a: Any, **kw: Any) -> Any:
            if hasattr(pipe, "command_stack"):
                names = {c[0][0] for c in pipe.command_stack}
            else:  # a cluster pipeline
                names = {c.args[0] for c in pipe._command_stack}
            replies = await execute(*a, **kw)
            if "XRANGE" in names:
                await self._after_xrange()
            return replies

        pipe.execute = hooked
        return pipe


async def append_events(store: RedisStore, tenant: str, sid: str, n: int) -> None:
    """A session of `n` events (messages and, every 50, an update naming the session) in one APPEND."""
    state, events = SessionState(id=sid), []
    for i in range(n):
        if i == 0:
            command: Command = CreateSession(body=SessionCreate(agent_id=sid))
        elif i % 50 == 0:
            command = UpdateSession(patch=SessionPatch(situation=f"{sid} at {i}"))
        else:
            command = AddMessage(body=MessageCreate(role="user", content=f"{sid} #{i}"))
        new = decide(state, command, Stamp(now=datetime.now(UTC), new_id=uuid7))
        state = fold(state, new)
        events += new
    assert (await store.append(tenant, sid, 0, events)).version == n  # type: ignore[union-attr]


async def test_a_session_purged_while_the_rebuild_reads_ahead_leaves_the_others_their_own_logs(redis):
    """The rebuild reads the next round of every session's log while it folds and writes the current one. Here
    a session is purged mid-rebuild and its write (of round 1) is refused just while the read of round 3 is in
    flight: the sessions built beside it must still end with their own log's fold, not a neighbour's."""
    w = World.on(redis)
    size = 2 * READ_BATCH + 500  # three rounds of reads
    sids = sorted(w.add_session("acme") for _ in range(3))
    for sid in sids:
        await append_events(w.store, "acme", sid, size)
    await w.live.catch_up(sids)
    doomed, kept = sids[0], sids[1:]

    reads, read_in_flight, write_done = [0], asyncio.Event(), asyncio.Event()

    async def after_xrange() -> None:
        reads[0] += 1
        if reads[0] == 3:  # round 3's replies are in: hold them until round 1's write was answered
            read_in_flight.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(write_done.wait(), 5)
            await asyncio.sleep(0.01)  # the rebuild's own task handles that answer first

    rebuilder = Rebuilder(
        w.store,
        RedisHistory(HookedRedis(redis, after_xrange), KEYS),
        Projection(w.store, RedisFeed(redis, KEYS, "ops")),
    )
    write, writes = rebuilder._write, [0]

    async def purge_then_write(updates, gens):  # round 1's write: the doomed session is purged just before it
        writes[0] += 1
        if writes[0] != 1:
            return await write(updates, gens)
        await history_ops.purge(w.service, w.history, "acme", doomed)
        answered = await write(updates, gens)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(read_in_flight.wait(), 5)
        write_done.set()
        return answered

    rebuilder._write = purge_then_write  # type: ignore[method-assign]
    try:
        await asyncio.wait_for(rebuilder.run(Scope()), REBUILD_TIMEOUT_S)  # a second, unhindered
    except TimeoutError:
        stuck = []
        for sid in kept:
            head, _, g = await w.history.head(sid)
            stuck.append((sid, head, await w.history.view_version(sid, g + 1)))
        pytest.fail(f"the rebuild never finished: (session, head, its new generation's version) {stuck}")

    assert reads[0] >= 3 and writes[0] >= 1
    assert (await w.history.head(doomed))[1] is None
    assert await generation_keys(redis, doomed) == set()
    for sid in kept:
        events = await w.log(sid)
        state = fold(SessionState(id=sid), events)
        g = (await w.history.head(sid))[2]
        view = await redis.hgetall(KEYS.view(sid, g))
        assert decode_state(view[b"st"]) == state, f"{sid}: its rebuilt state is not its log's fold"
        assert view[b"j"] == json_encode(state.session), f"{sid}: serves another session's state"
        assert (await w.service.read(sid, lambda: w.store.session("acme", sid))).body == json_encode(state.session)
