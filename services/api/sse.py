"""Following something that grows — a session's log, a chat job's chunks — for every stream and wait of the API.

One loop serves them all (`follow`): read what is new with an ordinary command; if nothing is, wait for the
process's shared reader to say the thing grew (`shared.redis.notify`), re-checking every few seconds regardless.
So an open stream or a waiting synchronous chat holds no Redis connection while it waits.

`EventStream` is the one `text/event-stream` response: it counts against the process's cap of open streams
(`PARLEY_MAX_STREAMS`, 429 beyond), takes itself out of the in-flight work the overload guard bounds (a stream
is long-lived but costs nothing while it waits), and always closes its generator, so every slot it took is
given back even when the client vanishes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

from litestar import Request
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Receive, Send

from shared.domain.errors import DomainError
from shared.redis.notify import Notifier

__all__ = ["EventStream", "StreamSlots", "TooManyStreams", "detach", "follow"]

T = TypeVar("T")
RECHECK_S = 2.0
"""Even without a wake-up, look again this often (a wake-up lost while Redis restarted only delays a stream)."""
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class TooManyStreams(DomainError):
    """The process (or the tenant) holds as many open streams as it may (→ 429)."""

    code = "too_many_streams"
    status = 429


async def follow(
    notifier: Notifier,
    name: str,
    session_id: str,
    fetch: Callable[[], Awaitable[list[T]]],
    keepalive_s: float,
    deadline: float | None = None,
) -> AsyncIterator[list[T]]:
    """Yield each non-empty batch `fetch()` answers as it appears; an empty batch after `keepalive_s` of quiet
    (time for a keep-alive comment). Ends at `deadline` (monotonic), or when the caller stops iterating.

    `fetch` moves its own cursor; `name` is what `notifier` wakes for (the session id for its log, the job id
    for its chunks)."""
    async with notifier.watching(name, session_id) as watch:
        quiet_since = time.monotonic()
        while True:
            watch.clear()  # before the read: a wake-up that arrives while reading is kept
            batch = await fetch()
            now = time.monotonic()
            if batch:
                quiet_since = now
                yield batch
                continue
            if deadline is not None and now >= deadline:
                return
            if now - quiet_since >= keepalive_s:
                quiet_since = now
                yield []
                continue
            wait = min(RECHECK_S, keepalive_s - (now - quiet_since))
            if deadline is not None:
                wait = min(wait, deadline - now)
            await watch.wait(wait)


class StreamSlots:
    """The process's open streams, capped."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def take(self) -> None:
        if self.open >= self.limit:
            raise TooManyStreams(f"this server holds {self.limit} open streams; retry shortly", {"limit": self.limit})
        self.open += 1

    def give(self) -> None:
        self.open -= 1

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.take()
        try:
            yield
        finally:
            self.give()


def detach(request: Request[Any, Any, Any]) -> None:
    """This request now waits rather than works: stop counting it as work in flight (see `services.api.guard`)."""
    release = request.scope.get("state", {}).pop("parley.detach", None)
    if release is not None:
        release()


class _Frames:
    """A stream's frames. Closing them gives the stream's slot back, even if they were never started."""

    def __init__(self, frames: AsyncIterator[bytes], release: Callable[[], None]) -> None:
        self._frames = frames
        self._release: Callable[[], None] | None = release

    def __aiter__(self) -> _Frames:
        return self

    async def __anext__(self) -> bytes:
        return await self._frames.__anext__()

    async def aclose(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()
        aclose = getattr(self._frames, "aclose", None)
        if aclose is not None:
            await aclose()


class _ClosingStreamingResponse(ASGIStreamingResponse):
    """litestar cancels a stream whose client left while it waits to send; this closes the frames then too."""

    __slots__ = ()

    async def send_body(self, send: Send, receive: Receive) -> None:
        try:
            await super().send_body(send, receive)
        finally:
            await self.iterator.aclose()  # type: ignore[union-attr]


class EventStream(Stream):
    """A `text/event-stream` answer holding one of the process's stream slots until it ends."""

    def __init__(self, request: Request[Any, Any, Any], frames: AsyncIterator[bytes], status_code: int = 200) -> None:
        slots: StreamSlots = request.app.state.streams
        slots.take()
        detach(request)
        super().__init__(_Frames(frames, slots.give), media_type="text/event-stream", headers=SSE_HEADERS, status_code=status_code)

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        response = super().to_asgi_response(*args, **kwargs)
        response.__class__ = _ClosingStreamingResponse
        return response
