"""History operations against real processes: `parley rebuild` under concurrent writes and killed halfway
(between sessions, and inside one long session), and `parley export` / `parley import` between two
deployments, byte for byte; an import of a file that is no consistent session is refused and writes nothing.

Every test runs its own redis-server (AOF, fsync always) and, where it needs them, `parley api` / `parley worker`
processes; it runs the `parley` CLI as a subprocess, as an operator does, and talks HTTP to the API. Bulk history that only has to exist (so a rebuild
takes long enough to be interrupted or overlapped) is appended straight to the log through `RedisStore.append`,
as `parley import` does; the worker projects it like any other write.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis as redis_sync
from redis.asyncio import Redis

from shared.adapters.codec import decode_event, decode_state, json_encode
from shared.adapters.redis.keys import Keys, partition_of
from shared.adapters.redis.server import RedisServer
from shared.adapters.redis.store import RedisStore
from shared.domain.commands import AddMessage, Command, CreateSession, Stamp, UpdateSession, decide
from shared.domain.events import Event, EventPage, MessageAdded
from shared.domain.ids import uuid7
from shared.domain.projection import SNAPSHOT_EVERY
from shared.domain.state import SessionState, fold
from shared.domain.wire import (
    FunctionCall,
    FunctionDef,
    MessageCreate,
    SessionCreate,
    SessionPatch,
    Tool,
    ToolCall,
    ToolList,
)
from tests.support import API_KEYS, ROOT, ParleyProcess, auth, wait_ready

pytestmark = pytest.mark.slow

PARLEY = Path(sys.executable).parent / "parley"
CLI_TIMEOUT_S = 60.0
"""Hard bound on one `parley rebuild | export | import` run."""
READY_TIMEOUT_S = 20.0
PROJECTED_TIMEOUT_S = 30.0
"""Hard bound on the worker projecting the seeded history."""
OTHER_KEYS = API_KEYS + ",other:other-key"
OTHER = {"Authorization": "Bearer other-key"}
ACME = auth("acme")


# -- processes ---------------------------------------------------------------------------------------


def cli(
    redis_url: str, *args: str, stdin: bytes | None = None, timeout: float = CLI_TIMEOUT_S
) -> subprocess.CompletedProcess[bytes]:
    """`parley <args>` against this Redis, as an operator runs it."""
    return subprocess.run(
        [str(PARLEY), *args], env=cli_env(redis_url), cwd=ROOT, input=stdin, capture_output=True, timeout=timeout
    )


def cli_env(redis_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "PARLEY_API_KEYS": OTHER_KEYS,
        "PARLEY_LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }


def stack(fresh_redis, spawn, api: bool = True) -> tuple[RedisServer, ParleyProcess | None, redis_sync.Redis]:
    server = fresh_redis()
    worker = spawn("worker", server.url, {"PARLEY_API_KEYS": OTHER_KEYS})
    front = spawn("api", server.url, {"PARLEY_API_KEYS": OTHER_KEYS}) if api else None
    r = redis_sync.Redis.from_url(server.url)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while r.hget(Keys.config, "partitions") is None or not r.zcard(Keys.projectors):
        assert worker.proc is not None and worker.proc.poll() is None, worker.log_path.read_text()[-2000:]
        if time.monotonic() > deadline:
            pytest.fail("the worker never sent a heartbeat")
        time.sleep(0.05)
    if front is not None:
        wait_ready(front.url)
    return server, front, r


def keys_of(r: redis_sync.Redis) -> Keys:
    return Keys(int(r.hget(Keys.config, "partitions")))


# -- seeding history straight into the log -----------------------------------------------------------

TOOLS = [Tool(type="function", function=FunctionDef(name="lookup", parameters={"type": "object", "properties": {}}))]


def history_commands(sid: str, n: int, start: int = 0) -> Iterator[Command]:
    """Commands whose events make a varied history: messages, tool calls and their results, updates."""
    answer = None
    for i in range(start, start + n):
        if i == 0:
            yield CreateSession(
                body=SessionCreate(agent_id="bulk", user_id=f"u{sid[-4:]}", tools=TOOLS, metadata={"i": 0})
            )
        elif answer is not None:
            yield AddMessage(body=MessageCreate(role="tool", content=f"result of {answer}", tool_call_id=answer))
            answer = None
        elif i % 17 == 0:
            yield UpdateSession(patch=SessionPatch(situation=f"situation {i}", metadata={"i": i}))
        elif i % 11 == 0:
            answer = f"call-{i}"
            call = ToolCall(id=answer, function=FunctionCall(name="lookup", arguments='{"n": %d}' % i))
            yield AddMessage(body=MessageCreate(role="assistant", content=None, tool_calls=[call]))
        else:
            yield AddMessage(body=MessageCreate(role="user" if i % 2 else "assistant", content=f"{sid} says {i}"))


async def append_history(store: RedisStore, tenant: str, sid: str, n: int) -> int:
    """Append `n` more events to the session (creating it when new) in one APPEND: answers its version."""
    state = await store.load(tenant, sid) or SessionState(id=sid)
    start, events = state.version, []
    for command in history_commands(sid, n, start):
        new = decide(state, command, Stamp(now=datetime.now(UTC), new_id=uuid7))
        state = fold(state, new)
        events += new
    outcome = await store.append(tenant, sid, start, events)
    assert getattr(outcome, "version", None) == state.version, outcome
    return state.version


def seed(url: str, plan: list[tuple[str, str | None, int]]) -> list[tuple[str, str]]:
    """plan: (tenant, session id or None for a new one, events to append) → [(tenant, session id)] in order."""

    async def run() -> list[tuple[str, str]]:
        client = Redis.from_url(url)
        try:
            store = RedisStore(client, Keys(int(await client.hget(Keys.config, "partitions"))))
            out = []
            for tenant, sid, n in plan:
                sid = sid or uuid7()
                await append_history(store, tenant, sid, n)
                out.append((tenant, sid))
            return out
        finally:
            await client.aclose()

    return asyncio.run(run())


def wait_projected(r: redis_sync.Redis) -> None:
    """Until the worker projected every appended event (per partition and tenant: projected == written)."""
    keys = keys_of(r)
    deadline = time.monotonic() + PROJECTED_TIMEOUT_S
    while True:
        behind = []
        for p in range(keys.partitions):
            written, projected = r.hgetall(keys.written(p)), r.hgetall(keys.projected(p))
            behind += [(p, t) for t, n in written.items() if int(projected.get(t, 0)) < int(n)]
        if not behind:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the worker did not project everything within {PROJECTED_TIMEOUT_S:.0f}s: {behind[:5]}")
        time.sleep(0.05)


# -- the read models, read from Redis ----------------------------------------------------------------


def log_of(r: redis_sync.Redis, keys: Keys, sid: str) -> list[Event]:
    return [decode_event(int(eid.split(b"-")[0]), fields) for eid, fields in r.xrange(keys.log(sid))]


def read_models(r: redis_sync.Redis, keys: Keys, sessions: list[tuple[str, str]]) -> dict[str, Any]:
    """Each session's live read models, whatever generation holds them."""
    out: dict[str, Any] = {}
    for tenant, sid in sessions:
        g = int(r.hget(keys.head(sid), "g") or 0)
        index = keys.index(partition_of(sid, keys.partitions), tenant)
        view = r.hgetall(keys.view(sid, g))
        if b"st" in view:  # msgpack of a frozenset: its byte order varies between processes, its value does not
            view[b"st"] = decode_state(view[b"st"])
        out[sid] = (
            view,
            r.lrange(keys.messages(sid, g), 0, -1),
            {int(n): decode_state(s) for n, s in r.hgetall(keys.snapshots(sid, g)).items()},
            r.zscore(index, sid) is not None,
        )
    return out


