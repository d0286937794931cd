"""CPU per request of the write path, in process: Parley's POST message against the P1 ceiling's handler.

python -m tests.bench.profile_write [--profile]   (starts its own redis-server)

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


async def call(app, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
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
        "query_string": b"",
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


async def main(profile: bool, n: int) -> None:
    server = RedisServer(tempfile.mkdtemp(prefix="parley-profile-"), appendfsync="everysec").start()
    try:
        app = create_app(
            Settings.from_env({"PARLEY_API_KEYS": "t:k", "REDIS_URL": server.url}), redis=connect(server.url)
        )
        await start(app)
        sid = json.loads((await call(app, "POST", "/sessions", b"{}"))[1])["id"]
        for name, target, path in (
            ("ceiling", build(server.url), f"/c/{sid}/messages"),
            ("parley", app, f"/sessions/{sid}/messages"),
        ):
            for _ in range(200):
                await call(target, "POST", path, BODY)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                status, _ = await call(target, "POST", path, BODY)
                assert status == 201
            print(
                f"{name}: {(time.perf_counter() - wall) / n * 1e6:.0f} µs wall, {(time.process_time() - cpu) / n * 1e6:.0f} µs CPU per request"
            )
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                await call(app, "POST", f"/sessions/{sid}/messages", BODY)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("-n", type=int, default=3000)
    args = parser.parse_args()
    import uvloop

    uvloop.run(main(args.profile, args.n))
