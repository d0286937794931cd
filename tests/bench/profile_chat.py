"""Where a chat's cost goes: the Redis round trips of one synchronous chat, by process, and the CPU and Redis
commands per chat under P4's load (64 clients over 50 sessions).

python -m tests.bench.profile_chat [--chats N] [--layout all|split]   (starts its own stack, as the harness does)
python -m tests.bench.profile_chat --model-client   (CPU and wall time per streamed model call: httpx, Parley's)
python -m tests.bench.profile_chat --paced [--chats N]   (synchronous chats on a model streaming 200 words 5 ms apart:
    the API's CPU and the Redis reads per chat while it waits for an answer that streams for a second)

`--layout split` runs the worker as two processes (`parley worker --role projector` and `--role chat`).
The round trips come from redis-server's MONITOR (each client connection is told apart by the process owning its
port, from /proc); the CPU from /proc and redis-server's INFO, as P4cpu reads them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import msgspec
from redis import Redis

from shared.adapters.llm import ModelRequest
from shared.adapters.llm.openai_compat import OpenAICompatible
from shared.adapters.redis.scripts import REGISTRY
from shared.adapters.redis.server import free_port
from tests.bench import chat_bench
from tests.bench.harness import KEY, ROOT, Bench, Proc, _wait_port, cpu_s


def ports_of(pids: dict[str, int]) -> dict[int, str]:
    """Local TCP port → the name of the process (of `pids`) holding that socket."""
    inodes: dict[str, str] = {}
    for name, pid in pids.items():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes[target[8:-1]] = name
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes:
                out[int(cols[1].rsplit(":", 1)[1], 16)] = inodes[cols[9]]
    return out


def one_chat(bench: Bench, sid: str, pids: dict[str, int]) -> None:
    """MONITOR one synchronous chat on a warm session; print its commands by process, scripts by name."""
    shas = {script.sha: script.name for script in REGISTRY.scripts.values()}
    client = httpx.Client(base_url=bench.api.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    for _ in range(5):
        client.post(f"/sessions/{sid}/chat", json=body)
    time.sleep(0.5)
    seen: list[dict] = []
    stop = threading.Event()

    def monitor() -> None:
        with Redis.from_url(bench.redis_server.url).monitor() as m:
            for command in m.listen():
                seen.append(command)
                if stop.is_set():
                    break

    threading.Thread(target=monitor, daemon=True).start()
    time.sleep(0.3)
    seen.clear()
    client.post(f"/sessions/{sid}/chat", json=body)
    time.sleep(0.3)
    stop.set()
    owners = ports_of(pids)
    # the idle polls and the projector's maintenance (heartbeat, claims) run whether or not anyone chats
    idle = re.compile(
        r"^(BLPOP|XREADGROUP|XAUTOCLAIM|ZRANGEBYSCORE parley:\{(arq|p\d+)\}:(queue|schedules)|SMEMBERS|ZREVRANGE"
        r"|ZADD parley:\{sys\}:projectors)"
    )
    rounds: collections.Counter[str] = collections.Counter()
    in_transaction: set[str] = set()
    t0 = None
    print("one synchronous chat (MONITOR; the idle polls and maintenance of other parts left out):")
    for c in seen:
        if c["client_type"] == "lua" or idle.match(c["command"]) or "BLOCK 1000" in c["command"]:
            continue
        t0 = t0 if t0 is not None else c["time"]
        who = owners.get(int(c["client_port"] or 0), "?")
        command = c["command"]
        for sha, name in shas.items():
            command = command.replace(sha, name)
        verb = command.split()[0]
        if verb == "MULTI":
            in_transaction.add(who)
        elif verb == "EXEC" or who not in in_transaction:  # a transaction is one round trip
            in_transaction.discard(who)
            rounds[who] += 1
        print(f"  {(c['time'] - t0) * 1000:7.2f} ms  {who:9s} {command[:110]}")
    print("  commands sent, by process (a transaction counts once, a pipeline's commands each):", dict(rounds))


def under_load(bench: Bench, extra: dict[str, Proc], sids: list[str], chats: int) -> None:
    bench.redis.config_resetstat()
    before = bench._cpu_s("model", "client")
    started = {name: cpu_s(p.proc.pid) for name, p in extra.items()}
    rate = asyncio.run(chat_bench.parley_jobs_per_second(bench.api.url, KEY, sids, chats))
    after = bench._cpu_s("model", "client")
    cpu = {k: (after[k] - before[k]) / chats * 1e6 for k in after}
    cpu |= {name: (cpu_s(p.proc.pid) - started[name]) / chats * 1e6 for name, p in extra.items()}
    print(f"\nunder load: {rate['jobs_per_s']:.0f} chats/s, {rate['errors']} errors")
    print("  CPU µs per chat:", {k: round(v) for k, v in cpu.items()}, "total", round(sum(cpu.values())))
    stats = bench.redis.info("commandstats")
    rows = sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:12]
    print("  redis-server, per chat:")
    for name, v in rows:
        print(f"    {name[8:]:18s} calls {v['calls'] / chats:6.2f}  µs {v['usec'] / chats:7.1f}")


async def _httpx_calls(url: str, body: bytes, n: int) -> None:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_keepalive_connections=100)) as client:
        for _ in range(n):
            headers = {"Content-Type": "application/json"}
            async with client.stream("POST", url + "/chat/completions", content=body, headers=headers) as r:
                async for _ in r.aiter_lines():
                    pass


async def _parley_calls(url: str, n: int) -> None:
    provider = OpenAICompatible(url, "", "zero", max_retries=0)
    request = ModelRequest(model="zero", messages=[{"role": "user", "content": "hi"}], max_tokens=20)
    try:
        for _ in range(n):
            async for _ in provider.stream(request):
                pass
    finally:
        await provider.aclose()


def model_client(reps: int = 5, n: int = 300) -> None:
    """A streamed call to the zero-latency model: httpx reading the lines, and Parley's provider (decoding them)."""
    tmp = Path(tempfile.mkdtemp(prefix="parley-profile-"))
    body = msgspec.json.encode(
        {"model": "zero", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": True}
    )
    model = Proc(
        [sys.executable, "-m", "tests.bench.zero_model", "--port", str(port := free_port())],
        {**os.environ, "PYTHONPATH": str(ROOT)},
        tmp / "m.log",
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_port(port)
        runs: dict[str, list[tuple[float, float]]] = {"httpx": [], "parley (aiohttp)": []}
        for _ in range(reps + 1):  # the first round warms up
            for name, calls in (
                ("httpx", lambda: _httpx_calls(url, body, n)),
                ("parley (aiohttp)", lambda: _parley_calls(url, n)),
            ):
                cpu, wall = time.process_time(), time.perf_counter()
                asyncio.run(calls())
                runs[name].append(((time.process_time() - cpu) / n * 1e6, (time.perf_counter() - wall) / n * 1e6))
        for name, r in runs.items():
            r = r[1:]
            print(
                f"{name:18s} CPU µs per call {statistics.median(c for c, _ in r):6.0f}   wall µs {statistics.median(w for _, w in r):6.0f}"
            )
    finally:
        model.stop()


PACED_WORDS, PACED_MS, PACED_CLIENTS = 200, 5, 4


def paced(bench: Bench, sids: list[str], chats: int) -> None:
    """`chats` synchronous chats, `PACED_CLIENTS` at a time, each answered by a model streaming for a second."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": PACED_WORDS}

    async def client(sid: str, n: int, walls: list[float]) -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=bench.api.url, headers=headers, timeout=60) as http:
            for _ in range(n):
                t = time.perf_counter()
                r = await http.post(f"/sessions/{sid}/chat", json=body)
                r.raise_for_status()
                walls.append(time.perf_counter() - t)

    async def run(n: int) -> list[float]:
        walls: list[float] = []
        await asyncio.gather(*(client(sids[i], n // PACED_CLIENTS, walls) for i in range(PACED_CLIENTS)))
        return walls

    asyncio.run(run(PACED_CLIENTS))  # warm
    bench.redis.config_resetstat()
    api = cpu_s(bench.api.proc.pid)
    walls = asyncio.run(run(chats))
    per_chat = (cpu_s(bench.api.proc.pid) - api) / len(walls) * 1e6
    stats = bench.redis.info("commandstats")
    xread = stats.get("cmdstat_xread", {}).get("calls", 0) / len(walls)
    print(
        f"paced: {len(walls)} synchronous chats, {PACED_CLIENTS} at a time, {PACED_WORDS} chunks {PACED_MS} ms apart;"
        f" p50 {statistics.median(walls) * 1000:.0f} ms; API CPU µs per chat {per_chat:.0f};"
        f" XREAD calls per chat (all processes) {xread:.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.profile_chat")
    parser.add_argument("--chats", type=int, default=2000)
    parser.add_argument("--layout", choices=("all", "split"), default="all")
    parser.add_argument("--model-client", action="store_true", help="only time streamed calls to the model")
    parser.add_argument("--paced", action="store_true", help="synchronous chats on a model that streams for a second")
    a = parser.parse_args(argv)
    if a.model_client:
        model_client()
        return 0
    if a.paced:
        os.environ |= {"ZERO_MODEL_WORDS": str(PACED_WORDS), "ZERO_MODEL_PACE_MS": str(PACED_MS)}
    bench = Bench(argparse.Namespace(quick=False, reps=1, seconds=1, connections=32, rows="P4", out="-"))
    bench.start()
    extra: dict[str, Proc] = {}
    try:
        if a.layout == "split":  # the harness's worker becomes the projector; a second process runs the chats
            bench.worker.stop()
            py = sys.executable
            bench.worker = Proc(
                [py, "-m", "services.cli", "worker", "--role", "projector"], bench.env, bench.tmp / "p.log"
            )
            extra["chat"] = Proc([py, "-m", "services.cli", "worker", "--role", "chat"], bench.env, bench.tmp / "c.log")
        sids = bench.sessions(50)
        if a.paced:
            paced(bench, sids, a.chats)
            return 0
        asyncio.run(chat_bench.parley_jobs_per_second(bench.api.url, KEY, sids, 200))  # warm
        pids = {"api": bench.api.proc.pid, "worker": bench.worker.proc.pid}
        pids |= {name: p.proc.pid for name, p in extra.items()}
        one_chat(bench, sids[0], pids)
        under_load(bench, extra, sids, a.chats)
    finally:
        for p in extra.values():
            p.stop()
        bench.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
