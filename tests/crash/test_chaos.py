"""Chaos tests: real processes (redis-server, `parley api`, `parley worker`) killed, paused and restarted under load.

What the service promises and these tests hold it to (README, Guarantees; docs/architecture.md, Durability):

- every acknowledged write is read back exactly once and in order, after any crash (AOF `appendfsync always`);
- reads answer the read models caught up, never stale data: 200 with every acknowledged write, or 503;
- nothing hangs: with Redis paused a request answers 503 `store_unavailable` within about a second (the
  latency is recorded; what is asserted is that no request goes unanswered past HANG_BOUND_S);
- no process is left stuck: a worker or API that saw Redis die, pause or load its AOF recovers by itself
  (it keeps running, heart-beats, projects, runs chat jobs), and `/ready` comes back;
- a reader never gets 503 because a worker died (another one, or the reader itself, catches the session up).

Each test records every invariant as passed or failed with its evidence (`Verdict`) and fails at the end listing
all the failed ones, so one broken invariant does not hide the others. Randomness is seeded
(`PARLEY_CHAOS_SEED`, fixed by default); counts and waits are bounded; speed is recorded, never asserted, except
the "nothing hangs" bound. Process logs are under the test's tmp_path (run with --basetemp to keep them).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.adapters.redis.feed import GROUP
from shared.adapters.redis.keys import Keys
from shared.adapters.redis.server import RedisServer, _die_with_parent
from tests.crash.test_projector_crash import keys_of, lagging_sessions, log_tail, run_all, worker_registered
from tests.support import ParleyProcess, auth, wait_for

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("PARLEY_CHAOS_SEED", "20261203"))
HANG_BOUND_S = 5.0
"""Client timeout of every request under load: a request without an answer by then counts as a hang."""
RECOVERY_S = 15.0
"""After the chaos stops, everything must be back (ready, caught up, writable) within this many seconds."""


# -- a redis-server whose AOF load can be made slow -------------------------------------------------------------


class SlowLoadRedis(RedisServer):
    """RedisServer with `--key-load-delay` (redis-server's hidden debug config: a pause per key or AOF command
    while loading), so a restart stays in LOADING long enough to start or kill a worker meanwhile.

    A positive delay is microseconds per command (at least one `usleep`: USLEEP_US); a negative delay -N sleeps
    once every N commands. `start(until="listening")` returns as soon as the server answers at all, LOADING
    included; `pause()` / `resume()` are SIGSTOP / SIGCONT."""

    def __init__(self, data_dir: str | Path, **kw: Any) -> None:
        super().__init__(data_dir, appendfsync="always", **kw)
        self.key_load_delay: int | None = None

    def command(self) -> list[str]:
        """The same command line as RedisServer.start's, plus the load delay."""
        args = [
            str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
            "--daemonize", "no", "--protected-mode", "yes", "--logfile", "redis.log",
        ]  # fmt: skip
        if self.key_load_delay is not None:
            args += ["--key-load-delay", str(self.key_load_delay)]
        return args

    def start(self, timeout: float = 15.0, until: str = "loaded") -> SlowLoadRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        wanted = {"ready"} if until == "loaded" else {"ready", "loading"}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode}; see {self.data_dir / 'redis.log'}"
                )
            if probe_redis(self.port) in wanted:
                return self
            time.sleep(0.01)
        raise RuntimeError(f"redis-server not {until} within {timeout:.0f}s")

    def wait_loaded(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while probe_redis(self.port) != "ready":
            if time.monotonic() >= deadline:
                raise RuntimeError(f"redis-server did not finish loading within {timeout:.0f}s")
            time.sleep(0.01)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()  # a stopped process would sit on SIGTERM until killed
        super().stop()


def probe_redis(port: int, timeout: float = 1.0) -> str:
    """One raw PING: "ready", "loading", "down" (refused), "unresponsive" (paused) or the odd reply. (A loading
    server answers between batches of commands: with a load delay that can take a few hundred ms.)"""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            line = s.recv(64)
    except ConnectionRefusedError:
        return "down"
    except OSError:
        return "unresponsive"
    if line.startswith(b"+PONG"):
        return "ready"
    if line.startswith(b"-LOADING"):
        return "loading"
    return f"other {line[:40]!r}"


async def redis_state(port: int) -> str:
    return await asyncio.to_thread(probe_redis, port)


def approx_aof_commands(data_dir: Path) -> int:
    """Roughly how many commands the AOF replays (RESP arrays that start a line); only used to size a delay."""
    return sum(p.read_bytes().count(b"\r\n*") + 1 for p in (data_dir / "appendonlydir").glob("*.incr.aof"))


USLEEP_US = 150
"""What one `usleep` of the load delay costs on Linux, measured with redis-server 7.0 (timer slack included)."""


def load_delay_for(commands: int, seconds: float) -> int:
    """A `--key-load-delay` that makes replaying `commands` AOF commands take about `seconds`."""
    per_command_us = seconds * 1e6 / max(commands, 1)
    if per_command_us >= USLEEP_US:
        return int(per_command_us - USLEEP_US + 50)  # microseconds per command (a usleep's floor included)
    return -max(1, round(USLEEP_US / per_command_us))  # one usleep every N commands


@pytest.fixture
def slow_redis(processes: list, tmp_path: Path) -> Callable[[], SlowLoadRedis]:
    """slow_redis() → a started SlowLoadRedis of this test alone (AOF, fsync always), stopped after the test."""

    def _make() -> SlowLoadRedis:
        server = SlowLoadRedis(tmp_path / f"redis-{len(processes)}").start()
        processes.append(server)
        return server

    return _make


# -- verdicts and process facts ----------------------------------------------------------------------------------


class Verdict:
    """The invariants one test checks, each passed or failed (a failure with its evidence), plus recorded facts
    that are not asserted. `finish()` fails the test with the report if any invariant failed, else prints it."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.checks: list[tuple[str, bool, str]] = []
        self.notes: list[tuple[str, str]] = []

    def check(self, name: str, ok: bool, evidence: str = "") -> bool:
        self.checks.append((name, bool(ok), evidence))
        return bool(ok)

    def note(self, name: str, evidence: str) -> None:
        self.notes.append((name, evidence))

    def report(self) -> str:
        lines = [f"== {self.title} (seed {SEED})"]
        for name, ok, evidence in self.checks:
            lines.append(f"  [{'PASS' if ok else 'FAIL'}] {name}" + (f": {evidence}" if evidence and not ok else ""))
        lines += [f"  [note] {name}: {evidence}" for name, evidence in self.notes]
        return "\n".join(lines)

    def finish(self) -> None:
        failed = [name for name, ok, _ in self.checks if not ok]
        if failed:
            pytest.fail(f"{len(failed)} invariant(s) failed: {failed}\n{self.report()}", pytrace=False)
        print(self.report())


def excerpt(proc: ParleyProcess, lines: int = 10) -> str:
    """A process's log boiled down for a report: its log lines, the frames of Parley's own code in tracebacks and
    the exception lines (the last `lines` of those), or that the log is empty."""
    text = log_tail(proc, 20_000)
    keep = [
        ln.strip() for ln in text.splitlines()
        if re.search(r"/(services|shared)/\S+\.py\", line", ln) or re.match(r"[\w.]+(Error|Exception)\b", ln)
        or re.match(r"\d{4}-\d\d-\d\d .* (WARNING|ERROR|CRITICAL) ", ln)
    ]  # fmt: skip
    code = proc.proc.poll() if proc.proc else None
    state = "running" if code is None else f"exited {code}"
    body = "\n      ".join(keep[-lines:]) if keep else "log empty" if not text.strip() else text.strip()[-300:]
    return f"{proc.role} pid {proc.proc.pid if proc.proc else '?'} ({state}, {proc.log_path.name}):\n      {body}"


def running(proc: ParleyProcess) -> bool:
    return proc.proc is not None and proc.proc.poll() is None


def consumer_mark(worker: ParleyProcess) -> bytes:
    """A worker's projector consumer name carries its pid: `<host>-<pid>-<id>`."""
    assert worker.proc is not None
    return f"-{worker.proc.pid}-".encode()


async def heartbeat_age_s(r: Redis, keys: Keys, worker: ParleyProcess) -> float | None:
    """Seconds since this worker's projector last heart-beat; None: it never did."""
    for member, score in await r.zrange(keys.projectors, 0, -1, withscores=True):
        if consumer_mark(worker) in member:
            return time.time() - score / 1000
    return None


async def held_unprojected(r: Redis, keys: Keys, worker: ParleyProcess) -> int:
    """Feed entries the worker has read and not acknowledged whose sessions are behind their log's head: work that
    waits for this worker (until another claims it)."""
    sessions: set[str] = set()
    for p in range(keys.partitions):
        try:
            summary = await r.xpending(keys.feed(p), GROUP)
        except ResponseError:  # no group yet
            continue
        for c in (summary or {}).get("consumers") or []:
            if consumer_mark(worker) in c["name"]:
                for e in await r.xpending_range(keys.feed(p), GROUP, "-", "+", 100, c["name"]):
                    for _, fields in await r.xrange(keys.feed(p), e["message_id"], e["message_id"]):
                        sessions.add(fields[b"s"].decode())
    return len(await lagging_sessions(r, keys, sessions)) if sessions else 0


async def poll_until(check: Callable[[], Awaitable[Any]], timeout: float, interval: float = 0.1) -> Any:
    """Like wait_for, but answers the last result instead of failing: a verdict records the outcome."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result or time.monotonic() >= deadline:
            return result
        await asyncio.sleep(interval)


def outcome_of(res: httpx.Response) -> str:
    """ "201", or "503 store_unavailable": the status and, for errors, the service's error code."""
    if res.status_code < 400:
        return str(res.status_code)
    try:
        return f"{res.status_code} {res.json()['error']['code']}"
    except Exception:
        return f"{res.status_code} ?"


# -- traffic: every request timed and classified ----------------------------------------------------------------


@dataclass
class Sent:
    start: float
    end: float
    kind: str
    """write | read"""
    outcome: str
    """ "201", "503 store_unavailable", "ConnectError", "timeout ReadTimeout", ..."""
    what: str


class Traffic:
    """An httpx client whose every request is timed and classified; a timeout is recorded as a hang."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.sent: list[Sent] = []

    async def request(self, kind: str, method: str, url: str, what: str, **kw: Any) -> httpx.Response | None:
        start = time.monotonic()
        res: httpx.Response | None = None
        try:
            res = await self.client.request(method, url, **kw)
            outcome = outcome_of(res)
        except httpx.TimeoutException as e:
            outcome = f"timeout {type(e).__name__}"
        except httpx.TransportError as e:
            outcome = type(e).__name__
        self.sent.append(Sent(start, time.monotonic(), kind, outcome, what))
        return res

    def hangs(self) -> list[Sent]:
        return [s for s in self.sent if s.outcome.startswith("timeout")]

    def between(self, kind: str, since: float = 0.0, until: float = float("inf")) -> list[Sent]:
        """Requests sent in [since, until]."""
        return [s for s in self.sent if s.kind == kind and since <= s.start <= until]

    def in_flight(self, kind: str, since: float, until: float) -> list[Sent]:
        """Requests in flight at some moment of [since, until] (sent before it and answered in it, too)."""
        return [s for s in self.sent if s.kind == kind and s.start <= until and s.end >= since]

    def outcomes(self, kind: str, since: float = 0.0, until: float = float("inf")) -> Counter:
        return Counter(s.outcome for s in self.between(kind, since, until))


def latency_summary(sent: list[Sent]) -> str:
    if not sent:
        return "no requests"
    lat = sorted(s.end - s.start for s in sent)
    return (
        f"{len(sent)} requests, median {statistics.median(lat):.2f}s, max {lat[-1]:.2f}s, "
        f"{sum(1 for x in lat if x > 1.0)} over 1 s; outcomes {dict(Counter(s.outcome for s in sent))}"
    )


# ================================================================================================================
# 1. chaos: 2 APIs, 2 workers, 1 redis-server; kills, pauses, restarts at seeded random moments under load
# ================================================================================================================

WRITERS = 5
MESSAGES_PER_SESSION = 12
MAX_WRITES_PER_WRITER = 2_000
READ_EVERY = 3
"""A writer reads its session's messages back after every READ_EVERY-th acknowledged message."""
LIST_EVERY = 25
WARM_UP_ACKS = 60
CHAOS_ACTIONS = (
    "kill_api", "kill_worker", "kill_worker_during_startup", "pause_redis", "kill_redis",
    "kill_redis_then_worker_while_loading",
)  # fmt: skip
EXTRA_ACTIONS = 0
"""Besides one of each action, this many more picked at random."""
LOADING_S = 3.0
"""How long a restart meant to be caught LOADING loads (longer than a worker takes to send its first command)."""
SETTLE_S = 10.0
CHAT_WAIT_S = 3
"""The APIs' PARLEY_CHAT_WAIT_S: a chat probe that no worker runs answers 504 after this long."""


@dataclass
class AckedSession:
    sid: str
    tenant: str
    writer: int
    idempotent: bool
    created: dict
    """the 201 body of its create"""
    messages: list[dict] = field(default_factory=list)
    """the 201 bodies of its messages, in the order acknowledged"""
    unresolved: int = 0
    """idempotent writes into it that never got an answer: its log may hold more than was acknowledged"""


@dataclass
class ChaosEvent:
    name: str
    start: float
    end: float = 0.0
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.name}@{self.start:.1f}s+{self.end - self.start:.1f}s {self.details}"


