"""CPU per request of what operators added to every request: the observer layer (request id, one histogram
observation, the access line) around an ASGI app that answers at once. In-process and in CPU time, so other
load on the machine barely moves it (a whole-stack wrk run on a shared 2-core machine varies by ±30 %).

    python -m tests.bench.observe_bench            # medians of 7 runs of 20,000 requests each
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys
import tempfile
import time
from typing import Any

from services.api.observe import Observed
from shared.observability import logs

SCOPE: dict[str, Any] = {
    "type": "http",
    "method": "POST",
    "path": "/sessions/0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b/messages",
    "path_template": "/sessions/{session_id}/messages",
    "headers": [(b"authorization", b"Bearer k"), (b"content-type", b"application/json")],
    "state": {"parley.tenant": "acme"},
}


async def app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Any) -> None:
    pass


async def per_request_us(handler: Any, n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        await handler(dict(SCOPE), receive, send)
    return (time.process_time() - start) / n * 1e6


async def main(n: int = 20_000, runs: int = 7) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".log") as sink:
        variants = {
            "bare app": (app, "WARNING"),
            "observed, access line off": (Observed(app), "WARNING"),
            "observed + JSON access line": (Observed(app), "INFO"),
        }
        results: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(runs):
            for name, (handler, level) in variants.items():
                logs.configure(level, "json")
                logging.getLogger().handlers[0].stream = sink  # type: ignore[attr-defined]
                results[name].append(await per_request_us(handler, n))
    base = statistics.median(results["bare app"])
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:32s} {median:7.1f} µs/request  (+{median - base:.1f})", file=sys.stderr if False else sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
