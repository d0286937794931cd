"""The ASGI app in front of litestar: shed overload, then hold each tenant to its request rate.

Both run before routing, decoding or any Redis work a refused request would waste, so that a refusal costs a
few microseconds and the requests that are served keep their latency:

- **Work in flight** is bounded per process (`PARLEY_MAX_INFLIGHT`). Beyond it a request is answered 503
  `overloaded` with `Retry-After: 1` at once instead of queueing behind the others. A stream or a waiting chat
  stops counting once it waits (`services.api.sse.detach`). `/health` and `/ready` are never shed.
- **A tenant's rate** is checked in Redis (`shared.redis.limits`, GCRA, the same for every process) once the key
  names the tenant. A refused request answers 429 `rate_limited` with `Retry-After`; for that long this process
  refuses the tenant without asking Redis again, so a noisy tenant costs the others little. Every answer to a
  limited tenant carries the IETF `RateLimit-Policy` and `RateLimit` fields.

The tenant found here is handed to litestar in the scope's state (`parley.tenant`), so the key is looked up once.
"""

from __future__ import annotations

import math
import time
from typing import Any

from litestar import Litestar
from litestar.types import Message, Receive, Scope, Send

from shared.redis.connect import pool_exhausted
from shared.redis.limits import Admission
from shared.supervise import TRANSIENT
from services.api.auth import presented_key

__all__ = ["Guard"]

EXEMPT = frozenset({"/health", "/ready"})


def _error(status: int, code: str, message: str) -> bytes:
    return b'{"error":{"status":%d,"code":"%s","message":"%s"}}' % (status, code.encode(), message.encode())


OVERLOADED = _error(503, "overloaded", "the server is at capacity; retry shortly")
UNAVAILABLE = _error(503, "store_unavailable", "the store is unavailable; retry shortly")
RATE_LIMITED = _error(429, "rate_limited", "this tenant is over its request rate; retry after Retry-After seconds")


def ratelimit_headers(a: Admission) -> list[tuple[bytes, bytes]]:
    """draft-ietf-httpapi-ratelimit-headers: the policy (`q` requests per `w` seconds) and what is left of it."""
    window = max(1, math.ceil(a.burst / a.rps)) if a.rps else 1
    reset = max(0, math.ceil(a.wait_ms / 1000))
    return [
        (b"ratelimit-policy", b'"tenant";q=%d;w=%d' % (a.burst, window)),
        (b"ratelimit", b'"tenant";r=%d;t=%d' % (a.remaining, reset)),
    ]


class Guard:
    def __init__(self, app: Litestar, max_inflight: int) -> None:
        self.app = app
        self.max_inflight = max_inflight
        self.inflight = 0
        self.shed = 0
        """Requests refused as overload, since start (for /metrics)."""
        self._refusing: dict[str, tuple[float, Admission]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight:
            self.shed += 1
            await _answer(send, 503, OVERLOADED, [(b"retry-after", b"1")])
            return
        self.inflight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.inflight -= 1

        state = scope.setdefault("state", {})  # type: ignore[typeddict-item]
        state["parley.detach"] = release
        try:
            headers = await self._admit(scope, state, send)
            if headers is None:
                return
            if headers:
                send = _with_headers(send, headers)
            await self.app(scope, receive, send)
        finally:
            release()

    async def _admit(self, scope: Scope, state: dict[str, Any], send: Send) -> list[tuple[bytes, bytes]] | None:
        """None: refused (answered); else the headers to add to the answer."""
        key = presented_key(scope)
        if key is None:
            return []  # litestar answers 401 on routes that need a key
        app_state = self.app.state
        try:
            tenant = await app_state.auth.tenant(key)
            if tenant is None:
                return []
            state["parley.tenant"] = tenant
            refusing = self._refusing.get(tenant)
            now = time.monotonic()
            if refusing is not None:
                if now < refusing[0]:
                    await self._refuse(send, refusing[1], refusing[0] - now)
                    return None
                del self._refusing[tenant]
            admission: Admission = await app_state.limits.admit(tenant)
        except TRANSIENT as e:
            await _answer(send, 503, OVERLOADED if pool_exhausted(e) else UNAVAILABLE, [(b"retry-after", b"1")])
            return None
        if not admission.admitted:
            wait = admission.wait_ms / 1000
            self._refusing[tenant] = (now + wait, admission)
            await self._refuse(send, admission, wait)
            return None
        return ratelimit_headers(admission) if admission.burst else []

    async def _refuse(self, send: Send, admission: Admission, wait_s: float) -> None:
        retry = max(1, math.ceil(wait_s))
        headers = [(b"retry-after", b"%d" % retry), *ratelimit_headers(Admission(False, admission.burst, 0, int(wait_s * 1000), admission.rps))]
        await _answer(send, 429, RATE_LIMITED, headers)


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *extra]  # type: ignore[typeddict-unknown-key]
        await send(message)

    return sending


async def _answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