class Chaos:
    """The cluster (redis-server, API and worker processes), the load on it and the chaos actions."""

    def __init__(self, server: SlowLoadRedis, spawn: Callable[..., ParleyProcess], client: httpx.AsyncClient) -> None:
        self.server = server
        self.spawn = spawn
        self.traffic = Traffic(client)
        self.rng = random.Random(SEED)
        self.redis = Redis.from_url(server.url)
        self.keys = Keys(16)  # replaced by the stored partition count once a process has started
        self.apis: list[ParleyProcess] = []
        self.workers: list[ParleyProcess] = []
        self.api_env = {"PARLEY_CHAT_WAIT_S": str(CHAT_WAIT_S)}
        self.t0 = time.monotonic()
        self.stop = asyncio.Event()
        self.stopped_at = float("inf")
        # what the clients were told, and what went wrong
        self.sessions: dict[str, AckedSession] = {}
        self.acks = 0
        self.unexpected: list[str] = []
        """4xx or 500: no request of this test is invalid, so each is a bug"""
        self.stale_reads: list[str] = []
        # what the chaos did
        self.events: list[ChaosEvent] = []
        self.dead: list[str] = []
        """processes found dead when they should have been running (with their log excerpt)"""
        self.born: dict[int, float] = {}
        """worker pid → when it was started (s since the load started; -1: before)"""
        self.redis_killed_at: list[float] = []

    # -- processes ---------------------------------------------------------------------------------------------
    async def start(self, apis: int = 2, workers: int = 2) -> None:
        procs = await asyncio.gather(
            *(asyncio.to_thread(self.spawn, "api", self.server.url, self.api_env) for _ in range(apis)),
            *(asyncio.to_thread(self.spawn, "worker", self.server.url) for _ in range(workers)),
        )
        self.apis, self.workers = list(procs[:apis]), list(procs[apis:])
        self.born.update({w.proc.pid: -1.0 for w in self.workers if w.proc})
        self.keys = await keys_of(self.redis)
        for w in self.workers:
            await wait_for(lambda w=w: worker_registered(self.redis, self.keys, w), 15, "the workers to register")

    async def close(self) -> None:
        await self.redis.aclose()

    async def spawn_api(self, d: dict) -> ParleyProcess:
        """Start an API; one that fails to start is a finding (recorded), and it is tried again (three times)."""
        for attempt in range(3):
            try:
                return await asyncio.to_thread(self.spawn, "api", self.server.url, self.api_env)
            except RuntimeError as e:
                self.dead.append(f"at {self.now():.1f}s an API failed to start: {str(e)[-600:]}")
                d.update(api_start_failures=attempt + 1)
                await asyncio.sleep(1.0)
        raise RuntimeError("an API failed to start three times; see the report above")

    async def spawn_worker(self) -> ParleyProcess:
        worker = await asyncio.to_thread(self.spawn, "worker", self.server.url)
        assert worker.proc is not None
        self.born[worker.proc.pid] = self.now()
        return worker

    def kill_server(self) -> None:
        self.server.kill()
        self.redis_killed_at.append(self.now())

    def lived_through(self, worker: ParleyProcess) -> str:
        """When the worker started and which Redis kills it has lived through, for a report."""
        born = self.born.get(worker.proc.pid if worker.proc else -1, 0.0)
        kills = [f"{t:.1f}s" for t in self.redis_killed_at if t > born]
        return f"started at {born:.1f}s; Redis killed since: {', '.join(kills) or 'never'}"

    def url(self, i: int) -> str:
        return self.apis[i % len(self.apis)].url

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- the load ----------------------------------------------------------------------------------------------
    async def post(self, w: int, n: int, tenant: str, path: str, body: dict, key: str | None) -> dict | None:
        """POST once (no key) or, with an Idempotency-Key, until a 2xx (bounded): the 2xx body, or None."""
        attempt, delay = 0, 0.05
        retry_until = time.monotonic() + 60  # cut to the recovery bound once the chaos stops
        while True:
            headers = auth(tenant) | ({"Idempotency-Key": key} if key else {})
            url = self.url(w + n + attempt)
            res = await self.traffic.request("write", "POST", url + path, f"POST {path}", json=body, headers=headers)
            if res is not None and res.status_code < 300:
                self.acks += 1
                return res.json()
            if res is not None and (400 <= res.status_code < 500 or res.status_code == 500):
                self.unexpected.append(f"POST {path} via {url}: {res.status_code} {res.text[:200]}")
                return None
            if key is None:
                return None
            if self.stop.is_set():
                retry_until = min(retry_until, self.stopped_at + RECOVERY_S)
            if time.monotonic() >= retry_until:
                return None
            attempt += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.4)

    async def writer(self, w: int) -> None:
        """Writer w owns its sessions: creates one, adds MESSAGES_PER_SESSION messages, reads them back as it goes,
        moves on. Even writers send Idempotency-Keys and retry until acknowledged; odd ones never retry."""
        wrng = random.Random(SEED * 1000 + w)
        tenant = "globex" if w % 3 == 2 else "acme"
        idempotent = w % 2 == 0
        current: AckedSession | None = None
        for n in range(1, MAX_WRITES_PER_WRITER + 1):
            if self.stop.is_set():
                return
            key = f"chaos-w{w}-{n}" if idempotent else None
            if current is None or len(current.messages) >= MESSAGES_PER_SESSION:
                body = {"situation": f"chaos w{w} n{n}", "metadata": {"w": w, "n": n}}
                got = await self.post(w, n, tenant, "/sessions", body, key)
                if got is not None:
                    current = AckedSession(got["id"], tenant, w, idempotent, got)
                    self.sessions[current.sid] = current
                    await self.read_session(w, n, current)
                elif key is not None:
                    current = None  # its create may be in Redis; it is not in the ledger, so nothing is checked
            else:
                body = {"role": "user" if n % 2 else "assistant", "content": f"w{w}-n{n}"}
                got = await self.post(w, n, tenant, f"/sessions/{current.sid}/messages", body, key)
                if got is not None:
                    current.messages.append(got)
                    if len(current.messages) % READ_EVERY == 0:
                        await self.read_messages(w, n, current)
                elif key is not None:
                    current.unresolved += 1
            if n % LIST_EVERY == 0:
                await self.read_list(w, n, tenant)
            await asyncio.sleep(wrng.uniform(0.005, 0.03))

    async def read_session(self, w: int, n: int, s: AckedSession) -> None:
        url = f"{self.url(w + n)}/sessions/{s.sid}"
        res = await self.traffic.request("read", "GET", url, "GET session", headers=auth(s.tenant))
        if res is not None and res.status_code == 200 and res.json().get("id") != s.sid:
            self.stale_reads.append(f"GET session {s.sid}: {res.text[:200]}")
        self._unexpected_read(res, "GET session")

    async def read_messages(self, w: int, n: int, s: AckedSession) -> None:
        """Read your writes: a 200 must hold every message acknowledged before the GET began, in order."""
        want = [m["id"] for m in s.messages]
        acked = set(want)
        url = f"{self.url(w + n + 1)}/sessions/{s.sid}/messages"
        res = await self.traffic.request(
            "read", "GET", url, "GET messages", params={"limit": 1000}, headers=auth(s.tenant)
        )
        if res is not None and res.status_code == 200:
            got = [m["id"] for m in res.json()["items"]]
            if [i for i in got if i in acked] != want:
                self.stale_reads.append(f"GET messages {s.sid} via {url}: {len(want)} acknowledged, read {len(got)}")
        self._unexpected_read(res, "GET messages")

    async def read_list(self, w: int, n: int, tenant: str) -> None:
        """The tenant's list shows every session this writer had acknowledged before the GET began."""
        want = {s.sid for s in self.sessions.values() if s.writer == w}
        url = f"{self.url(w + n)}/sessions"
        res = await self.traffic.request("read", "GET", url, "GET list", params={"limit": 1000}, headers=auth(tenant))
        if res is not None and res.status_code == 200:
            missing = want - {s["id"] for s in res.json()["items"]}
            if missing:
                self.stale_reads.append(f"GET /sessions as {tenant}: {len(missing)} acknowledged sessions missing")
        self._unexpected_read(res, "GET list")

    def _unexpected_read(self, res: httpx.Response | None, what: str) -> None:
        if res is not None and (400 <= res.status_code < 500 or res.status_code == 500):
            self.unexpected.append(f"{what}: {res.status_code} {res.text[:200]}")

    # -- the chaos ---------------------------------------------------------------------------------------------
    def schedule(self) -> list[str]:
        """One of each action and EXTRA_ACTIONS more, in a seeded random order; then one last Redis kill with every
        process up, so the checks after the chaos see processes that lived through one."""
        actions = list(CHAOS_ACTIONS) + [self.rng.choice(CHAOS_ACTIONS[:4]) for _ in range(EXTRA_ACTIONS)]
        self.rng.shuffle(actions)
        return actions + ["kill_redis"]

    async def run(self) -> None:
        """The load (WRITERS writers) and the chaos together, until the last action is done and a second after."""
        actions = self.schedule()
        self.t0 = time.monotonic()
        try:
            await run_all(*(self.writer(w) for w in range(WRITERS)), self.run_chaos(actions))
        finally:
            self.server.resume()

    async def run_chaos(self, actions: list[str]) -> None:
        await wait_for(self._acked(WARM_UP_ACKS), 30, f"{WARM_UP_ACKS} acknowledged writes before the chaos")
        for name in actions:
            await asyncio.sleep(self.rng.uniform(0.3, 0.8))
            event = ChaosEvent(name, self.now())
            self.events.append(event)
            await getattr(self, name)(event.details)
            event.end = self.now()
        await asyncio.sleep(1.0)  # a last stretch of load with everything up
        self.stopped_at = time.monotonic()
        self.stop.set()

    def _acked(self, n: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return self.acks >= n

        return check

    async def kill_api(self, d: dict) -> None:
        i = self.rng.randrange(len(self.apis))
        self.apis[i].kill()
        await asyncio.sleep(self.rng.uniform(0.1, 0.5))  # clients keep sending to the dead port meanwhile
        self.apis[i] = await self.spawn_api(d)
        d.update(api=i)

    async def kill_worker(self, d: dict) -> None:
        i = self.rng.randrange(len(self.workers))
        self._check_alive(self.workers[i])
        self.workers[i].kill()
        await asyncio.sleep(self.rng.uniform(0.2, 1.0))
        self.workers[i] = await self.spawn_worker()
        d.update(worker=i)

    async def kill_worker_during_startup(self, d: dict) -> None:
        """Kill a worker, start it, kill it again within 0.5 s of its start (mid start-up), start it again."""
        await self.kill_worker(d)
        await asyncio.sleep(after := self.rng.uniform(0.05, 0.5))
        self.workers[d["worker"]].kill()
        self.workers[d["worker"]] = await self.spawn_worker()
        d.update(killed_again_after_s=round(after, 2))

    async def pause_redis(self, d: dict) -> None:
        pause_s = self.rng.uniform(1.5, 3.0)
        self.server.pause()
        try:
            await asyncio.sleep(pause_s)
        finally:
            self.server.resume()
        d.update(paused_s=round(pause_s, 2))

    async def settle(self, d: dict) -> None:
        """Before killing Redis: wait (bounded) until every running worker heart-beats, so the kill hits running
        workers (start-up is what the other actions hit; a worker that died by itself is reported, not awaited)."""
        started = time.monotonic()

        async def all_up() -> bool:
            ages = [await heartbeat_age_s(self.redis, self.keys, w) for w in self.workers if running(w)]
            return all(a is not None and a < 3.0 for a in ages)

        d.update(settled=await poll_until(all_up, SETTLE_S), settle_s=round(time.monotonic() - started, 1))

    async def kill_redis(self, d: dict) -> None:
        await self.settle(d)
        self.kill_server()
        await asyncio.sleep(down := self.rng.uniform(0.2, 1.0))
        await asyncio.to_thread(self.server.start)  # same port, same data dir: it reloads its AOF
        d.update(down_s=round(down, 2))

    async def kill_redis_then_worker_while_loading(self, d: dict) -> None:
        """Kill redis-server, restart it with an AOF load slowed to ~LOADING_S, and while it is LOADING kill a worker
        and start it again (so the new worker starts against a loading Redis)."""
        await self.settle(d)
        self.kill_server()
        commands = await asyncio.to_thread(approx_aof_commands, self.server.data_dir)
        self.server.key_load_delay = load_delay_for(commands, LOADING_S)
        try:
            await asyncio.to_thread(self.server.start, until="listening")
            i = self.rng.randrange(len(self.workers))
            d.update(worker=i, aof_commands=commands, key_load_delay=self.server.key_load_delay)
            d.update(state_at_kill=await redis_state(self.server.port))
            self._check_alive(self.workers[i])
            self.workers[i].kill()
            self.workers[i] = await self.spawn_worker()
            respawned = time.monotonic()
            d.update(state_at_respawn=await redis_state(self.server.port))
            await asyncio.to_thread(self.server.wait_loaded)
            d.update(loading_after_respawn_s=round(time.monotonic() - respawned, 2))
        finally:
            self.server.key_load_delay = None

    def _check_alive(self, proc: ParleyProcess) -> None:
        """A process we are about to kill should have been running: note it if it had died by itself."""
        if not running(proc):
            self.dead.append(f"at {self.now():.1f}s found dead before a planned kill: {excerpt(proc)}")


async def test_chaos_kills_pauses_and_restarts_keep_every_acknowledged_write_and_recover(slow_redis, spawn):
    """2 APIs + 2 workers + redis-server under a steady write+read load while a seeded chaos task kills an API,
    the workers (also mid start-up and while Redis loads its AOF) and redis-server, and pauses redis-server.
    Then: nothing hung during the chaos, every process recovered, everything acknowledged is read back exactly
    once and in order, and each API and worker still serves."""
    v = Verdict("chaos")
    async with httpx.AsyncClient(timeout=HANG_BOUND_S, limits=httpx.Limits(max_connections=100)) as client:
        chaos = Chaos(slow_redis(), spawn, client)
        try:
            await chaos.start()
            await chaos.run()
            deadline = chaos.stopped_at + RECOVERY_S
            _verify_during_chaos(v, chaos)
            await _verify_processes(v, chaos, deadline)
            await _verify_acknowledged(v, chaos, deadline)
            await _verify_serving(v, chaos)
        finally:
            await chaos.close()
    v.finish()


def _verify_during_chaos(v: Verdict, chaos: Chaos) -> None:
    """What the clients saw while the chaos ran."""
    traffic = chaos.traffic
    v.note("chaos actions (t since load start)", "; ".join(map(str, chaos.events)))
    v.note(
        "load",
        f"{chaos.acks} writes acknowledged; writes {dict(traffic.outcomes('write'))}; reads {dict(traffic.outcomes('read'))}",
    )
    hangs = traffic.hangs()
    v.check(
        f"nothing hangs: no request without an answer within {HANG_BOUND_S:.0f}s",
        not hangs,
        f"{len(hangs)} timed out, e.g. "
        + "; ".join(f"{s.what} at {s.start - chaos.t0:.1f}s: {s.outcome}" for s in hangs[:5]),
    )
    for e in chaos.events:
        if e.name == "pause_redis":
            paused, resumed = chaos.t0 + e.start, chaos.t0 + e.end
            in_flight = [s for s in traffic.sent if s.start <= resumed and s.end >= paused]
            v.note(
                f"requests in flight while Redis was paused {e.details['paused_s']}s at {e.start:.1f}s "
                "(required: 503 store_unavailable within ~1 s)",
                latency_summary(in_flight),
            )
    v.check(
        "no unexpected 4xx or 500 answers",
        not chaos.unexpected,
        f"{len(chaos.unexpected)}, e.g. {chaos.unexpected[:3]}",
    )
    v.check(
        "reads are never stale (a 200 holds every write acknowledged before it)",
        not chaos.stale_reads,
        f"{chaos.stale_reads[:5]}",
    )
    unresolved = sum(s.unresolved for s in chaos.sessions.values())
    v.check("every idempotent write was eventually acknowledged", unresolved == 0, f"{unresolved} never acknowledged")


async def _verify_processes(v: Verdict, chaos: Chaos, deadline: float) -> None:
    """No process exited by itself; the surviving workers heart-beat; /ready is back on every API. Dead processes
    are then replaced, so the checks after these still tell something."""
    dead = list(chaos.dead) + [excerpt(p) for p in chaos.apis + chaos.workers if not running(p)]
    v.check(
        "every process that should run is running (none exited by itself)", not dead, "\n    " + "\n    ".join(dead)
    )
    v.check("redis-server is running", chaos.server.proc is not None and chaos.server.proc.poll() is None)
    survivors = [w for w in chaos.workers if running(w)]
    for i, p in enumerate(chaos.apis):
        if not running(p):
            chaos.apis[i] = await chaos.spawn_api({})
    for i, p in enumerate(chaos.workers):
        if not running(p):
            chaos.workers[i] = await chaos.spawn_worker()

    async def fresh_heartbeat(w: ParleyProcess) -> bool:
        age = await heartbeat_age_s(chaos.redis, chaos.keys, w)
        return age is not None and age < 3.0

    for w in survivors:
        ok = await poll_until(lambda w=w: fresh_heartbeat(w), max(deadline - time.monotonic(), 0.1))
        age = await heartbeat_age_s(chaos.redis, chaos.keys, w)
        v.check(
            f"surviving worker pid {w.proc.pid} heart-beats (its projector runs)",
            ok,
            f"last heartbeat {'never' if age is None else f'{age:.1f}s ago'}; {chaos.lived_through(w)}\n    {excerpt(w)}",
        )

    async def ready(url: str) -> bool:
        try:
            return (await chaos.traffic.client.get(url + "/ready")).status_code == 200
        except httpx.HTTPError:
            return False

    for p in chaos.apis:
        ok = await poll_until(lambda p=p: ready(p.url), max(deadline - time.monotonic(), 0.1))
        v.check(f"/ready answers 200 on API :{p.port} within {RECOVERY_S:.0f}s of the chaos", ok)


async def _get_until_200(
    client: httpx.AsyncClient, url: str, deadline: float, **kw: Any
) -> tuple[httpx.Response | None, Counter]:
    """GET until 200 or the deadline (retrying 503s and transport errors); the last answer and the others seen."""
    seen: Counter = Counter()
    while True:
        try:
            res = await client.get(url, **kw)
            if res.status_code == 200:
                return res, seen
            seen[outcome_of(res)] += 1
            if res.status_code != 503:
                return res, seen
        except httpx.HTTPError as e:
            res = None
            seen[type(e).__name__] += 1
        if time.monotonic() >= deadline:
            return res, seen
        await asyncio.sleep(0.1)


async def _verify_acknowledged(v: Verdict, chaos: Chaos, deadline: float) -> None:
    """Every acknowledged session and message read back (alternating between the APIs) exactly once, in order,
    as acknowledged; the sessions of idempotent writers hold nothing else."""
    client = chaos.traffic.client
    sessions = list(chaos.sessions.values())
    not_200: list[str] = []
    lost: list[str] = []
    wrong: list[str] = []
    on_the_way: Counter = Counter()
    for n, s in enumerate(sessions):
        url = f"{chaos.apis[n % len(chaos.apis)].url}/sessions/{s.sid}"
        res, seen = await _get_until_200(client, url, deadline, headers=auth(s.tenant))
        on_the_way.update(seen)
        if res is None or res.status_code != 200:
            not_200.append(f"GET session {s.sid}: {dict(seen)}")
            continue
        fields = ("id", "situation", "metadata", "created_at")
        if {k: res.json()[k] for k in fields} != {k: s.created[k] for k in fields}:
            wrong.append(f"session {s.sid}: {res.text[:200]} != acknowledged {s.created}")
        res, seen = await _get_until_200(
            client, url + "/messages", deadline, params={"limit": 1000}, headers=auth(s.tenant)
        )
        on_the_way.update(seen)
        if res is None or res.status_code != 200:
            not_200.append(f"GET messages {s.sid}: {dict(seen)}")
            continue
        items = res.json()["items"]
        times = Counter(m["id"] for m in items)
        acked = {m["id"]: m for m in s.messages}
        if missing := [i for i in acked if times[i] == 0]:
            lost.append(f"session {s.sid}: {len(missing)} of {len(acked)} acknowledged messages missing")
        if doubled := [i for i, c in times.items() if c > 1]:
            wrong.append(f"session {s.sid}: messages listed twice: {doubled[:3]}")
        if [m for m in items if m["id"] in acked] != [m for i, m in acked.items() if times[i]]:
            wrong.append(f"session {s.sid}: acknowledged messages out of order or changed")
        if [m["seq"] for m in items] != list(range(1, len(items) + 1)):
            wrong.append(f"session {s.sid}: seqs are not 1..n: {[m['seq'] for m in items]}")
        if s.idempotent and not s.unresolved and list(times) != list(acked):
            wrong.append(
                f"session {s.sid} of idempotent writer {s.writer}: {len(items)} listed, {len(acked)} acknowledged"
            )
    v.check(
        f"read models caught up: GETs of all {len(sessions)} acknowledged sessions answer 200 within {RECOVERY_S:.0f}s",
        not not_200,
        f"{len(not_200)} did not, e.g. {not_200[:3]}; other answers on the way: {dict(on_the_way)}",
    )
    v.check(
        f"every acknowledged message ({sum(len(s.messages) for s in sessions)}) is read back", not lost, f"{lost[:5]}"
    )
    v.check(
        "each exactly once, in order, as acknowledged (idempotent writers: nothing else)", not wrong, f"{wrong[:5]}"
    )

    listed: Counter = Counter()
    for tenant in sorted({s.tenant for s in sessions}):
        url = f"{chaos.apis[0].url}/sessions"
        res, seen = await _get_until_200(client, url, deadline, params={"limit": 1000}, headers=auth(tenant))
        if res is not None and res.status_code == 200:
            listed.update(i["id"] for i in res.json()["items"])
        else:
            v.check(f"GET /sessions as {tenant} answers 200", False, f"{dict(seen)}")
    unlisted = [s.sid for s in sessions if listed[s.sid] != 1]
    v.check(
        "every acknowledged session is listed exactly once in its tenant's GET /sessions",
        not unlisted,
        f"{len(unlisted)} not, e.g. {unlisted[:3]}",
    )


async def _verify_serving(v: Verdict, chaos: Chaos) -> None:
    """Each API takes a fresh write and reads it back; each worker still runs chat jobs."""
    client = chaos.traffic.client
    for p in chaos.apis:
        v.check(f"a fresh write + read succeeds on API :{p.port}", *await _fresh_write_and_read(client, p.url))
    for w in chaos.workers:
        status, evidence = await _chat_probe_on(w, chaos.workers, client, chaos.apis[0].url)
        v.check(
            f"worker pid {w.proc.pid} still runs chat jobs (probed with the other workers SIGSTOPped)",
            status == 200,
            f"{evidence}; the worker {chaos.lived_through(w)}",
        )


async def _fresh_write_and_read(client: httpx.AsyncClient, url: str) -> tuple[bool, str]:
    try:
        created = await client.post(url + "/sessions", json={"situation": "after the chaos"}, headers=auth())
        if created.status_code != 201:
            return False, f"POST /sessions: {outcome_of(created)}"
        sid = created.json()["id"]
        body = {"role": "user", "content": "still here?"}
        added = await client.post(f"{url}/sessions/{sid}/messages", json=body, headers=auth())
        if added.status_code != 201:
            return False, f"POST message: {outcome_of(added)}"
        read = await client.get(f"{url}/sessions/{sid}/messages", headers=auth())
        if read.status_code != 200 or [m["id"] for m in read.json()["items"]] != [added.json()["id"]]:
            return False, f"GET messages: {outcome_of(read)} {read.text[:200]}"
        return True, ""
    except httpx.HTTPError as e:
        return False, f"{type(e).__name__}: {e}"


async def _chat_probe_on(
    worker: ParleyProcess, workers: list[ParleyProcess], client: httpx.AsyncClient, url: str
) -> tuple[int, str]:
    """A chat that only `worker` can run: the other workers are paused (SIGSTOP) meanwhile. A worker whose chat
    loop died keeps heart-beating and projecting (and /ready stays 200), so this is the way to see it."""
    others = [w for w in workers if w is not worker and running(w)]
    for w in others:
        w.proc.send_signal(signal.SIGSTOP)
    try:
        return await _chat_probe(client, url)
    finally:
        for w in others:
            w.proc.send_signal(signal.SIGCONT)


async def _chat_probe(client: httpx.AsyncClient, url: str) -> tuple[int, str]:
    """One synchronous chat (offline model): 200, or 504 `chat_timeout` after CHAT_WAIT_S if no worker ran it."""
    try:
        created = await client.post(url + "/sessions", json={"situation": "chat probe"}, headers=auth())
        body = {"messages": [{"role": "user", "content": "ping"}]}
        res = await client.post(
            f"{url}/sessions/{created.json()['id']}/chat", json=body, headers=auth(), timeout=CHAT_WAIT_S + 10
        )
        return res.status_code, outcome_of(res) + (f" {res.text[:160]}" if res.status_code != 200 else "")
    except httpx.HTTPError as e:
        return 0, f"{type(e).__name__}: {e}"


# ================================================================================================================
# 2. a worker starting while redis-server loads its AOF, or while redis-server is killed
# ================================================================================================================

PADDING_KEYS = 20_000
LOAD_DELAY_US = 50
"""With PADDING_KEYS AOF commands: at least 1 s of LOADING (USLEEP_US makes it ~3 s on Linux)."""
WORKER_RECOVERY_S = 6.0
REDIS_DOWN_S = 3.0
"""Longer than the worker's start-up after its partition check (tokenizer warm-up, ~1 s; more on a busy machine)."""


async def _session_with_a_message(client: httpx.AsyncClient, api: ParleyProcess) -> str:
    created = await client.post(api.url + "/sessions", json={"situation": "outage"}, headers=auth())
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    added = await client.post(
        f"{api.url}/sessions/{sid}/messages", json={"role": "user", "content": "before"}, headers=auth()
    )
    assert added.status_code == 201, added.text
    return sid


async def _projects_and_ready(
    v: Verdict, client: httpx.AsyncClient, api: ParleyProcess, worker: ParleyProcess, sid: str
) -> None:
    """After Redis is back: the worker started during the outage is still running (this test never restarts it),
    a new write is projected (GET answers 200 with it) and /ready is 200, within WORKER_RECOVERY_S."""
    deadline = time.monotonic() + WORKER_RECOVERY_S
    key = f"after-restart-{sid}"
    body = {"role": "user", "content": key}
    added = None
    while time.monotonic() < deadline:  # the API may answer 503 for a moment after Redis is back
        added = await client.post(
            f"{api.url}/sessions/{sid}/messages", json=body, headers=auth() | {"Idempotency-Key": key}
        )
        if added.status_code == 201:
            break
        await asyncio.sleep(0.1)
    v.check(
        "the API accepts a write once Redis is back",
        added is not None and added.status_code == 201,
        f"{added and outcome_of(added)}",
    )

    seen: Counter = Counter()
    found = False

    async def projected_or_dead() -> bool:
        nonlocal found
        res = await client.get(f"{api.url}/sessions/{sid}/messages", params={"limit": 1000}, headers=auth())
        seen[outcome_of(res)] += 1
        found = res.status_code == 200 and any(m["content"] == key for m in res.json()["items"])
        return found or not running(worker)

    await poll_until(projected_or_dead, max(deadline - time.monotonic(), 0.1))
    alive = running(worker)
    v.check("the worker started during the outage is still running (it is never restarted)", alive, excerpt(worker))
    v.check(
        f"GET after POST answers 200 with the write within {WORKER_RECOVERY_S:.0f}s (the worker projects)",
        alive and found,
        f"GET outcomes {dict(seen)}" + (f"; the worker runs but does not project: {excerpt(worker)}" if alive else ""),
    )

    async def ready_or_dead() -> bool:
        return not running(worker) or (await client.get(api.url + "/ready")).status_code == 200

    await poll_until(ready_or_dead, max(deadline - time.monotonic(), 0.1))
    res = await client.get(api.url + "/ready")
    v.check(
        f"/ready answers 200 within {WORKER_RECOVERY_S:.0f}s",
        res.status_code == 200,
        f"{res.status_code} {res.text[:200]}",
    )


async def test_worker_starting_while_redis_loads_its_aof_recovers(slow_redis, spawn):
    """Restart redis-server with an AOF that takes seconds to load and start a worker while it is LOADING
    (its first commands get BusyLoadingError): once loading ends the worker must project and /ready be 200,
    without being restarted."""
    v = Verdict("worker starting while Redis loads its AOF")
    server = slow_redis()
    api, old_worker = await asyncio.gather(
        asyncio.to_thread(spawn, "api", server.url), asyncio.to_thread(spawn, "worker", server.url)
    )
    r = Redis.from_url(server.url)
    try:
        keys = await keys_of(r)
        await wait_for(lambda: worker_registered(r, keys, old_worker), 15, "the first worker to register")
        async with httpx.AsyncClient(timeout=HANG_BOUND_S) as client:
            sid = await _session_with_a_message(client, api)
            pipe = r.pipeline(transaction=False)
            for i in range(PADDING_KEYS):  # AOF commands to replay slowly on the restart
                pipe.set(f"padding:{i}", i)
            await pipe.execute()
            old_worker.kill()  # the new worker is to be the only projector,
            await r.delete(keys.projectors)  # and /ready must not count the dead one's last heartbeat (10 s)

            server.kill()
            server.key_load_delay = LOAD_DELAY_US
            await asyncio.to_thread(server.start, until="listening")
            state = await redis_state(server.port)
            assert state == "loading", f"test setup: the restarted redis-server should be LOADING, is {state}"
            started = time.monotonic()
            worker = await asyncio.to_thread(spawn, "worker", server.url)
            await asyncio.to_thread(server.wait_loaded, 30)
            loading_s = time.monotonic() - started
            v.note(
                "Redis was still LOADING this long after the worker started",
                f"{loading_s:.1f}s (it connects ~0.3 s after start)",
            )
            assert loading_s > 1.0, "test setup: loading ended before the worker could have connected"
            v.note("worker alive when loading ended", str(running(worker)))
            await _projects_and_ready(v, client, api, worker, sid)
    finally:
        await r.aclose()
    v.finish()


@pytest.mark.parametrize("moment", ["down_at_start", "after_partition_check"])
async def test_worker_starting_while_redis_is_killed_recovers(fresh_redis, spawn, moment):
    """Kill redis-server while a worker starts and restart it REDIS_DOWN_S later: the worker must recover by itself,
    project, and /ready be 200. Two moments of its start-up: Redis already down when it starts (its first command
    is refused), or killed right after its partition check (`cmd=hget` on its connection), while it warms up its
    tokenizer, before its projector creates its consumer groups."""
    v = Verdict(f"worker starting while Redis is killed ({moment})")
    server = fresh_redis()
    api = await asyncio.to_thread(spawn, "api", server.url)
    r = Redis.from_url(server.url)
    try:
        async with httpx.AsyncClient(timeout=HANG_BOUND_S) as client:
            sid = await _session_with_a_message(client, api)
            if moment == "down_at_start":
                server.kill()
                worker = await asyncio.to_thread(spawn, "worker", server.url)
            else:
                before = {c["id"] for c in await r.client_list()}
                worker = await asyncio.to_thread(spawn, "worker", server.url)

                async def checked_partitions() -> bool:
                    # its partition check (HGET), or the script loading that follows it at once
                    return any(
                        c["id"] not in before and c["cmd"] in ("hget", "script|load") for c in await r.client_list()
                    )

                await wait_for(checked_partitions, 15, "the worker's partition check", 0.002)
                server.kill()
            await asyncio.sleep(REDIS_DOWN_S)
            v.note(f"worker alive after {REDIS_DOWN_S:.0f}s of Redis down", str(running(worker)))
            await asyncio.to_thread(server.start)
            await _projects_and_ready(v, client, api, worker, sid)
    finally:
        await r.aclose()
    v.finish()


# ================================================================================================================
# 3. reads right after writes never answer 503 because a worker died
# ================================================================================================================

READ_SESSIONS = 40
READ_WRITERS = 8
WINDOW_S = 5.0
"""How long after a kill the read-your-write GETs are counted."""
SINGLE_WORKER_DOWN_S = 3.0


async def kill_holding_work(r: Redis, keys: Keys, victim: ParleyProcess, tries_s: float = 2.0) -> int:
    """Kill -9 the worker at a moment it holds unprojected work: freeze it (SIGSTOP), look at the feed entries it
    has read and not acknowledged, and kill it if one's session is behind, else let it go on and look again.
    Bounded: after `tries_s` it is killed anyway. Answers how many lagging sessions it held."""
    deadline = time.monotonic() + tries_s
    held = 0
    while True:
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(0.02)  # let what it had already sent (an APPLY, an ACK) land first
        held = await held_unprojected(r, keys, victim)
        if held or time.monotonic() >= deadline:
            victim.kill()  # SIGKILL works on a stopped process
            return held
        victim.proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(0.003)


async def test_reads_never_503_across_a_worker_kill(fresh_redis, spawn):
    """Steady writes on many sessions, each acknowledged POST followed at once by a GET of that message; the GETs
    in flight during WINDOW_S seconds from each of two kills that answer 503 are counted (the requirement is none):

    1. two workers, one killed -9 while it holds unprojected work: the other one is there, so no reader should
       wait on the dead one's entries;
    2. then the survivor, now the only worker, is killed and restarted SINGLE_WORKER_DOWN_S later: the reading
       API process is to catch the session up itself rather than answer 503."""
    v = Verdict("reads right after writes, across worker kills")
    server = fresh_redis()
    api, *workers = await asyncio.gather(
        asyncio.to_thread(spawn, "api", server.url), *(asyncio.to_thread(spawn, "worker", server.url) for _ in range(2))
    )
    r = Redis.from_url(server.url)
    try:
        keys = await keys_of(r)
        for w in workers:
            await wait_for(lambda w=w: worker_registered(r, keys, w), 15, "the workers to register")
        async with httpx.AsyncClient(timeout=HANG_BOUND_S, limits=httpx.Limits(max_connections=64)) as client:
            traffic = Traffic(client)
            sids = []
            for j in range(READ_SESSIONS):
                created = await client.post(api.url + "/sessions", json={"situation": f"rw-{j}"}, headers=auth())
                assert created.status_code == 201, created.text
                sids.append(created.json()["id"])
            stop = asyncio.Event()
            stale: list[str] = []

            async def writer(w: int) -> None:
                mine = sids[w::READ_WRITERS]
                n = 0
                while not stop.is_set():
                    n += 1
                    sid = mine[n % len(mine)]
                    url = f"{api.url}/sessions/{sid}/messages"
                    body = {"role": "user", "content": f"w{w}-{n}"}
                    res = await traffic.request("write", "POST", url, "POST message", json=body, headers=auth())
                    if res is None or res.status_code != 201:
                        await asyncio.sleep(0.05)
                        continue
                    msg = res.json()
                    page = {"offset": msg["seq"] - 1, "limit": 1}
                    got = await traffic.request("read", "GET", url, "GET my write", params=page, headers=auth())
                    if (
                        got is not None
                        and got.status_code == 200
                        and [m["id"] for m in got.json()["items"]] != [msg["id"]]
                    ):
                        stale.append(f"{sid} seq {msg['seq']}: {got.text[:160]}")
                    await asyncio.sleep(0.005)

            windows: list[tuple[str, float, float]] = []

            async def killer() -> None:
                await asyncio.sleep(1.0)  # steady state first
                phase = "1. one of two workers killed"
                start = time.monotonic()  # the window opens as the victim is frozen to be killed
                held = await kill_holding_work(r, keys, workers[0])
                v.note(f"{phase}: lagging sessions the killed worker held", str(held))
                await asyncio.sleep(WINDOW_S)
                windows.append((phase, start, time.monotonic()))

                phase = f"2. the only worker down {SINGLE_WORKER_DOWN_S:.0f}s, then restarted"
                start = time.monotonic()
                held = await kill_holding_work(r, keys, workers[1])
                v.note(f"{phase}: lagging sessions the killed worker held", str(held))
                await asyncio.sleep(SINGLE_WORKER_DOWN_S)
                workers[1] = await asyncio.to_thread(spawn, "worker", server.url)
                await asyncio.sleep(max(start + WINDOW_S - time.monotonic(), 0))
                windows.append((phase, start, time.monotonic()))
                stop.set()

            await run_all(*(writer(w) for w in range(READ_WRITERS)), killer())

        for phase, start, end in windows:
            in_window = traffic.in_flight("read", start, end)
            reads = Counter(s.outcome for s in in_window)
            v.note(
                f"{phase}: GETs in flight in the {WINDOW_S:.0f}s from the kill",
                f"{latency_summary(in_window)}; writes {dict(traffic.outcomes('write', start, end))}",
            )
            sent_at = [f"{s.start - start:+.2f}" for s in in_window if s.outcome.startswith("503")]
            if sent_at:
                v.note(f"{phase}: GETs answered 503 were sent at (s from the kill)", ", ".join(sent_at[:20]))
            n503 = sum(c for o, c in reads.items() if o.startswith("503"))
            v.check(
                f"{phase}: no read-your-write GET answers 503",
                n503 == 0,
                f"{n503} of {sum(reads.values())} reads answered 503: {dict(reads)}",
            )
        other = {o: c for o, c in traffic.outcomes("read").items() if o != "200" and not o.startswith("503")}
        v.check(
            "no read-your-write GET answers stale data or another error",
            not other and not stale,
            f"other {other}; stale {stale[:3]}",
        )
        writes = traffic.outcomes("write")
        v.check("every write is acknowledged (201)", set(writes) <= {"201"}, f"{dict(writes)}")
        v.check(f"nothing hangs (no request over {HANG_BOUND_S:.0f}s)", not traffic.hangs(), f"{len(traffic.hangs())}")
    finally:
        await r.aclose()
    v.finish()