def assert_read_models_equal_fold(r: redis_sync.Redis, keys: Keys, sessions: list[tuple[str, str]]) -> None:
    for tenant, sid in sessions:
        events = log_of(r, keys, sid)
        state, expected_snaps = SessionState(id=sid), {}
        for e in events:
            state = fold(state, [e])
            if e.version % SNAPSHOT_EVERY == 0:
                expected_snaps[e.version] = state
        view, pointers, snaps, indexed = read_models(r, keys, [(tenant, sid)])[sid]
        assert int(view[b"v"]) == state.version == int(r.hget(keys.head(sid), "v")), sid
        assert view[b"t"] == tenant.encode()
        assert view[b"st"] == state, sid
        if state.exists:
            assert state.session is not None
            assert view[b"j"] == json_encode(state.session), sid
            assert view[b"tools"] == json_encode(ToolList(state.session.tools)), sid
        else:
            assert b"j" not in view and b"tools" not in view
        versions = [int(v.split(b"|")[0]) for v in pointers]
        assert versions == [e.version for e in events if isinstance(e, MessageAdded)], sid
        assert snaps == expected_snaps, sid
        assert indexed == state.exists


def assert_only_live_generations(r: redis_sync.Redis, keys: Keys, sessions: list[tuple[str, str]]) -> None:
    """No read-model key of any generation but the live one (SCAN of the whole Redis)."""
    found: dict[str, set[str]] = {}
    for kind in ("view", "msgs", "snaps"):
        for key in r.scan_iter(match=f"parley:*:{kind}:*", count=5000):
            name = key.decode()
            sid = name.split(f":{kind}:", 1)[1].split(":g", 1)[0]
            found.setdefault(sid, set()).add(name)
    assert set(found) == {sid for _, sid in sessions}
    stale = []
    for _, sid in sessions:
        g = int(r.hget(keys.head(sid), "g") or 0)
        live = {keys.view(sid, g), keys.messages(sid, g), keys.snapshots(sid, g)}
        assert keys.view(sid, g) in found[sid]
        stale += sorted(found[sid] - live)
    assert not stale, f"{len(stale)} keys of dead generations, e.g. {stale[:5]}"


