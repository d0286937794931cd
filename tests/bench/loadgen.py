"""A small HTTP/1.1 load generator (keep-alive, asyncio + uvloop), run as its own process.

closed loop: N connections send back to back (max throughput; used where wrk is missing).
open loop: requests are due at a fixed rate, and latency counts from when each was *due*, so a slow
server cannot hide its queueing (no coordinated omission).

python -m tests.bench.loadgen '{"url": ..., "paths": [...], "mode": "open", "rate": 500, "seconds": 5, ...}'
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from urllib.parse import urlsplit

import msgspec


class Spec(msgspec.Struct, kw_only=True):
    url: str
    paths: list[str]
    seconds: float
    key: str
    method: str = "GET"
    body: str | None = None
    mode: str = "closed"
    connections: int = 32
    rate: float = 0.0


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, raw: bytes) -> int:
        self.writer.write(raw)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length:
            await self.reader.readexactly(length)
        return status


def _requests(spec: Spec) -> list[bytes]:
    host = urlsplit(spec.url).netloc
    body = (spec.body or "").encode()
    head = f"Host: {host}\r\nAuthorization: Bearer {spec.key}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return [f"{spec.method} {p} HTTP/1.1\r\n{head}".encode() + body for p in spec.paths]


async def _connect(spec: Spec) -> _Conn:
    u = urlsplit(spec.url)
    return _Conn(*await asyncio.open_connection(u.hostname, u.port))


async def run(spec: Spec) -> dict:
    reqs = _requests(spec)
    latencies: list[float] = []
    errors = 0
    failures: dict[str, int] = {}
    """What each error was: an HTTP status, or the exception a connection raised."""
    start = time.perf_counter()
    end = start + spec.seconds
    counter = 0

    async def closed_worker() -> None:
        nonlocal errors, counter
        conn = await _connect(spec)
        while time.perf_counter() < end:
            raw = reqs[counter % len(reqs)]
            counter += 1
            t = time.perf_counter()
            try:
                status = await conn.request(raw)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                errors += 1
                failures[type(e).__name__] = failures.get(type(e).__name__, 0) + 1
                conn = await _connect(spec)
                continue
            latencies.append(time.perf_counter() - t)
            if not 200 <= status < 300:
                errors += 1
                failures[str(status)] = failures.get(str(status), 0) + 1

    if spec.mode == "closed":
        await asyncio.gather(*(closed_worker() for _ in range(spec.connections)))
    else:
        idle: list[_Conn] = [await _connect(spec) for _ in range(min(spec.connections, 64))]
        pending: set[asyncio.Task] = set()

        async def one(due: float, raw: bytes) -> None:
            nonlocal errors
            conn = idle.pop() if idle else await _connect(spec)
            try:
                status = await conn.request(raw)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                errors += 1
                failures[type(e).__name__] = failures.get(type(e).__name__, 0) + 1
                return
            latencies.append(time.perf_counter() - due)
            idle.append(conn)
            if not 200 <= status < 300:
                errors += 1
                failures[str(status)] = failures.get(str(status), 0) + 1

        interval = 1.0 / spec.rate
        i = 0
        while (due := start + i * interval) < end:
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(due, reqs[i % len(reqs)]))
            pending.add(task)
            task.add_done_callback(pending.discard)
            i += 1
        await asyncio.gather(*pending)
    elapsed = time.perf_counter() - start
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0  # noqa: E731
    return {"requests": len(latencies), "seconds": elapsed, "rps": len(latencies) / elapsed, "p50_ms": pick(0.5), "p99_ms": pick(0.99), "errors": errors, "failures": failures}


def main() -> None:
    spec = msgspec.json.decode(sys.argv[1], type=Spec)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(run(spec))))


if __name__ == "__main__":
    main()
