"""The outermost ASGI layer: a request id, the request's metrics, and its one access-log line.

It sits outside the guard, so refusals (429, 503) are counted and logged like any answer. Requests the HTTP
protocol refuses before they become a task (`services.api.server`) never reach it; the gate counts those.

The request id is the client's `X-Request-ID` when it looks like an id (1 to 128 of `A-Za-z0-9._:=+/-`), else a
new one; it is echoed in the answer and bound to every log line of the request.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Iterable
from typing import Any, cast

from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send

from shared.observability import logs, metrics, tracing

__all__ = ["UNROUTED", "Observed", "new_request_id", "request_id"]

UNROUTED = "unrouted"
"""The route label of a request no route took (an unknown path, or one refused before routing)."""

_SANE_ID = re.compile(rb"[A-Za-z0-9._:=+/-]{1,128}")
_PREFIX = os.urandom(8).hex().encode()
_counter = itertools.count(1)


def new_request_id() -> bytes:
    """32 hex digits: this process's random half, then a counter (unique without a syscall per request)."""
    return b"%s%016x" % (_PREFIX, next(_counter))


def request_id(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The client's X-Request-ID if it is a sane id, else a new one."""
    for name, value in headers:
        if name == b"x-request-id":
            return value if _SANE_ID.fullmatch(value) else new_request_id()
    return new_request_id()


class Observed:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        http = cast("HTTPScope", scope)
        start = time.perf_counter()
        rid = request_id(http["headers"])
        status = 500  # the app raised before answering: uvicorn answers 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid)]
            await send(message)

        bound = logs.bind_request(rid.decode())
        try:
            if tracing.enabled():
                with tracing.server_span(http["headers"], http["method"]) as span:
                    try:
                        await self.app(scope, receive, sending)
                    finally:
                        _name(span, http, status, rid)
                        self._done(http, status, time.perf_counter() - start)
                return
            try:
                await self.app(scope, receive, sending)
            finally:
                self._done(http, status, time.perf_counter() - start)
        finally:
            logs.unbind(bound)

    @staticmethod
    def _done(scope: HTTPScope, status: int, seconds: float) -> None:
        route = scope.get("path_template") or UNROUTED
        method = scope["method"]
        metrics.observe_request(method, route, status, seconds)
        tenant = scope.get("state", {}).get("parley.tenant")
        if status == 429:
            metrics.REJECTED.labels("rate_limited", tenant or "").inc()
        if logs.ACCESS.isEnabledFor(logging.INFO):
            # made directly: `info()` would walk the stack to find its caller, a third of the line's cost
            fields = {
                "method": method,
                "route": route,
                "path": scope["path"],
                "status": status,
                "duration_ms": round(seconds * 1000, 3),
                "tenant": tenant,
            }
            logs.ACCESS.handle(
                logs.ACCESS.makeRecord(
                    logs.ACCESS.name, logging.INFO, __file__, 0, "request", (), None, extra={"fields": fields}
                )
            )


def _name(span: Any, scope: HTTPScope, status: int, rid: bytes) -> None:
    """Name the request's span by its route template and say how it ended (no URL: its query may hold a token)."""
    route = scope.get("path_template") or UNROUTED
    span.update_name(f"{scope['method']} {route}")
    span.set_attribute("http.request.method", scope["method"])
    span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    span.set_attribute("parley.request_id", rid.decode())
    tenant = scope.get("state", {}).get("parley.tenant")
    if tenant:
        span.set_attribute("parley.tenant", tenant)
