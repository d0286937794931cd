"""CPU per request of the write path, in process: Parley's POST message against the P1 ceiling's handler; with
`--read`, of the read path: `GET /sessions/{id}` and `GET …/messages?limit=50` against the P2 ceiling's one GET.

python -m tests.bench.profile_write [--read] [--profile]   (starts its own redis-server)

Calls each ASGI app directly, so neither HTTP parsing nor a load generator blurs the comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import tempfile
import time

from services.api.app import create_app
from shared.adapters.redis.connect import connect
from shared.adapters.redis.server import RedisServer
from shared.config import Settings
from tests.bench.ceiling import build

BODY = b'{"role":"user","content":"hello there, this is a message"}'


async def call(app, method: str, path: str, body: bytes = b"", query: bytes = b"") -> tuple[int, bytes]:
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [
        (b"content-type", b"application/json"),
        (b"authorization", b"Bearer k"),
        (b"content-length", str(len(body)).encode()),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "state": {},
    }
    await app(scope, receive, send)
    return sent[0]["status"], sent[1]["body"]


async def start(app) -> None:
    inbox: asyncio.Queue = asyncio.Queue()
    outbox: asyncio.Queue = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    asyncio.get_running_loop().create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    assert (await outbox.get())["type"] == "lifespan.startup.complete"


async def main(profile: bool, n: int, read: bool) -> None:
    server = RedisServer(tempfile.mkdtemp(prefix="parley-profile-"), appendfsync="everysec").start()
    try:
        app = create_app(
            Settings.from_env({"PARLEY_API_KEYS": "t:k", "REDIS_URL": server.url}), redis=connect(server.url)
        )
        await start(app)
        sid = json.loads((await call(app, "POST", "/sessions", b"{}"))[1])["id"]
        ceiling = build(server.url)
        if read:
            for _ in range(60):
                await call(app, "POST", f"/sessions/{sid}/messages", BODY)
            runs = [
                ("ceiling GET", ceiling, "GET", f"/c/{sid}", b"", 200),
                ("parley GET /sessions/{id}", app, "GET", f"/sessions/{sid}", b"", 200),
                ("parley GET …/messages?limit=50", app, "GET", f"/sessions/{sid}/messages", b"limit=50", 200),
            ]
        else:
            runs = [
                ("ceiling", ceiling, "POST", f"/c/{sid}/messages", b"", 201),
                ("parley", app, "POST", f"/sessions/{sid}/messages", b"", 201),
            ]
        for name, target, method, path, query, expected in runs:
            body = BODY if method == "POST" else b""
            for _ in range(200):
                await call(target, method, path, body, query)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                status, _ = await call(target, method, path, body, query)
                assert status == expected, status
            print(
                f"{name}: {(time.perf_counter() - wall) / n * 1e6:.0f} µs wall, {(time.process_time() - cpu) / n * 1e6:.0f} µs CPU per request"
            )
        if profile:
            _, target, method, path, query, _ = runs[-1]
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                await call(target, method, path, BODY if method == "POST" else b"", query)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--read", action="store_true", help="the read path (P2) instead of the write path (P1)")
    parser.add_argument("-n", type=int, default=3000)
    args = parser.parse_args()
    import uvloop

    uvloop.run(main(args.profile, args.n, args.read))
