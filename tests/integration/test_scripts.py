"""The Lua scripts as Redis runs them: every key a script touches is one it was given in KEYS (checked with
MONITOR on a real redis-server, which logs each command a script runs), each file names its KEYS/ARGV at the top,
and the wheel ships the files."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import redis as sync_redis
from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from redis.asyncio import Redis

from shared.adapters.codec import event_fields
from shared.adapters.redis.api_keys import RedisApiKeys
from shared.adapters.redis.chats import ChatStore
from shared.adapters.redis.history import RedisHistory
from shared.adapters.redis.keys import Keys
from shared.adapters.redis.limits import RedisLimits
from shared.adapters.redis.queue import QUEUE, ChatQueue
from shared.adapters.redis.scripts import APPEND, REGISTRY, START_JOB
from shared.adapters.redis.server import RedisServer
from shared.adapters.redis.store import RedisStore
from shared.adapters.redis.webhooks import RedisWebhooks
from shared.app.ports import Conflict, IdempotencyClaim
from shared.app.projection import Projection
from shared.app.rebuild import Rebuilder
from shared.domain.commands import AddMessage, CreateSession, RequestChat, Stamp, decide
from shared.domain.events import SCHEMA_VERSION, SessionPurged, SessionPurgedData
from shared.domain.ids import partition_of, uuid7
from shared.domain.search import query_of
from shared.domain.state import SessionState, fold
from shared.domain.webhooks import Subscription, new_secret
from shared.domain.wire import ChatRequest, MessageCreate, SessionCreate, TenantLimits

ROOT = Path(__file__).resolve().parents[2]
LUA = ROOT / "shared" / "adapters" / "redis" / "lua"
QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def stamp() -> Stamp:
    return Stamp(now=datetime.now(UTC), new_id=uuid7)


def test_every_lua_file_is_registered_and_indexes_keys_and_argv_only_at_the_top():
    files = sorted(p.stem for p in LUA.glob("*.lua"))
    assert files == sorted(REGISTRY.scripts), "a script file the registry does not load, or the reverse"
    for path in LUA.glob("*.lua"):
        lines = path.read_text().splitlines()
        assert lines[0].startswith("-- "), f"{path.name}: starts with what it does"
        for n, line in enumerate(lines, 1):
            if re.search(r"\b(KEYS|ARGV)\[\d+\]", line):
                assert line.lstrip().startswith("local ") or lines[n - 2].rstrip().endswith("="), (
                    f"{path.name}:{n}: KEYS/ARGV indexed by number outside the locals at the top: {line.strip()}"
                )


async def _workload(redis: Redis) -> None:
    """Runs every script at least once, on sessions in several partitions, with a rebuild and a purge."""
    keys = Keys(4)
    store, jobs, history = RedisStore(redis, keys), ChatStore(redis, keys), RedisHistory(redis, keys)
    limits = RedisLimits(
        redis, keys, TenantLimits(rps=100, burst=10, concurrent_chats=2, chat_tokens_per_day=0, streams=5)
    )
    live = Projection(store, feed=None)  # type: ignore[arg-type]
    queue = ChatQueue(redis)
    sids = []
    for i in range(3):
        state = SessionState(id=uuid7())
        events = decide(state, CreateSession(body=SessionCreate(user_id="u")), stamp())
        await store.append("acme", state.id, 0, events)
        state = fold(state, events)
        more = decide(state, AddMessage(body=MessageCreate(role="user", content=f"m{i}")), stamp())
        claim = IdempotencyClaim(key=f"k{i}", request_hash="h", response=b"{}")
        await store.append("acme", state.id, state.version, more, claim)
        await store.append("acme", state.id, state.version, more)  # a repeat: 'already'
        state = fold(state, more)
        job = uuid7()
        chat = decide(state, RequestChat(job_id=job, request=ChatRequest(), default_model="parley-offline"), stamp())
        await store.append("acme", state.id, state.version, chat)
        late = decide(state, AddMessage(body=MessageCreate(role="user", content="late")), stamp())
        assert isinstance(await store.append("acme", state.id, 1, late), Conflict)  # with the events it missed
        state = fold(state, chat)
        await queue.enqueue("acme", state.id, [job])
        arq_id = f"{{arq}}chat:{job}"
        assert await START_JOB(redis, [in_progress_key_prefix + arq_id, QUEUE], [arq_id, timestamp_ms(), 1000])
        await live.catch_up([state.id])
        assert await jobs.mark_running(state.id, job) == 1
        await jobs.emit(state.id, job, "chunk", b'"x"')
        await jobs.job("acme", state.id, job)
        await jobs.jobs("acme", state.id, 10, 0)
        await store.session("acme", state.id)
        await store.messages("acme", state.id, 10, 0, keep_messages=1)  # a retention's page, and its trim
        await store.trim("acme", state.id, 1, 10, dry_run=False)
        await store.events("acme", state.id, 0, 10)
        await store.at_version("acme", state.id, 2)
        await store.sessions("acme", 10, 0)
        since = datetime(2000, 1, 1, tzinfo=UTC)  # two terms and the other order's range: every path of FIND
        await store.find("acme", query_of(user_id="u", status="busy", updated_after=since), None, 10)
        await store.count("acme", query_of(user_id="u", status="busy", created_after=since))
        sids.append((state.id, state.version))
    await Rebuilder(store, history, live).rebuild([("acme", sid) for sid, _ in sids])
    for sid, _ in sids:  # generation 1 now
        await store.messages("acme", sid, 10, 0)
        await store.trim("acme", sid, 1, 10, dry_run=False)
        await store.at_version("acme", sid, 2)
    for sid, version in sids[:2]:
        tomb = SessionPurged(
            id=uuid7(),
            occurred_at=datetime.now(UTC),
            data=SessionPurgedData(session_id=sid, user_id="u", event_count=version),
        )
        assert await history.purge("acme", sid, version, tomb)
    await limits.admit("acme")
    await limits.take("acme", "chats", "m", 5)
    await limits.set_limits("acme", {"rps": 5}, reset=["burst"])
    api = RedisApiKeys(redis)
    key = await api.create("acme")
    assert await api.revoke(key)
    hooks, now = RedisWebhooks(redis, keys), datetime.now(UTC)
    sub = Subscription(
        id=uuid7(),
        tenant="acme",
        url="http://h/",
        event_types=["ChatCompleted"],
        secret=new_secret(),
        created_at=now,
        updated_at=now,
    )
    await hooks.create(sub, b"{}")
    assert await hooks.update(sub, b"{}", sub.updated_at)
    assert await hooks.replay("acme", sub.id, "0-0", b"{}")
    assert await hooks.advance(sub.id, 1, 0, "1-0")
    await hooks.record(sub.id, b"{}", 3)
    assert await hooks.lease(sub.id, "w", 1_000)
    await hooks.release(sub.id, "w")
    assert await hooks.delete("acme", sub.id, b"{}")


def _monitor(port: int, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["redis-cli", "-p", str(port), "monitor"], stdout=open(out, "wb"), stderr=subprocess.DEVNULL
    )


async def test_every_key_a_script_touches_is_one_of_its_keys(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    log = tmp_path / "monitor.log"
    monitor = _monitor(server.port, log)
    try:
        client = Redis.from_url(server.url)
        await asyncio.sleep(0.3)  # MONITOR attached
        await asyncio.wait_for(_workload(client), 30)
        await client.aclose()
        await asyncio.sleep(0.3)
    finally:
        monitor.terminate()
        monitor.wait()
    lines = [line for line in log.read_text(errors="replace").splitlines() if '"' in line]
    # Redis logs a script's commands (as "[0 lua]") right after the EVALSHA that ran them
    getkeys = sync_redis.Redis(port=server.port)
    checked, scripts_seen, declared = 0, set(), None
    shas = {s.sha: s.name for s in REGISTRY.scripts.values()}
    for line in lines:
        args = [bytes(a, "utf-8").decode("unicode_escape") for a in QUOTED.findall(line)]
        if "[0 lua]" not in line:
            if args and args[0].upper() == "EVALSHA":
                scripts_seen.add(shas[args[1]])
                declared = (shas[args[1]], set(args[3 : 3 + int(args[2])]))
            else:
                declared = None
            continue
        assert declared is not None, f"a script command without its EVALSHA before it: {line}"
        name, allowed = declared
        try:
            touched = [k.decode() if isinstance(k, bytes) else k for k in getkeys.command_getkeys(*args)]
        except sync_redis.ResponseError:  # TIME and the like: no keys
            touched = []
        assert set(touched) <= allowed, f"{name} touched {sorted(set(touched) - allowed)} not in its KEYS"
        checked += 1
    server.stop()
    assert checked > 100
    assert scripts_seen == set(REGISTRY.scripts), f"not exercised: {set(REGISTRY.scripts) - scripts_seen}"


def test_the_wheel_ships_the_lua_scripts(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=120,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("parley-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {Path(n).stem for n in names if n.startswith("shared/adapters/redis/lua/") and n.endswith(".lua")}
    assert shipped == set(REGISTRY.scripts)


async def test_append_called_twice_with_the_same_events_answers_already_and_stores_them_once(redis):
    """What a client library's retry after a lost reply sends: the same call again. The script recognises its own
    events (the log holds the first one at expected + 1), answers 'already' at their version, writes nothing."""
    k = Keys(4)
    state = SessionState(id=uuid7())
    p = partition_of(state.id, 4)
    events = decide(state, CreateSession(body=SessionCreate()), stamp())
    state = fold(state, events)
    more = decide(state, AddMessage(body=MessageCreate(role="user", content="once")), stamp())
    more += decide(fold(state, more), AddMessage(body=MessageCreate(role="user", content="twice?")), stamp())
    keys = [
        k.head(state.id),
        k.log(state.id),
        k.feed(p),
        k.written(p),
        k.idempotency(p, "acme", "-"),
        k.sessions(p, "acme"),
        k.idempotency_of(state.id),
        k.head(state.id),  # a fork's parent's head and readers: this append is none
        k.readers(state.id),
        k.readers(state.id),  # its own readers (a purge's delete checks them)
    ]

    def args(expected: int, evs: list) -> list:
        return [
            "acme",
            expected,
            state.id,
            "0",
            "",
            "",
            60,
            SCHEMA_VERSION,
            0,
            "",
            0,
            "0",  # not a purge's delete
            *(x for e in evs for x in event_fields(e)),
        ]

    assert await APPEND(redis, keys, args(0, events)) == [b"appended", 1]
    assert await APPEND(redis, keys, args(1, more)) == [b"appended", 3]
    assert await APPEND(redis, keys, args(1, more)) == [b"already", 3]
    assert await APPEND(redis, keys, args(0, events)) == [b"already", 1]
    assert await redis.xlen(k.log(state.id)) == 3
    assert await redis.xlen(k.feed(p)) == 2  # one feed entry per append that wrote
    assert int(await redis.hget(k.written(p), "acme")) == 3
    other = decide(state, AddMessage(body=MessageCreate(role="user", content="other")), stamp())
    assert await APPEND(redis, keys, args(1, other)) == [b"conflict", 3]
