"""The ASGI app in front of litestar: shed overload, then hold each tenant to its request rate.

Both run before routing, decoding or any Redis work a refused request would waste, so that a refusal costs a
few microseconds and the requests that are served keep their latency:

- **Work in flight** is bounded per process by an adaptive limit (`Gate`, at most `PARLEY_MAX_INFLIGHT`): it
  grows while requests finish near the fastest this process has been seen to serve them, and shrinks as soon as
  they queue. Beyond it a request is answered 503 `overloaded` with `Retry-After: 1` at once instead of queueing
  behind the others, so the requests that are served keep their latency. A stream or a waiting chat stops
  counting once it waits (`services.api.sse.detach`). `/health`, `/ready` and `/metrics` are never shed.
- **A tenant's rate** is checked in Redis (`shared.adapters.redis.limits`, GCRA, the same for every process) once the key
  names the tenant; a busy tenant's requests are admitted from a lease of its rate this process took
  (`shared.app.admission`), one round trip per lease. A refused request answers 429 `rate_limited` with `Retry-After`; for that long this process
  refuses the tenant without asking Redis again, so a noisy tenant costs the others little. So does the
  admission that spends the last request of a tenant's burst, for as long as the rate will refuse the next one
  (`Gate.spent`): a tenant held at its rate asks Redis about the requests it is admitted, not also about one
  refusal after each. Every answer to a limited tenant carries the IETF `RateLimit-Policy` and `RateLimit` fields.

The tenant found here is handed to litestar in the scope's state (`parley.tenant`), so the key is looked up once.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from typing import Any
from urllib.parse import unquote_to_bytes

from litestar import Litestar
from litestar.types import Message, Receive, Scope, Send

from services.api.auth import key_of
from services.api.context import Api
from services.api.params import wants_event_stream
from shared.app.ports import Admission
from shared.domain.stream_tokens import verify
from shared.observability import metrics
from shared.supervise import TRANSIENT, pool_exhausted

__all__ = ["OVERLOADED_RESPONSE", "Gate", "Guard"]

EXEMPT = frozenset({"/health", "/ready", "/metrics"})


def _error(status: int, code: str, message: str) -> bytes:
    return b'{"error":{"status":%d,"code":"%s","message":"%s"}}' % (status, code.encode(), message.encode())


OVERLOADED = _error(503, "overloaded", "the server is at capacity; retry shortly")
UNAVAILABLE = _error(503, "store_unavailable", "the store is unavailable; retry shortly")
EXPOSED_HEADERS = ["ETag", "Location", "Retry-After", "RateLimit", "RateLimit-Policy", "Last-Event-ID", "X-Request-ID"]
"""Response headers a browser page may read (CORS)."""
EXPOSED = ", ".join(EXPOSED_HEADERS).encode()
BAD_TOKEN = _error(401, "unauthorized", "the stream token is invalid, expired, or not for this stream")
_OVERLOADED = metrics.REJECTED.labels("overloaded", "")
RATE_LIMITED = _error(429, "rate_limited", "this tenant is over its request rate; retry after Retry-After seconds")


def ratelimit_headers(a: Admission) -> list[tuple[bytes, bytes]]:
    """draft-ietf-httpapi-ratelimit-headers: the policy (`q` requests per `w` seconds) and what is left of it."""
    window = max(1, math.ceil(a.burst / a.rps)) if a.rps else 1
    reset = max(0, math.ceil(a.wait_ms / 1000))
    return [
        (b"ratelimit-policy", b'"tenant";q=%d;w=%d' % (a.burst, window)),
        (b"ratelimit", b'"tenant";r=%d;t=%d' % (a.remaining, reset)),
    ]


class Gate:
    """What the HTTP protocol and the guard share: the process's work in flight, its limit, and the tenants it
    refuses now.

    Work in flight counts requests parsed and waiting for the event loop to run them, plus requests being worked
    on. The protocol counts a request in as soon as its headers are parsed, and refuses it right there, before a
    task is even created, when the process is full or the key's tenant is being refused (the cheapest refusal
    there is: one write). The guard moves a request from waiting to working, and out when it ends or detaches
    to wait on a stream.

    The limit adapts (AIMD on latency, as TCP Vegas and Netflix's concurrency-limits do): a fixed limit is either
    too low for light requests or lets heavy ones queue, and on one event loop a request admitted beyond what the
    CPU can serve only waits. Every `window_s` the median time from parse to finish of the requests that ended is
    compared with the floor (the lowest median seen; it drifts up only while the limit is not reached, so it
    follows a workload that got slower but never learns a standing queue as normal): above `tolerance` × floor +
    `slack_s`, requests are queueing and the limit shrinks by a tenth; otherwise, if the limit was reached, it
    grows by one. It stays within [`min_limit`, `max_limit`]."""

    def __init__(
        self,
        limit: int,
        max_wait_s: float = 0.5,
        *,
        min_limit: int = 8,
        window_s: float = 0.1,
        tolerance: float = 2.0,
        slack_s: float = 0.002,
    ) -> None:
        self.max_limit = limit
        self.min_limit = max(1, min(min_limit, limit))
        self.limit = limit
        """Requests admitted at once now: `max_limit` until requests are seen to queue."""
        metrics.INFLIGHT_LIMIT.set(limit)
        self.max_wait_s = max_wait_s
        """A request the event loop reaches only after this long is shed too: it waited longer than any client will."""
        self.window_s = window_s
        self.tolerance = tolerance
        self.slack_s = slack_s
        self.waiting = 0
        self.working = 0
        self.shed = 0
        """Requests refused as overload, since start (for /metrics)."""
        self.floor_s = math.inf
        self._samples: list[float] = []
        self._window_end = 0.0
        self._reached = False
        """The limit was reached during this window: only then may it grow (an idle process keeps what it learnt)."""
        self._refusing: dict[bytes, _Refusal] = {}
        """sha256(key) → until when, and why, this process refuses the key without asking Redis."""
        self._counters: dict[str, Any] = {}
        """tenant → its `rate_limited` counter (a labelled metric costs a lookup under a lock each time)."""
        self._answers: dict[tuple[int, float, int], bytes] = {}
        """(burst, rps, seconds to wait) → the whole 429 answer the protocol writes."""

    def admit(self) -> bool:
        """A request's headers are parsed: count it in, or say it must be shed."""
        if self.waiting + self.working >= self.limit:
            self._reached = True
            self.shed_one()
            return False
        self.waiting += 1
        return True

    def finished(self, took_s: float, now: float) -> None:
        """A request admitted at parse time ended (or detached) `took_s` after: adapt the limit once per window."""
        self._samples.append(took_s)
        if now < self._window_end:
            return
        self._window_end = now + self.window_s
        samples, self._samples = self._samples, []
        reached, self._reached = self._reached or self.waiting + self.working + 1 >= self.limit, False
        if len(samples) < 5:  # too few to say anything; a quiet process keeps its limit
            return
        samples.sort()
        median = samples[len(samples) // 2]
        if median < self.floor_s:
            self.floor_s = median
        elif not reached:  # not full, so not queueing here: the workload itself got slower (or a dependency)
            self.floor_s += (median - self.floor_s) * 0.01
        floor, limit = self.floor_s, self.limit
        if median > floor * self.tolerance + self.slack_s:
            self.limit = max(self.min_limit, int(limit * 0.9))
        elif reached:
            self.limit = min(self.max_limit, limit + 1)
        if self.limit != limit:
            metrics.INFLIGHT_LIMIT.set(self.limit)

    def shed_one(self) -> None:
        self.shed += 1
        _OVERLOADED.inc()

    def refuse(self, key: str, tenant: str, admission: Admission, wait_s: float) -> None:
        now = time.monotonic()
        if len(self._refusing) >= 1024:  # keys refused once and never seen again must not pile up
            self._refusing = {d: r for d, r in self._refusing.items() if r.until > now}
        counter = self._counters.get(tenant)
        if counter is None:
            if len(self._counters) >= 1024:
                self._counters.clear()
            counter = self._counters[tenant] = metrics.REJECTED.labels("rate_limited", tenant)
        self._refusing[_digest(key)] = _Refusal(now + wait_s, admission, tenant, counter)

    def spent(self, key: str, tenant: str, admission: Admission) -> None:
        """`admission` admitted the last request the tenant's burst held: the rate (GCRA) refuses its next one for
        a while that the admission itself tells, so this process refuses the key that long without asking Redis
        (a tenant held at its rate would otherwise cost a refused round trip to Redis per request admitted). Never
        longer than Redis would: other processes' admissions can only make the wait longer."""
        if admission.remaining or not admission.admitted or admission.rps <= 0 or admission.burst <= 0:
            return
        # admitted: wait_ms is ceil(tat - now) with tat already moved on; the next request is refused while
        # tat + step - now > burst × step. `rps` is rounded down to a thousandth, so `step` is never short.
        step_ms = 1000 / admission.rps
        refused_ms = admission.wait_ms - 1 - step_ms * (admission.burst - 1)
        if refused_ms > 0:
            self.refuse(key, tenant, admission, refused_ms / 1000)

    def refusal(self, key: str) -> tuple[Admission, float, str] | None:
        """(the refusing admission, seconds left, the tenant) while this key's tenant is refused; else None."""
        found = self._refused(_digest(key))
        return None if found is None else (found[0].admission, found[1], found[0].tenant)

    def _refused(self, digest: bytes) -> tuple[_Refusal, float] | None:
        hit = self._refusing.get(digest)
        if hit is None:
            return None
        left = hit.until - time.monotonic()
        if left <= 0:
            del self._refusing[digest]
            return None
        return hit, left

    def early_answer(self, headers: list[tuple[bytes, bytes]]) -> bytes | None:
        """For the protocol, at parse time: the whole 429 answer if the request's key is being refused."""
        if not self._refusing:
            return None
        key = key_of(headers)
        found = self._refused(_digest(key)) if key is not None else None
        if found is None:
            return None
        refusal, left = found
        refusal.counter.inc()  # answered by the protocol: the observer never sees it
        # The answer's fields count whole seconds: made once per policy and second, not per refusal.
        a, seconds = refusal.admission, max(1, math.ceil(left))
        answer = self._answers.get((a.burst, a.rps, seconds))
        if answer is None:
            if len(self._answers) >= 1024:
                self._answers.clear()
            answer = _response(429, RATE_LIMITED, _refusal_headers(a, seconds))
            self._answers[a.burst, a.rps, seconds] = answer
        return answer


class _Refusal:
    """A key this process refuses without Redis: until when, the admission that refused it, its tenant, and its
    tenant's refusal counter."""

    __slots__ = ("admission", "counter", "tenant", "until")

    def __init__(self, until: float, admission: Admission, tenant: str, counter: Any) -> None:
        self.until, self.admission, self.tenant, self.counter = until, admission, tenant, counter


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Guard:
    def __init__(self, app: Litestar, gate: Gate, cors_origins: list[str] | None = None) -> None:
        """`cors_origins`: the guard's own answers (429, 503…) carry the CORS fields litestar's answers carry, so a
        browser can read why it was refused."""
        self.app = app
        self.gate = gate
        self.cors = set(cors_origins or ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT:
            await self.app(scope, receive, send)
            return
        gate = self.gate
        own = self._cors(scope, send) if self.cors else send  # the guard's own answers (litestar adds CORS to its)
        state = scope.setdefault("state", {})  # type: ignore[typeddict-item]
        parsed_at = state.pop("parley.parsed_at", None)
        if parsed_at is None and not gate.admit():  # not counted in by the protocol (another server): count it here
            await _answer(own, 503, OVERLOADED, [(b"retry-after", b"1")])
            return
        gate.waiting -= 1
        if parsed_at is not None and time.monotonic() - parsed_at > gate.max_wait_s:
            gate.shed_one()
            await _answer(own, 503, OVERLOADED, [(b"retry-after", b"1")])
            return
        gate.working += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                gate.working -= 1
                if parsed_at is not None:
                    now = time.monotonic()
                    gate.finished(now - parsed_at, now)

        state["parley.detach"] = release
        try:
            headers = await self._admit(scope, state, own)
            if headers is None:
                return
            await self.app(scope, receive, _with_headers(send, headers) if headers else send)
        finally:
            release()

    def _cors(self, scope: Scope, send: Send) -> Send:
        origin = next((v for n, v in scope["headers"] if n == b"origin"), None)
        if origin is None or not ("*" in self.cors or origin.decode("latin-1") in self.cors):
            return send
        extra = [
            (b"access-control-allow-origin", b"*" if "*" in self.cors else origin),
            (b"access-control-expose-headers", EXPOSED),
            (b"vary", b"Origin"),
        ]
        return _with_headers(send, extra)

    async def _admit(self, scope: Scope, state: dict[str, Any], send: Send) -> list[tuple[bytes, bytes]] | None:
        """None: refused (answered); else the headers to add to the answer."""
        if scope["method"] == "OPTIONS":  # a CORS preflight carries no credentials: litestar's CORS answers it
            return []
        api: Api = self.app.state.api
        key = key_of(scope["headers"])
        if key is None:
            token = _query_param(scope, b"token")
            if token is None:
                return []  # litestar answers 401 on routes that need a key
            grant = verify(api.parley.stream_secret, token, time.time())
            if grant is None or not _stream_route(scope, grant.session_id):
                await _answer(send, 401, BAD_TOKEN, [(b"www-authenticate", b"Bearer")])
                return None
            key, tenant = token, grant.tenant
        else:
            tenant = None
        refused = self.gate.refusal(key)
        if refused is not None:
            admission, left, state["parley.tenant"] = refused
            await _answer(send, 429, RATE_LIMITED, _refusal_headers(admission, left))
            return None
        try:
            if tenant is None:
                tenant = await api.auth.tenant(key)
                if tenant is None:
                    return []
            state["parley.tenant"] = tenant
            admission = await api.parley.admissions.admit(tenant)
        except TRANSIENT as e:
            if pool_exhausted(e):
                self.gate.shed_one()
            else:
                metrics.redis_error(e)
            await _answer(send, 503, OVERLOADED if pool_exhausted(e) else UNAVAILABLE, [(b"retry-after", b"1")])
            return None
        if not admission.admitted:
            wait = admission.wait_ms / 1000
            self.gate.refuse(key, tenant, admission, wait)
            await _answer(send, 429, RATE_LIMITED, _refusal_headers(admission, wait))
            return None
        if not admission.remaining:
            self.gate.spent(key, tenant, admission)
        return ratelimit_headers(admission) if admission.burst else []


_STREAM_ROUTE = re.compile(r"^/sessions/([0-9a-f-]{36})/(events|chats/[0-9a-f-]{36}/stream)$")


def _stream_route(scope: Scope, session_id: str) -> bool:
    """A stream token opens its own session's event streams, read-only, and nothing else."""
    match = _STREAM_ROUTE.match(scope["path"])
    if scope["method"] != "GET" or match is None or match.group(1) != session_id:
        return False
    if match.group(2) == "events":  # the page of events is not a stream
        accept = next((v for n, v in scope["headers"] if n == b"accept"), b"")
        return wants_event_stream(accept.decode("latin-1"))
    return True


def _query_param(scope: Scope, name: bytes) -> str | None:
    for pair in scope.get("query_string", b"").split(b"&"):
        k, _, v = pair.partition(b"=")
        if k == name:
            return unquote_to_bytes(v).decode("latin-1")
    return None


def _refusal_headers(admission: Admission, wait_s: float) -> list[tuple[bytes, bytes]]:
    retry = max(1, math.ceil(wait_s))
    return [
        (b"retry-after", b"%d" % retry),
        *ratelimit_headers(Admission(False, admission.burst, 0, int(wait_s * 1000), admission.rps)),
    ]


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


_REASONS = {429: b"Too Many Requests", 503: b"Service Unavailable"}


def _response(status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A whole HTTP/1.1 answer, for the protocol to write in one go."""
    lines = [
        b"HTTP/1.1 %d %s" % (status, _REASONS[status]),
        b"content-type: application/json",
        b"content-length: %d" % len(body),
    ]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


OVERLOADED_RESPONSE = _response(503, OVERLOADED, [(b"retry-after", b"1")])
"""The whole answer the protocol writes when it sheds a request before it becomes a task."""
