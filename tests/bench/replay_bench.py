"""Rows P6 (rebuild rate) and P5tt (time travel at version ~100,000 against version ~100). See docs/performance.md.

P6: `Rebuilder.run` (services/worker/rebuild.py, built as `parley rebuild` builds it, without the progress bar)
folds a realistic log into a new generation; the ceiling is a pipelined XRANGE read of the same log, with the
same client, in the same process and run, alternating with the rebuild repetition by repetition. The log: many
ordinary sessions (messages mostly; some metadata patches, tool-list changes and tool calls with their results)
in a tenant of their own, and one long session. Both are measured on their own (a rebuild pipelines across
sessions, so one long session is its worst case) and together.

P5tt: `GET /sessions/{id}?version=N` and `GET …/messages?version=N&limit=20` over HTTP against `parley api`,
for N drawn at random from 100..199 and from 100,000..100,099 of the long session, so both spreads fold between
0 and 99 events from their snapshot; p50/p99 and the ratio far/near. `RedisStore.at_version` in process for the
same spreads is the secondary figure.

Run by the harness: python -m tests.bench --rows P6,P5tt [--quick] [--reps N] [--seconds S]
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

from shared import bootstrap
from shared.adapters.redis.connect import connect
from shared.adapters.redis.keys import Keys
from shared.adapters.redis.store import RedisStore
from shared.app.ports import Appended
from shared.app.rebuild import BATCH, Rebuilder, Scope
from shared.config import Settings
from shared.domain.commands import AddMessage, CreateSession, Stamp, UpdateSession, decide
from shared.domain.events import Event
from shared.domain.ids import uuid7
from shared.domain.projection import SNAPSHOT_EVERY
from shared.domain.state import SessionState, fold
from shared.domain.wire import FunctionCall, FunctionDef, MessageCreate, SessionCreate, SessionPatch, Tool, ToolCall
from tests.bench.harness import KEY, PARTITIONS, ROOT, TENANT, Bench

REPLAY_TENANT = "replay"
"""The many ordinary sessions live in a tenant of their own, so what other rows wrote is not rebuilt with them."""
XRANGE_COUNT = 500
"""Entries per XRANGE call of the ceiling (the rebuild's LOAD reads as many per call: `LOAD_BATCH`)."""
APPEND_EVENTS = 1_000
NEAR, FAR = 100, 100_000
SPREAD = 100
"""Versions N .. N+99: from the snapshot at N, each request folds 0 to 99 events."""
SAMPLES = 400
"""Random versions drawn per spread; the load generator cycles through them."""

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """On uvloop where installed, as `parley rebuild` runs (services/cli.py `_run`)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _sizes(quick: bool) -> dict[str, int]:
    if quick:
        return {"sessions": 10, "events": 50, "far": 1_000}
    return {"sessions": 200, "events": 500, "far": FAR}


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# -- the log ----------------------------------------------------------------------------------
TOOLS = [
    Tool(
        type="function",
        function=FunctionDef(
            name="lookup",
            description="Find a record",
            parameters={"type": "object", "properties": {"q": {"type": "string"}}},
        ),
    ),
    Tool(
        type="function",
        function=FunctionDef(
            name="weather",
            description="Weather at a place",
            parameters={"type": "object", "properties": {"city": {"type": "string"}}},
        ),
    ),
]
WORDS = "the a session event log user agent answer question tool call result rebuild fold snapshot version redis stream".split()


def _text(rng: random.Random, lo: int, hi: int) -> str:
    n = rng.randint(lo, hi)
    out: list[str] = []
    size = 0
    while size < n:
        w = rng.choice(WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n]


MIX = {"patch": 0.02, "tools": 0.01, "tool_call": 0.02}
"""Per step of a session's log: the chance of a metadata patch, of a tool-list change and of a tool call (an
assistant message calling a tool, then the tool's result: two events); otherwise a user or assistant turn."""


def session_log(rng: random.Random, events: int) -> tuple[str, list[Event]]:
    """A session of `events` events, decided and folded like the API does, in the proportions of `MIX`: per 100
    events about 2 metadata patches, 1 tool-list change, 4 tool-call events and 93 messages (user and assistant
    turns of 40 to 1,200 characters). Each call is answered at once, so the state holds no open tool calls and
    stays the same size at version 100 and 100,000."""
    stamp = Stamp(now=datetime.now(UTC), new_id=uuid7)
    state = SessionState(id=uuid7())
    body = SessionCreate(
        agent_id="agent-1",
        user_id=f"user-{rng.randint(1, 50)}",
        situation=_text(rng, 50, 300),
        tools=TOOLS[:1],
        metadata={"channel": "web", "locale": "en"},
    )
    out = decide(state, CreateSession(body=body), stamp)
    state = fold(state, out)
    user_turn = True
    while state.version < events:
        r = rng.random()
        left = events - state.version
        if r < MIX["patch"]:
            cmd: Any = UpdateSession(
                patch=SessionPatch(
                    metadata={"channel": "web", "locale": "en", "turn": state.version, "topic": rng.choice(WORDS)}
                )
            )
        elif r < MIX["patch"] + MIX["tools"]:
            cmd = UpdateSession(patch=SessionPatch(tools=TOOLS[: rng.randint(1, 2)]))
        elif r < MIX["patch"] + MIX["tools"] + MIX["tool_call"] and left >= 2:
            call_id = f"call_{uuid7().replace('-', '')[-24:]}"
            call = ToolCall(
                id=call_id, function=FunctionCall(name="lookup", arguments=json.dumps({"q": _text(rng, 10, 60)}))
            )
            new = decide(
                state, AddMessage(body=MessageCreate(role="assistant", content=None, tool_calls=[call])), stamp
            )
            state = fold(state, new)
            out += new
            cmd = AddMessage(body=MessageCreate(role="tool", tool_call_id=call_id, content=_text(rng, 40, 600)))
        else:
            cmd = AddMessage(
                body=MessageCreate(role="user" if user_turn else "assistant", content=_text(rng, 40, 1_200))
            )
            user_turn = not user_turn
        new = decide(state, cmd, stamp)
        state = fold(state, new)
        out += new
    return state.id, out


async def _append(store: RedisStore, tenant: str, sid: str, events: list[Event]) -> str:
    for i in range(0, len(events), APPEND_EVENTS):
        outcome = await store.append(tenant, sid, i, events[i : i + APPEND_EVENTS])
        if not isinstance(outcome, Appended):
            raise RuntimeError(f"seeding {sid}: {outcome!r}")
    return sid


async def seed(redis_url: str, tenant: str, sessions: int, events: int, seed_no: int) -> list[str]:
    """Append `sessions` logs of `events` events each through `RedisStore.append` (a few at a time)."""
    redis = connect(redis_url)
    store = RedisStore(redis, Keys(PARTITIONS))
    rng = random.Random(seed_no)
    logs = [session_log(rng, events) for _ in range(sessions)]
    gate = asyncio.Semaphore(8)

    async def one(sid: str, log: list[Event]) -> str:
        async with gate:
            return await _append(store, tenant, sid, log)

    try:
        return await asyncio.gather(*(one(sid, log) for sid, log in logs))
    finally:
        await redis.aclose()


async def wait_projected(redis_url: str, tenant: str, session_ids: list[str], timeout: float = 600.0) -> None:
    """Until the running worker's projector has every event of these sessions in their read models."""
    redis = connect(redis_url)
    store = RedisStore(redis, Keys(PARTITIONS))
    deadline = time.monotonic() + timeout
    try:
        todo = list(session_ids)
        while todo:
            views = await asyncio.gather(*(store.session(tenant, sid) for sid in todo))
            todo = [sid for sid, v in zip(todo, views) if v.head == 0 or v.version < v.head]
            if todo:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the projector did not catch up with {len(todo)} sessions")
                await asyncio.sleep(0.2)
    finally:
        await redis.aclose()


# -- P6 -----------------------------------------------------------------------------------
async def xrange_all(
    redis: Any, keys: Keys, session_ids: list[str], count: int = XRANGE_COUNT, width: int = BATCH
) -> int:
    """Every event of these sessions with pipelined XRANGE: `width` sessions per pipeline (the rebuild's batch),
    `count` entries per call, until each log is read. Answers the entries read."""
    total = 0
    for i in range(0, len(session_ids), width):
        todo = {sid: 1 for sid in session_ids[i : i + width]}  # the next version to read
        while todo:
            pipe = redis.pipeline(transaction=False)
            for sid, start in todo.items():
                pipe.xrange(keys.log(sid), f"{start}-0", "+", count=count)
            replies = await pipe.execute()
            nxt = {}
            for (sid, start), entries in zip(todo.items(), replies):
                total += len(entries)
                if len(entries) == count:
                    nxt[sid] = start + count
            todo = nxt
    return total


async def rebuilder(redis_url: str) -> tuple[Rebuilder, bootstrap.Parley]:
    """As `parley rebuild` builds it (services/ops.py: the composition root, a long deadline), no progress bar."""
    parley = await bootstrap.start(
        Settings.from_env(redis_url=redis_url, partitions=PARTITIONS), timeout_s=120, wait_for_store=False
    )
    return parley.rebuilder(), parley


async def _timed(fn: Callable[[], Awaitable[int]]) -> tuple[int, float]:
    t = time.perf_counter()
    n = await fn()
    return n, time.perf_counter() - t


async def p6_rep(redis_url: str, many: list[str], big: str, flip: bool) -> dict[str, float]:
    """One repetition: the ceiling and the rebuild of the many sessions, then of the long session (in the order
    `flip` says, so neither always runs first)."""
    redis = connect(redis_url)
    keys = Keys(PARTITIONS)
    rb, parley = await rebuilder(redis_url)
    out: dict[str, float] = {}

    async def rebuild(scope: Scope) -> int:
        report = await rb.run(scope)
        return report.events

    try:
        for name, sids, scope in (("many", many, Scope(tenant=REPLAY_TENANT)), ("long", [big], Scope(session_id=big))):
            xr = lambda sids=sids: xrange_all(redis, keys, sids)  # noqa: E731
            rbf = lambda scope=scope: rebuild(scope)  # noqa: E731
            steps = [("xrange", xr), ("rebuild", rbf)]
            for what, fn in reversed(steps) if flip else steps:
                n, s = await _timed(fn)
                out[f"{name}_{what}_events"] = n
                out[f"{name}_{what}_s"] = s
    finally:
        await parley.close()
        await redis.aclose()
    return out


def p6(bench: Bench, state: dict[str, Any]) -> None:
    a = bench.args
    size = _sizes(a.quick)
    many, big = state["many"], state["big"]
    runs = []
    for rep in range(a.reps):
        run = _run(p6_rep(bench.redis_server.url, many, big, flip=rep % 2 == 1))
        for name in ("many", "long"):
            if run[f"{name}_rebuild_events"] != run[f"{name}_xrange_events"]:
                raise RuntimeError(
                    f"P6 {name}: the rebuild folded {run[f'{name}_rebuild_events']} events, the log holds {run[f'{name}_xrange_events']}"
                )
        run["all_xrange_eps"] = (run["many_xrange_events"] + run["long_xrange_events"]) / (
            run["many_xrange_s"] + run["long_xrange_s"]
        )
        run["all_rebuild_eps"] = (run["many_rebuild_events"] + run["long_rebuild_events"]) / (
            run["many_rebuild_s"] + run["long_rebuild_s"]
        )
        for name in ("many", "long"):
            run[f"{name}_xrange_eps"] = run[f"{name}_xrange_events"] / run[f"{name}_xrange_s"]
            run[f"{name}_rebuild_eps"] = run[f"{name}_rebuild_events"] / run[f"{name}_rebuild_s"]
        for name in ("all", "many", "long"):
            run[f"{name}_ratio"] = run[f"{name}_rebuild_eps"] / run[f"{name}_xrange_eps"]
        print("P6 rep: " + json.dumps({k: round(v, 3) for k, v in run.items()}), flush=True)
        runs.append(run)

    def m(field: str) -> float:
        return statistics.median(r[field] for r in runs)

    bench.record(
        "P6",
        log=f"{size['sessions']} sessions x {size['events']} events (tenant {REPLAY_TENANT}) + 1 session x {state['big_events']} events",
        events=int(runs[0]["many_xrange_events"] + runs[0]["long_xrange_events"]),
        rebuild_eps=m("all_rebuild_eps"),
        xrange_eps=m("all_xrange_eps"),
        ratio=m("all_ratio"),
        many_rebuild_eps=m("many_rebuild_eps"),
        many_xrange_eps=m("many_xrange_eps"),
        many_ratio=m("many_ratio"),
        long_rebuild_eps=m("long_rebuild_eps"),
        long_xrange_eps=m("long_xrange_eps"),
        long_ratio=m("long_ratio"),
        ratios_per_rep=[round(r["all_ratio"], 3) for r in runs],
        goal="ratio (rebuild events/s / pipelined XRANGE events/s) >= 0.5",
    )


# -- P5tt -----------------------------------------------------------------------------------
def _spreads(far: int, n: int, seed_no: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed_no)
    return [rng.randrange(NEAR, NEAR + SPREAD) for _ in range(n)], [rng.randrange(far, far + SPREAD) for _ in range(n)]


def http_latency(bench: Bench, paths: list[str], seconds: float) -> dict:
    """One connection, back to back (closed loop), our load generator in its own process: per-request latency."""
    spec = {
        "url": bench.api.url,
        "paths": paths,
        "seconds": seconds,
        "key": KEY,
        "method": "GET",
        "body": None,
        "mode": "closed",
        "connections": 1,
    }
    out = subprocess.run(
        [sys.executable, "-m", "tests.bench.loadgen", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout)


async def store_latency(redis_url: str, tenant: str, sid: str, versions: list[int], rounds: int) -> dict[str, float]:
    redis = connect(redis_url)
    store = RedisStore(redis, Keys(PARTITIONS))
    await store.load_scripts()
    times: list[float] = []
    try:
        for _ in range(rounds):
            for n in versions:
                t = time.perf_counter()
                head, state = await store.at_version(tenant, sid, n)
                times.append(time.perf_counter() - t)
                assert state is not None and state.version == n, (head, n)
    finally:
        await redis.aclose()
    return {"p50_ms": _pct(times, 0.5) * 1000, "p99_ms": _pct(times, 0.99) * 1000, "calls": len(times)}


async def snapshot_sizes(redis_url: str, sid: str, versions: list[int]) -> list[int]:
    redis = connect(redis_url)
    keys = Keys(PARTITIONS)
    try:
        g = int(await redis.hget(keys.head(sid), "g") or 0)
        return [len(await redis.hget(keys.snapshots(sid, g), str(v)) or b"") for v in versions]
    finally:
        await redis.aclose()


def p5tt(bench: Bench, state: dict[str, Any]) -> None:
    a = bench.args
    far = _sizes(a.quick)["far"]
    sid = state["big"]
    near_v, far_v = _spreads(far, SAMPLES, 7)
    # the long session is projected (the live projector writes a snapshot every SNAPSHOT_EVERY versions)
    sizes = _run(snapshot_sizes(bench.redis_server.url, sid, [NEAR, far]))
    if not all(sizes):
        raise RuntimeError(f"no snapshot at versions {NEAR} and {far} of {sid}: {sizes}")
    for n in (NEAR, far):  # the answer is right: the session as it was at that version
        body = bench.http.get(f"/sessions/{sid}", params={"version": n})
        bench.errors += body.status_code != 200 or body.json()["version"] != n
    seconds = a.seconds
    kinds = {
        "session": lambda v: f"/sessions/{sid}?version={v}",
        "messages20": lambda v: f"/sessions/{sid}/messages?version={v}&limit=20",
    }
    runs: dict[str, list[dict]] = {f"{k}_{w}": [] for k in kinds for w in ("near", "far")}
    store_runs: dict[str, list[dict]] = {"near": [], "far": []}
    for rep in range(a.reps):
        order = [("near", near_v), ("far", far_v)]
        if rep % 2:
            order.reverse()
        for kind, path in kinds.items():
            for where, versions in order:
                r = http_latency(bench, [path(v) for v in versions], seconds)
                print(f"P5tt rep {rep} {kind} {where}: " + json.dumps(r), flush=True)
                runs[f"{kind}_{where}"].append(r)
        for where, versions in order:
            r = _run(store_latency(bench.redis_server.url, TENANT, sid, versions, 1 if a.quick else 5))
            print(f"P5tt rep {rep} at_version {where}: " + json.dumps(r), flush=True)
            store_runs[where].append(r)
    bench.check([r for rs in runs.values() for r in rs])

    def m(rs: list[dict], field: str) -> float:
        return statistics.median(r[field] for r in rs)

    out: dict[str, Any] = {
        "session_events": state["big_events"],
        "near_versions": f"{NEAR}..{NEAR + SPREAD - 1}",
        "far_versions": f"{far}..{far + SPREAD - 1}",
        "snapshot_every": SNAPSHOT_EVERY,
        f"state_bytes_at_{NEAR}": sizes[0],
        f"state_bytes_at_{far}": sizes[1],
    }
    for kind in kinds:
        near, farr = runs[f"{kind}_near"], runs[f"{kind}_far"]
        for q in ("p50_ms", "p99_ms"):
            out[f"{kind}_near_{q}"] = m(near, q)
            out[f"{kind}_far_{q}"] = m(farr, q)
        out[f"{kind}_p50_ratio"] = out[f"{kind}_far_p50_ms"] / out[f"{kind}_near_p50_ms"]
        out[f"{kind}_p99_ratio"] = out[f"{kind}_far_p99_ms"] / out[f"{kind}_near_p99_ms"]
        out[f"{kind}_near_rps"] = m(near, "rps")
        out[f"{kind}_far_rps"] = m(farr, "rps")
    for q in ("p50_ms", "p99_ms"):
        out[f"at_version_near_{q}"] = m(store_runs["near"], q)
        out[f"at_version_far_{q}"] = m(store_runs["far"], q)
    out["at_version_p50_ratio"] = out["at_version_far_p50_ms"] / out["at_version_near_p50_ms"]
    out["at_version_p99_ratio"] = out["at_version_far_p99_ms"] / out["at_version_near_p99_ms"]
    bench.record("P5tt", **out, goal="far/near latency ratio (p50 and p99) <= 1.2")


# -- entry ----------------------------------------------------------------------------------
def prepare(bench: Bench, rows: set[str]) -> dict[str, Any]:
    """Seed the long session (both rows) and, for P6, the many sessions; wait until the worker projected them."""
    a = bench.args
    size = _sizes(a.quick)
    url = bench.redis_server.url
    state: dict[str, Any] = {"big_events": size["far"] + 2 * SPREAD}
    t = time.perf_counter()
    state["big"] = _run(seed(url, TENANT, 1, state["big_events"], 1))[0]
    if "P6" in rows:
        state["many"] = _run(seed(url, REPLAY_TENANT, size["sessions"], size["events"], 2))
    seeded = time.perf_counter() - t
    _run(wait_projected(url, TENANT, [state["big"]]))
    if "P6" in rows:
        _run(wait_projected(url, REPLAY_TENANT, state["many"]))
    print(f"replay_bench: seeded in {seeded:.1f} s, projected after {time.perf_counter() - t:.1f} s", flush=True)
    return state


def run(bench: Bench, rows: set[str]) -> None:
    state = prepare(bench, rows)
    if "P6" in rows:
        p6(bench, state)
    if "P5tt" in rows:
        p5tt(bench, state)