def generations(r: redis_sync.Redis, keys: Keys, sessions: list[tuple[str, str]]) -> Counter[int]:
    return Counter(int(r.hget(keys.head(sid), "g") or 0) for _, sid in sessions)


# -- HTTP -----------------------------------------------------------------------------------------------


def http_log(c: httpx.Client, sid: str, headers: dict[str, str]) -> tuple[list[bytes], list[Event]]:
    """The session's events over GET /events (every page): the raw page bodies and the events."""
    bodies, events, after = [], [], 0
    while True:
        r = c.get(f"/sessions/{sid}/events", params={"after": after, "limit": 1000}, headers=headers)
        assert r.status_code == 200, r.text
        bodies.append(r.content)
        page = msgspec.json.decode(r.content, type=EventPage)
        events += page.items
        if page.next is None:
            return bodies, events
        after = page.next


def assert_http_equals_fold(c: httpx.Client, sid: str, headers: dict[str, str]) -> SessionState:
    """GET session / messages / tools answer exactly the fold of GET /events."""
    _, events = http_log(c, sid, headers)
    assert [e.version for e in events] == list(range(1, len(events) + 1))
    state = fold(SessionState(id=sid), events)
    r = c.get(f"/sessions/{sid}", headers=headers)
    if not state.exists:
        assert r.status_code == 404, r.text
        return state
    assert state.session is not None
    assert r.status_code == 200, r.text
    assert r.content == json_encode(state.session), sid
    assert r.headers["ETag"] == f'"{state.version}"'
    added = [e for e in events if isinstance(e, MessageAdded)]
    assert len(added) < 1000
    r = c.get(f"/sessions/{sid}/messages", params={"limit": 1000}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.content == b'{"items":[' + b",".join(json_encode(e.data) for e in added) + b"]}", sid
    assert [(m["id"], m["seq"]) for m in r.json()["items"]] == [(e.data.id, e.data.seq) for e in added]
    r = c.get(f"/sessions/{sid}/tools", headers=headers)
    assert r.status_code == 200, r.text
    assert r.content == json_encode(ToolList(state.session.tools))
    return state


class Traffic:
    """Writer threads appending messages over HTTP and reader threads reading, until stopped.
    Every answer is recorded: acknowledged writes per session, and anything unexpected."""

    def __init__(self, url: str, sessions: list[str], writers: int, readers: int) -> None:
        self.url, self.sessions = url, sessions
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.acked: dict[str, list[str]] = {sid: [] for sid in sessions}
        self.reads = 0
        self.unexpected: list[str] = []
        self.threads = [threading.Thread(target=self._write, args=(i,), daemon=True) for i in range(writers)]
        self.threads += [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(readers)]

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in self.threads), "a traffic thread did not stop"

    @property
    def writes(self) -> int:
        with self.lock:
            return sum(len(ids) for ids in self.acked.values())

    def wait_writes(self, n: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.writes < n:
            assert not self.unexpected, self.unexpected[:5]
            if time.monotonic() > deadline:
                pytest.fail(f"only {self.writes} of {n} writes acknowledged in {timeout:.0f}s")
            time.sleep(0.01)

    def _note(self, what: str) -> None:
        with self.lock:
            self.unexpected.append(what)

    def _write(self, w: int) -> None:
        rnd = random.Random(w)
        with httpx.Client(base_url=self.url, headers=ACME, timeout=15) as c:
            n = 0
            while not self.stop.is_set():
                sid = rnd.choice(self.sessions)
                n += 1
                try:
                    r = c.post(f"/sessions/{sid}/messages", json={"role": "user", "content": f"writer {w} #{n}"})
                except httpx.HTTPError as e:
                    self._note(f"POST {sid}: {e!r}")
                    continue
                if r.status_code // 100 != 2:
                    self._note(f"POST {sid}: {r.status_code} {r.text[:200]}")
                    continue
                with self.lock:
                    self.acked[sid].append(r.json()["id"])

    def _read(self, i: int) -> None:
        rnd = random.Random(100 + i)
        with httpx.Client(base_url=self.url, headers=ACME, timeout=15) as c:
            while not self.stop.is_set():
                sid = rnd.choice(self.sessions)
                for path, params in (
                    (f"/sessions/{sid}", {}),
                    (f"/sessions/{sid}/messages", {"limit": 1000}),
                    (f"/sessions/{sid}/tools", {}),
                    ("/sessions", {"limit": 100}),
                ):
                    try:
                        r = c.get(path, params=params)
                    except httpx.HTTPError as e:
                        self._note(f"GET {path}: {e!r}")
                        continue
                    if r.status_code != 200:
                        self._note(f"GET {path}: {r.status_code} {r.text[:200]}")
                    with self.lock:
                        self.reads += 1


def rebuilt_count(stderr: bytes) -> tuple[int, int]:
    """(sessions, events) from the last line `parley rebuild` prints."""
    line = [ln for ln in stderr.decode(errors="replace").splitlines() if ln.startswith("rebuilt ")][-1]
    words = line.replace(",", "").split()
    return int(words[1]), int(words[3])


# -- 1. rebuild under concurrent writes ------------------------------------------------------------------


def test_rebuild_under_concurrent_writes_loses_nothing_and_the_service_answers_throughout(fresh_redis, spawn):
    server, api, r = stack(fresh_redis, spawn)
    assert api is not None
    keys = keys_of(r)
    # 40 sessions, 30 events each over HTTP (messages, a patch, a tool change), then 200 more each straight
    # into the log, so the rebuild runs long enough for the writers to land inside it
    with httpx.Client(base_url=api.url, headers=ACME, timeout=15) as c:

        def make(i: int) -> str:
            s = c.post(
                "/sessions", json={"agent_id": f"a{i}", "tools": [{"type": "function", "function": {"name": "f"}}]}
            )
            assert s.status_code == 201, s.text
            sid = s.json()["id"]
            for n in range(29):
                if n == 10:
                    w = c.patch(f"/sessions/{sid}", json={"situation": f"s{i}", "tools": []})
                    assert w.status_code == 200, w.text
                else:
                    w = c.post(f"/sessions/{sid}/messages", json={"role": "user", "content": f"seed {n}"})
                    assert w.status_code == 201, w.text
            return sid

        with ThreadPoolExecutor(4) as pool:
            sids = list(pool.map(make, range(40)))
    sessions = [("acme", sid) for sid in sids]
    seed(server.url, [("acme", sid, 200) for sid in sids])
    wait_projected(r)
    heads = {sid: int(r.hget(keys.head(sid), "v")) for sid in sids}
    assert set(heads.values()) == {31 + 200}  # the patch wrote two events
    seeded_messages = {sid: int(r.llen(keys.messages(sid))) for sid in sids}

    with Traffic(api.url, sids, writers=3, readers=2) as traffic:
        traffic.wait_writes(30)
        before_spawn = sum(int(r.hget(keys.head(sid), "v")) for sid in sids)
        writes_at_spawn = traffic.writes
        run = subprocess.Popen(
            [str(PARLEY), "rebuild", "--all"],
            env=cli_env(server.url),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = run.communicate(timeout=CLI_TIMEOUT_S)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
        writes_during = traffic.writes - writes_at_spawn
        traffic.wait_writes(traffic.writes + 10)  # and a few after the switch
    assert run.returncode == 0, err.decode()[-2000:]
    assert not traffic.unexpected, f"{len(traffic.unexpected)} unexpected answers, e.g. {traffic.unexpected[:5]}"
    assert writes_during > 0 and traffic.reads > 0
    rebuilt_sessions, rebuilt_events = rebuilt_count(err)
    assert rebuilt_sessions == 40
    assert rebuilt_events > before_spawn, "no write landed inside the rebuild: it was not concurrent"

    assert generations(r, keys, sessions) == Counter({1: 40}), "every session's head moved to generation 1"
    with httpx.Client(base_url=api.url, headers=ACME, timeout=15) as c:
        listed = c.get("/sessions", params={"limit": 1000})
        assert listed.status_code == 200
        assert [s["id"] for s in listed.json()["items"]] == sorted(sids, reverse=True)
        for sid in sids:
            state = assert_http_equals_fold(c, sid, ACME)
            assert state.message_count == seeded_messages[sid] + len(traffic.acked[sid]), sid
            ids = {m["id"] for m in c.get(f"/sessions/{sid}/messages", params={"limit": 1000}).json()["items"]}
            assert set(traffic.acked[sid]) <= ids, f"{sid}: acknowledged messages missing"
    assert_read_models_equal_fold(r, keys, sessions)
    assert_only_live_generations(r, keys, sessions)
    assert not r.exists(keys.rebuild("all"))


# -- 2. kill -9 halfway, rerun ---------------------------------------------------------------------------


def kill_rebuild_when(url: str, reached: Callable[[], bool], what: str) -> subprocess.Popen[bytes]:
    """Start `parley rebuild --all` and SIGKILL it as soon as `reached()` (polled every 0.5 ms)."""
    run = subprocess.Popen(
        [str(PARLEY), "rebuild", "--all"], env=cli_env(url), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + CLI_TIMEOUT_S
    try:
        while not reached():
            if run.poll() is not None:
                pytest.fail(
                    f"the rebuild ended (rc {run.returncode}) before {what}: seed more history\n"
                    + run.stderr.read().decode()[-1000:]
                )  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                pytest.fail(f"the rebuild never reached {what}")
            time.sleep(0.0005)
        run.send_signal(signal.SIGKILL)
    finally:
        if run.poll() is None:
            run.kill()
        run.wait()
    return run


def kill_rebuild_halfway(url: str, r: redis_sync.Redis, keys: Keys) -> subprocess.Popen[bytes]:
    """SIGKILL `parley rebuild --all` as soon as its progress cursor exists (one batch done; the record itself
    exists from the start)."""
    return kill_rebuild_when(url, lambda: bool(r.hexists(keys.rebuild("all"), "cursor")), "its progress cursor")


def bulk_plan(sessions: int, events: int, long_every: int, long_events: int) -> list[tuple[str, str | None, int]]:
    return [
        ("acme" if i % 2 else "globex", None, long_events if i % long_every == 0 else events) for i in range(sessions)
    ]


def test_rebuild_killed_halfway_and_rerun_equals_an_uninterrupted_one(fresh_redis, spawn):
    server, _, r = stack(fresh_redis, spawn, api=False)
    keys = keys_of(r)
    # 640 sessions of two tenants: 10 batches of 64; every 10th session crosses a snapshot (130 events)
    sessions = seed(server.url, bulk_plan(640, 45, 10, 130))
    wait_projected(r)
    assert_read_models_equal_fold(r, keys, sessions[:50])
    live = read_models(r, keys, sessions)

    run = kill_rebuild_halfway(server.url, r, keys)
    assert run.returncode == -signal.SIGKILL
    cursor = r.hget(keys.rebuild("all"), "cursor")
    assert cursor is not None, "killed after the run finished: nothing was interrupted"
    gens = generations(r, keys, sessions)
    assert gens[1] >= 64 and gens[0] > 0, f"not killed mid-run: generations {gens}"
    partial = sum(
        1 for _, sid in sessions if int(r.hget(keys.head(sid), "g") or 0) == 0 and r.exists(keys.view(sid, 1))
    )
    # a killed rebuild never disturbs the live read models (whichever generation holds them)
    assert read_models(r, keys, sessions) == live

    done = cli(server.url, "rebuild", "--all")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"resuming a killed rebuild of all" in done.stderr
    resumed_sessions, _ = rebuilt_count(done.stderr)
    assert resumed_sessions == 640 - sum(1 for t, sid in sessions if f"{t}\x00{sid}".encode() <= cursor)
    assert resumed_sessions < 640

    assert not r.exists(keys.rebuild("all")), "the cursor outlived a finished rebuild"
    assert read_models(r, keys, sessions) == live, "not what the uninterrupted projection holds"
    assert_read_models_equal_fold(r, keys, sessions)
    assert_only_live_generations(r, keys, sessions)
    assert gens[0] + gens[1] == 640 and min(generations(r, keys, sessions)) >= 1
    print(f"killed after {gens[1]} sessions switched, {partial} partial generations")


def test_rebuild_killed_inside_a_long_session_resumes_from_its_partial_generation(fresh_redis, spawn):
    """One session of 20,000 events takes many LOAD/APPLY rounds: killed between two of them, the rerun
    folds only what the partial generation lacks, and ends where an uninterrupted rebuild does."""
    server, _, r = stack(fresh_redis, spawn, api=False)
    keys = keys_of(r)
    sessions = seed(server.url, [("acme", None, 20_000), ("acme", None, 40), ("globex", None, 140)])
    big = sessions[0][1]
    wait_projected(r)
    live = read_models(r, keys, sessions)

    run = kill_rebuild_when(server.url, lambda: r.hget(keys.view(big, 1), "v") is not None, "the long session's build")
    assert run.returncode == -signal.SIGKILL
    partial = int(r.hget(keys.view(big, 1), "v"))
    assert 0 < partial < 20_000, f"not killed inside the long session's build (its new generation is at {partial})"
    assert int(r.hget(keys.head(big), "g") or 0) == 0
    assert read_models(r, keys, sessions) == live
    left = sum(int(r.hget(keys.head(sid), "v")) - int(r.hget(keys.view(sid, 1), "v") or 0) for _, sid in sessions)

    done = cli(server.url, "rebuild", "--all")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert rebuilt_count(done.stderr) == (3, left), "the rerun did not resume from the partial generations"
    assert left < 20_000 + 180
    assert generations(r, keys, sessions) == Counter({1: 3})
    assert read_models(r, keys, sessions) == live
    assert_read_models_equal_fold(r, keys, sessions)
    assert_only_live_generations(r, keys, sessions)
    assert not r.exists(keys.rebuild("all"))


def test_rebuild_killed_halfway_and_rerun_while_writes_continue(fresh_redis, spawn):
    server, api, r = stack(fresh_redis, spawn)
    assert api is not None
    keys = keys_of(r)
    sessions = seed(server.url, [("acme", None, 60) for _ in range(400)])
    sids = [sid for _, sid in sessions]
    wait_projected(r)
    messages_before = {sid: int(r.llen(keys.messages(sid))) for sid in sids}

    with Traffic(api.url, sids, writers=2, readers=1) as traffic:
        traffic.wait_writes(20)
        run = kill_rebuild_halfway(server.url, r, keys)
        assert run.returncode == -signal.SIGKILL and r.exists(keys.rebuild("all"))
        gens = generations(r, keys, sessions)
        assert gens[1] >= 64 and gens[0] > 0, f"not killed mid-run: generations {gens}"
        at_rerun = traffic.writes
        done = cli(server.url, "rebuild", "--all")
        writes_during = traffic.writes - at_rerun
        traffic.wait_writes(traffic.writes + 10)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"resuming a killed rebuild" in done.stderr
    assert not traffic.unexpected, f"{len(traffic.unexpected)} unexpected answers, e.g. {traffic.unexpected[:5]}"
    assert writes_during > 0

    assert not r.exists(keys.rebuild("all"))
    assert min(generations(r, keys, sessions)) >= 1
    with httpx.Client(base_url=api.url, headers=ACME, timeout=15) as c:
        for sid in sids[::7]:
            assert_http_equals_fold(c, sid, ACME)
    wait_projected(r)
    assert_read_models_equal_fold(r, keys, sessions)
    assert_only_live_generations(r, keys, sessions)
    for sid in sids:
        g = int(r.hget(keys.head(sid), "g"))
        assert int(r.llen(keys.messages(sid, g))) == messages_before[sid] + len(traffic.acked[sid]), sid


# -- 3. export → import → export ------------------------------------------------------------------------


def dump(r: redis_sync.Redis) -> dict[bytes, Any]:
    """Every key with its type, whole value and whether it expires (but the tenants' limiter keys, `{t:…}`, which
    every request moves and which expire on their own)."""
    out: dict[bytes, Any] = {}
    for key in sorted(r.scan_iter(count=1000)):
        if b":{t:" in key:
            continue
        kind = r.type(key)
        if kind == b"string":
            value: Any = r.get(key)
        elif kind == b"hash":
            value = sorted(r.hgetall(key).items())
        elif kind == b"list":
            value = r.lrange(key, 0, -1)
        elif kind == b"set":
            value = sorted(r.smembers(key))
        elif kind == b"zset":
            value = r.zrange(key, 0, -1, withscores=True)
        elif kind == b"stream":
            groups = [(g["name"], g["last-delivered-id"], g["pending"]) for g in r.xinfo_groups(key)]
            value = (r.xrange(key), groups)
        else:
            value = kind
        out[key] = (kind, value, r.ttl(key) != -1)
    return out


def corrupt(lines: list[bytes]) -> dict[str, bytes]:
    """Broken variants of an export: a missing event line, two events out of order, a truncated line."""
    header, events = lines[0], lines[1:]
    swapped = events[:]
    swapped[2], swapped[3] = swapped[3], swapped[2]
    return {
        "missing line": b"".join([header, *events[:4], *events[5:]]),
        "bad version order": b"".join([header, *swapped]),
        "truncated json": b"".join([header, *events[:-1], events[-1][: len(events[-1]) // 2]]),
        "truncated file": b"".join([header, *events[:-2]]),
    }


def test_export_import_round_trip_is_byte_for_byte_and_a_failed_import_writes_nothing(fresh_redis, spawn, tmp_path):
    source, api_a, _ = stack(fresh_redis, spawn)
    assert api_a is not None
    lookup = {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "find",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
    with httpx.Client(base_url=api_a.url, headers=ACME, timeout=30) as c:

        def ok(resp: httpx.Response, status: int = 200) -> dict[str, Any]:
            assert resp.status_code == status, resp.text
            return resp.json()

        sid = ok(
            c.post(
                "/sessions",
                json={
                    "agent_id": "exp",
                    "user_id": "u1",
                    "situation": "s",
                    "tools": [lookup],
                    "metadata": {"n": 1.5, "deep": {"a": [1, None]}},
                },
            ),
            201,
        )["id"]
        ok(c.post(f"/sessions/{sid}/messages", json={"role": "user", "content": "find 42"}), 201)
        ok(
            c.post(
                f"/sessions/{sid}/messages",
                json={
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "42"}'}}
                    ],
                },
            ),
            201,
        )
        ok(
            c.post(
                f"/sessions/{sid}/messages",
                json={"role": "tool", "content": [{"type": "text", "text": "found"}], "tool_call_id": "c1"},
            ),
            201,
        )
        ok(
            c.patch(
                f"/sessions/{sid}",
                json={
                    "situation": "patched",
                    "token_budget": 900,
                    "tools": [lookup, {"type": "function", "function": {"name": "other"}}],
                },
            )
        )
        answer = ok(
            c.post(
                f"/sessions/{sid}/chat",
                json={"messages": [{"role": "user", "content": "hello there"}], "temperature": 0.3},
            )
        )
        assert answer["choices"][0]["message"]["content"]
        doomed = ok(c.post("/sessions", json={"agent_id": "doomed"}), 201)["id"]
        ok(c.post(f"/sessions/{doomed}/messages", json={"role": "user", "content": "bye"}), 201)
        ok(c.delete(f"/sessions/{doomed}"), 202)
        spare = ok(c.post("/sessions", json={"agent_id": "spare"}), 201)["id"]
        a_views = {
            s: (
                c.get(f"/sessions/{s}").content,
                c.get(f"/sessions/{s}/messages").content,
                c.get(f"/sessions/{s}/tools").content,
            )
            for s in (sid, doomed)
        }
        a_events = {s: http_log(c, s, ACME)[0] for s in (sid, doomed)}
        a_past = {
            s: [c.get(f"/sessions/{s}", params={"version": v}).content for v in range(1, 30)] for s in (sid, doomed)
        }
    types = [item["type"] for item in msgspec.json.decode(a_events[sid][0])["items"]]
    assert {
        "SessionCreated",
        "MessageAdded",
        "SessionUpdated",
        "ToolsChanged",
        "ChatRequested",
        "ContextBuilt",
        "ChatCompleted",
    } <= set(types)

    f1, f2, f3 = tmp_path / "f1.ndjson", tmp_path / "f2.ndjson", tmp_path / "f3.ndjson"
    for s, f in ((sid, f1), (doomed, f2), (spare, f3)):
        out = cli(source.url, "export", "--session", s, "-o", str(f))
        assert out.returncode == 0 and out.stdout == b"", out.stderr.decode()[-1000:]
    stdout = cli(source.url, "export", "--session", sid)
    assert stdout.returncode == 0, stdout.stderr.decode()[-1000:]
    assert stdout.stdout == f1.read_bytes(), "export to stdout differs from -o"
    lines = f1.read_bytes().splitlines(keepends=True)
    header = msgspec.json.decode(lines[0])
    assert header == {"format": "parley.session", "schema": 2, "session_id": sid, "events": len(lines) - 1}
    assert a_events[sid] == [b'{"items":[' + b",".join(ln.rstrip(b"\n") for ln in lines[1:]) + b'],"next":null}']
    assert msgspec.json.decode(f2.read_bytes().splitlines()[-1])["type"] == "SessionDeleted"

    # the second deployment: an empty redis-server and its own API
    target = fresh_redis()
    api_b = spawn("api", target.url, {"PARLEY_API_KEYS": OTHER_KEYS})
    rb = redis_sync.Redis.from_url(target.url)
    empty = dump(rb)
    assert set(empty) == {Keys.config.encode()}

    for what, data in corrupt(lines).items():
        broken = tmp_path / f"broken-{what.replace(' ', '-')}.ndjson"
        broken.write_bytes(data)
        bad = cli(target.url, "import", "--tenant", "other", str(broken))
        assert bad.returncode != 0, f"{what}: imported"
        message = bad.stderr.decode()
        assert "parley import:" in message and "Traceback" not in message, f"{what}: {message[-1500:]}"
        print(f"{what}: {message.strip()}")
        assert dump(rb) == empty, f"{what}: the failed import wrote something"

    for f in (f1, f2):
        loaded = cli(target.url, "import", "--tenant", "other", str(f))
        assert loaded.returncode == 0, loaded.stderr.decode()[-1500:]
    assert cli(target.url, "export", "--session", sid).stdout == f1.read_bytes()
    again = cli(target.url, "export", "--session", doomed, "-o", str(tmp_path / "f2-again.ndjson"))
    assert again.returncode == 0 and (tmp_path / "f2-again.ndjson").read_bytes() == f2.read_bytes()

    with httpx.Client(base_url=api_b.url, headers=OTHER, timeout=15) as c:
        for s in (sid, doomed):
            assert http_log(c, s, OTHER)[0] == a_events[s]
            got = (
                c.get(f"/sessions/{s}").content,
                c.get(f"/sessions/{s}/messages").content,
                c.get(f"/sessions/{s}/tools").content,
            )
            assert got == a_views[s], s
            assert [c.get(f"/sessions/{s}", params={"version": v}).content for v in range(1, 30)] == a_past[s]
            assert c.get(f"/sessions/{s}", headers=ACME).status_code == 404  # the tenant it was imported as only
        assert_http_equals_fold(c, sid, OTHER)
        assert [x["id"] for x in c.get("/sessions").json()["items"]] == [sid]
        assert c.get(f"/sessions/{sid}").json()["version"] == header["events"]

    # an id that exists: a clear error and not one key changes, also when the file holds a new session first
    loaded = dump(rb)
    (tmp_path / "f3+f1.ndjson").write_bytes(f3.read_bytes() + f1.read_bytes())
    for name in ("f1.ndjson", "f3+f1.ndjson"):
        dup = cli(target.url, "import", "--tenant", "other", str(tmp_path / name))
        assert dup.returncode == 1, f"{name}: {dup.stderr.decode()[-1000:]}"
        message = dup.stderr.decode()
        assert f"session {sid} already exists" in message and "nothing was imported" in message, message[-1000:]
        assert dump(rb) == loaded, f"{name}: the refused import wrote something"
    assert sum(1 for k in rb.scan_iter(count=1000) if b":{t:" not in k) == len(
        loaded
    )  # the limiter keys aside, as in dump()
    assert not rb.exists(Keys(int(rb.hget(Keys.config, "partitions"))).head(spare))


@pytest.mark.parametrize("defect", ["no events", "another session's events", "a message out of sequence"])
def test_import_refuses_a_file_that_is_not_a_whole_session_of_its_own(fresh_redis, defect):
    """An export file the fold accepts but that is no consistent session of its own: a header announcing zero
    events (the fold of nothing is no session), a session's log under another session's header (its messages
    name the first session and its event ids would be used twice), a message whose `seq` is not its position.
    Refused, nothing written."""
    source = fresh_redis()
    redis_sync.Redis.from_url(source.url).hset(Keys.config, "partitions", 16)
    [(_, sid)] = seed(source.url, [("acme", None, 12)])
    exported = cli(source.url, "export", "--session", sid)
    assert exported.returncode == 0, exported.stderr.decode()[-1000:]
    lines = exported.stdout.splitlines(keepends=True)
    other = uuid7()
    if defect == "no events":
        data = b'{"format":"parley.session","schema":2,"session_id":"%s","events":0}\n' % other.encode()
    elif defect == "another session's events":
        data = lines[0].replace(sid.encode(), other.encode()) + b"".join(lines[1:])
        assert b'"session_id":"%s"' % sid.encode() in data  # the messages still name the exported session
    else:
        events = [msgspec.json.decode(line) for line in lines[1:]]
        second = [e for e in events if e["type"] == "MessageAdded"][1]
        assert second["data"]["seq"] == 2
        second["data"]["seq"] = 7  # positions 1, 7, 3, ...
        data = lines[0] + b"".join(json_encode(e) + b"\n" for e in events)

    target = fresh_redis()
    rt = redis_sync.Redis.from_url(target.url)
    rt.hset(Keys.config, "partitions", 16)
    before = dump(rt)
    loaded = cli(target.url, "import", "--tenant", "other", stdin=data)
    written = sorted(set(dump(rt)) - set(before))
    assert loaded.returncode != 0 and dump(rt) == before, (
        f"{defect}: imported (exit {loaded.returncode}), writing {[k.decode() for k in written]}"
    )
