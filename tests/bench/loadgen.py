"""A small HTTP/1.1 load generator (keep-alive, asyncio + uvloop), run as its own process.

closed loop: N connections send back to back (max throughput; used where wrk is missing).
open loop: requests are due at a fixed rate over a fixed pool of connections, and latency counts from when each
was *due*, so a slow server cannot hide its queueing (no coordinated omission).

python -m tests.bench.loadgen '{"url": ..., "paths": [...], "mode": "open", "rate": 500, "seconds": 5, ...}'
"""

from __future__ import annotations

import asyncio
import json
import re
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
    announce: bool = False
    """Write a line to stderr once the connections are open and requests start (for a run that must begin beside
    this one's load, not beside its start-up)."""


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.code = ""
        """The error code of the last refused answer."""

    async def request(self, raw: bytes) -> int:
        self.writer.write(raw)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length) if length else b""
        if status >= 300:  # which refusal: the error body's stable code
            m = re.search(rb'"code":"([a-z_]+)"', body)
            self.code = m.group(1).decode() if m else ""
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
    ok_latencies: list[float] = []
    """Latencies of the 2xx answers alone (under overload, of the requests that were served)."""
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
            if 200 <= status < 300:
                ok_latencies.append(latencies[-1])
            else:
                errors += 1
                key = f"{status} {conn.code}".strip()
                failures[key] = failures.get(key, 0) + 1

    if spec.mode == "closed":
        await asyncio.gather(*(closed_worker() for _ in range(spec.connections)))
    else:
        # A fixed pool of connections, as a client's pool or a load balancer has: a request due while every
        # connection is busy waits for one, and that wait counts in its latency (it was due).
        idle: asyncio.Queue[_Conn] = asyncio.Queue()
        for _ in range(spec.connections):
            idle.put_nowait(await _connect(spec))
        if spec.announce:
            print("sending", file=sys.stderr, flush=True)
        pending: set[asyncio.Task] = set()

        async def one(due: float, raw: bytes) -> None:
            nonlocal errors
            conn = await idle.get()
            try:
                status = await conn.request(raw)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                errors += 1
                failures[type(e).__name__] = failures.get(type(e).__name__, 0) + 1
                idle.put_nowait(await _connect(spec))
                return
            latencies.append(time.perf_counter() - due)
            idle.put_nowait(conn)
            if 200 <= status < 300:
                ok_latencies.append(latencies[-1])
            else:
                errors += 1
                key = f"{status} {conn.code}".strip()
                failures[key] = failures.get(key, 0) + 1

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
    ok_latencies.sort()

    def pick(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else 0.0

    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "p50_ms": pick(latencies, 0.5),
        "p99_ms": pick(latencies, 0.99),
        "errors": errors,
        "failures": failures,
        "ok_requests": len(ok_latencies),
        "ok_rps": len(ok_latencies) / elapsed,
        "ok_p50_ms": pick(ok_latencies, 0.5),
        "ok_p99_ms": pick(ok_latencies, 0.99),
    }


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
