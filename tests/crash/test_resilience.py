"""Nothing hangs, nothing dies unseen, open streams starve nothing: real processes, loopback only, bounded.

- Redis paused (SIGSTOP): every request answers 503 `store_unavailable` with `Retry-After` within about a second,
  `/ready` answers 503 at once; after SIGCONT everything answers again and every acknowledged write is there once.
- An unexpected error in the projector stops the worker process with a non-zero exit and a log line, so its own
  supervisor (systemd, Kubernetes) restarts it, instead of leaving a process that answers but projects nothing.
- 500 open `/events` streams hold no Redis connection each: ordinary requests keep answering and every stream
  receives the events appended after it opened.

The bounds below say "did not hang" (a request that hangs would take the full pause); they are not speed targets.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from tests.support import API_KEYS, ROOT, auth, wait_ready

pytestmark = pytest.mark.slow

ACME = auth("acme")
PAUSE_S = 4.0
HANG_BOUND_S = 2.5
"""A request answered later than this during a pause of PAUSE_S waited on Redis instead of its deadline (1 s)."""


async def test_a_paused_redis_makes_requests_answer_503_within_their_deadline_not_hang(fresh_redis, spawn):
    redis = fresh_redis()
    api = spawn("api", redis.url)
    spawn("worker", redis.url)
    wait_ready(api.url)
    async with httpx.AsyncClient(base_url=api.url, timeout=PAUSE_S + 5) as c:
        sid = (await c.post("/sessions", json={}, headers=ACME)).json()["id"]
        acked = [
            (
                await c.post(f"/sessions/{sid}/messages", json={"role": "user", "content": "before"}, headers=ACME)
            ).json()["id"]
        ]
        assert redis.proc is not None
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            # the health part notices within its interval plus its ping's timeout (0.25 + 0.5 s; 0.7 s raced it)
            await asyncio.sleep(1.0)
            timings: dict[str, float] = {}

            async def timed(name: str, call) -> httpx.Response:
                start = time.monotonic()
                r = await call
                timings[name] = time.monotonic() - start
                return r

            ready, write, read, listing = await asyncio.gather(
                timed("ready", c.get("/ready")),
                timed(
                    "write",
                    c.post(f"/sessions/{sid}/messages", json={"role": "user", "content": "paused"}, headers=ACME),
                ),
                timed("read", c.get(f"/sessions/{sid}", headers=ACME)),
                timed("list", c.get("/sessions", headers=ACME)),
            )
            print(f"answers during a {PAUSE_S:.0f} s pause (s): { ({k: round(v, 2) for k, v in timings.items()}) }")
            assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
            assert timings["ready"] < 0.5, timings  # answered from what the health part saw: no Redis call
            for r in (write, read, listing):
                assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
                assert r.headers["retry-after"] == "1"
            assert max(timings.values()) < HANG_BOUND_S, timings
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)

        # back: the paused write may or may not have landed (its client was told 503); acknowledged ones are there
        async def ready_again() -> bool:
            return (await c.get("/ready")).status_code == 200

        deadline = time.monotonic() + 10
        while not await ready_again():
            assert time.monotonic() < deadline, "not ready 10 s after Redis came back"
            await asyncio.sleep(0.1)
        r = await c.post(f"/sessions/{sid}/messages", json={"role": "user", "content": "after"}, headers=ACME)
        assert r.status_code == 201, r.text
        acked.append(r.json()["id"])
        items = (await c.get(f"/sessions/{sid}/messages", headers=ACME)).json()["items"]
        ids = [m["id"] for m in items]
        assert all(ids.count(a) == 1 for a in acked) and ids.index(acked[0]) < ids.index(acked[1])


FAULTY_WORKER = textwrap.dedent(
    """
    import sys
    from shared.app.projection import Projection

    real = Projection.handle
    calls = 0

    async def handle(self, entries):
        global calls
        calls += 1
        if calls == 3:
            raise RuntimeError("injected: a bug the projector does not expect")
        return await real(self, entries)

    Projection.handle = handle
    from services.cli import main
    main(["worker"])
    """
)


async def test_an_unexpected_error_in_the_projector_stops_the_worker_loudly(fresh_redis, spawn, tmp_path: Path):
    redis = fresh_redis()
    api = spawn("api", redis.url)
    log_path = tmp_path / "faulty-worker.log"
    env = {
        **os.environ,
        "REDIS_URL": redis.url,
        "PARLEY_API_KEYS": API_KEYS,
        "PYTHONPATH": str(ROOT),
        "PARLEY_LOG_LEVEL": "WARNING",
    }
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-c", FAULTY_WORKER], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as c:
            for _ in range(20):  # each write is a feed entry the projector handles: the third handle raises
                if worker.poll() is not None:
                    break
                await c.post("/sessions", json={}, headers=ACME)
                await asyncio.sleep(0.05)
        code = await asyncio.to_thread(worker.wait, 20)
    finally:
        if worker.poll() is None:
            worker.kill()
    text = log_path.read_text(errors="replace")
    assert code == 70, text[-3000:]
    assert "failed; the process stops" in text and "injected: a bug" in text, text[
        -3000:
    ]  # projector or its maintenance


STREAMS = 500


async def test_500_open_event_streams_hold_no_redis_connections_and_starve_nothing(fresh_redis, spawn):
    redis = fresh_redis()
    # a small pool: if each stream held a connection, ordinary requests would find none
    api = spawn("api", redis.url, env={"PARLEY_REDIS_POOL_SIZE": "32", "PARLEY_SSE_KEEPALIVE_S": "30"})
    spawn("worker", redis.url)
    wait_ready(api.url)
    limits = httpx.Limits(max_connections=STREAMS + 50, max_keepalive_connections=STREAMS + 50)
    async with httpx.AsyncClient(base_url=api.url, timeout=30, limits=limits) as c:
        sids = [(await c.post("/sessions", json={}, headers=ACME)).json()["id"] for _ in range(20)]
        received: dict[int, list[str]] = {i: [] for i in range(STREAMS)}
        shed: list[int] = []
        opened = asyncio.Semaphore(0)

        async def follow(i: int) -> None:
            headers = {**ACME, "Accept": "text/event-stream", "Last-Event-ID": "1"}
            while True:
                async with c.stream("GET", f"/sessions/{sids[i % len(sids)]}/events", headers=headers) as r:
                    if r.status_code == 503 and b'"overloaded"' in await r.aread():
                        shed.append(i)  # 500 opened at once are a burst the guard sheds: retry, as a client does
                        await asyncio.sleep(0.2)
                        continue
                    assert r.status_code == 200
                    opened.release()
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            received[i].append(line)
                            if len(received[i]) == 2:
                                return

        tasks = [asyncio.create_task(follow(i)) for i in range(STREAMS)]
        try:
            for _ in range(STREAMS):
                await asyncio.wait_for(opened.acquire(), 30)
            r = Redis.from_url(redis.url)
            clients = await r.client_list()
            await r.aclose()
            print(
                f"{STREAMS} open streams ({len(shed)} openings shed and retried); redis-server has {len(clients)} client connections in all"
            )
            assert len(clients) < 100, len(clients)  # API pool (≤ 32) + a few readers + the worker's, not 500
            # ordinary requests are served while the streams are open
            started = time.monotonic()
            for sid in sids:
                w = await c.post(f"/sessions/{sid}/messages", json={"role": "user", "content": "live 1"}, headers=ACME)
                assert w.status_code == 201, w.text
                assert (await c.get(f"/sessions/{sid}", headers=ACME)).status_code == 200
            print(f"40 ordinary requests beside {STREAMS} open streams took {time.monotonic() - started:.2f} s")
            for sid in sids:
                await c.post(f"/sessions/{sid}/messages", json={"role": "user", "content": "live 2"}, headers=ACME)
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    assert all(len(v) == 2 and '"live 1"' in v[0] and '"live 2"' in v[1] for v in received.values())


async def test_sigterm_ends_open_streams_cleanly_and_the_api_exits(fresh_redis, spawn):
    """A rolling deploy sends SIGTERM: the API ends its open streams properly (the chunked body is finished, so
    an EventSource reconnects elsewhere with Last-Event-ID) and exits, instead of waiting on them for ever."""
    redis = fresh_redis()
    api = spawn("api", redis.url, env={"PARLEY_SSE_KEEPALIVE_S": "30", "PARLEY_SHUTDOWN_TIMEOUT_S": "60"})
    spawn("worker", redis.url)
    wait_ready(api.url)
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as c:
        sids = [(await c.post("/sessions", json={}, headers=ACME)).json()["id"] for _ in range(5)]
        opened = asyncio.Semaphore(0)

        async def follow(sid: str) -> list[str]:
            seen = []
            async with c.stream("GET", f"/sessions/{sid}/events", headers={**ACME, "Accept": "text/event-stream"}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():  # raises if the body is cut off rather than ended
                    if line.startswith("id: "):
                        seen.append(line)
                        opened.release()
            return seen

        tasks = [asyncio.create_task(follow(sid)) for sid in sids]
        for _ in sids:
            await asyncio.wait_for(opened.acquire(), 20)
        started = time.monotonic()
        api.proc.send_signal(signal.SIGTERM)
        seen = await asyncio.wait_for(asyncio.gather(*tasks), 20)  # far below the 60 s grace: the streams ended
        assert all(s == ["id: 1"] for s in seen), seen
        code = await asyncio.to_thread(api.proc.wait, 20)
        print(f"SIGTERM to exit with {len(sids)} open streams: {time.monotonic() - started:.2f} s")
    assert code in (0, -signal.SIGTERM), code  # uvicorn re-raises SIGTERM once it has shut down gracefully
