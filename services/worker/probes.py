"""The worker's own small HTTP port (`PARLEY_METRICS_PORT`): `/health`, `/ready` and `/metrics`.

A worker answers no API traffic, but an orchestrator needs probes and Prometheus needs a scrape target. This
server runs on the worker's event loop, so `/health` answering means the loop is not stuck; `/ready` says the
worker has started and every supervised part runs (none waits out a store outage). HTTP/1.0-style: one request
per connection, headers read with a deadline, bodies ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

from shared.observability import metrics

__all__ = ["ROUTES", "ProbeServer"]

ROUTES = ("/health", "/ready", "/metrics")
READ_DEADLINE_S = 5.0


def _answer(status: int, body: bytes, content_type: bytes = b"application/json") -> bytes:
    reason = {200: b"OK", 404: b"Not Found", 503: b"Service Unavailable"}[status]
    head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
    return head % (status, reason, content_type, len(body)) + body


class ProbeServer:
    def __init__(self, ready: Callable[[], dict[str, bool] | None]) -> None:
        """`ready()`: the parts and whether each runs, or None before the worker has started."""
        self.ready = ready
        self._server: asyncio.Server | None = None

    async def start(self, port: int, host: str = "0.0.0.0") -> None:
        """Bind now (a taken port fails the start, loudly), serve in the background until `close`."""
        self._server = await asyncio.start_server(self._handle, host, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def route(self, path: bytes) -> bytes:
        if path == b"/health":
            return _answer(200, b'{"status":"ok"}')
        if path == b"/ready":
            parts = self.ready()
            up = parts is not None and all(parts.values())
            body = json.dumps({"status": "ready" if up else "not_ready", "parts": parts or {}}).encode()
            return _answer(200 if up else 503, body)
        if path == b"/metrics":
            return _answer(200, metrics.exposition(), metrics.CONTENT_TYPE.encode())
        return _answer(404, b'{"status":"not_found"}')

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            async with asyncio.timeout(READ_DEADLINE_S):
                request = await reader.readuntil(b"\r\n\r\n")
            target = request.split(b"\r\n", 1)[0].split(b" ")[1]
            writer.write(self.route(target.split(b"?", 1)[0]))
            await writer.drain()
        writer.close()
