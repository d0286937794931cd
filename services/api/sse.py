"""The one `text/event-stream` response every stream of the API makes (a session's log, a chat's chunks, the
OpenAI relay), and the slots it holds.

What a stream follows comes from the use cases (`shared.app.follow`: read what is new, else wait for the process's
shared reader to say it grew), so an open stream holds no Redis connection while it waits. `open_stream` takes one
of the tenant's stream slots and one of the process's (`StreamSlots`, 429 beyond), takes itself out of the
in-flight work the overload guard bounds (a stream is long-lived but costs nothing while it waits), and always
closes its generator, so every slot it took is given back even when the client vanishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from litestar import Request
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Receive, Send

from services.api.context import api
from shared.app.ports import Limits
from shared.domain.errors import DomainError
from shared.supervise import TRANSIENT

__all__ = [
    "EventStream",
    "StreamSlot",
    "StreamSlots",
    "TooManyStreams",
    "detach",
    "open_stream",
    "stream_response",
    "take_stream",
    "tenant_of",
    "wait_for_answer",
]

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class TooManyStreams(DomainError):
    """The tenant, or this process, holds as many open streams as it may (→ 429)."""

    code = "rate_limited"
    status = 429


class StreamSlots:
    """Open streams (and waiting synchronous chats): capped per process here, and per tenant in Redis, where each
    one holds a slot that this process renews while it is open (a crashed process's slots expire)."""

    def __init__(self, limit: int, limits: Limits, ttl_s: float = 60.0) -> None:
        self.limit = limit
        self.limits = limits
        self.ttl_s = ttl_s
        self.open = 0
        self._held: dict[str, set[str]] = {}
        self._seq = itertools.count()
        self._me = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.closing = asyncio.Event()
        """Set when the server shuts down: every open stream ends cleanly (its client reconnects elsewhere with
        `Last-Event-ID`) instead of holding the shutdown up for ever."""

    def end_all(self) -> None:
        self.closing.set()

    async def take(self, tenant: str) -> str:
        if self.open >= self.limit:
            raise TooManyStreams(
                f"this server holds {self.limit} open streams; retry shortly",
                {"limit": "process_streams", "max": self.limit},
            )
        member = f"{self._me}:{next(self._seq)}"
        self.open += 1
        try:
            slot = await self.limits.take(tenant, "streams", member, self.ttl_s)
        except BaseException:
            self.open -= 1
            raise
        if not slot.taken:
            self.open -= 1
            raise TooManyStreams(
                f"this tenant holds {slot.limit} open streams; close one first", {"limit": "streams", "max": slot.limit}
            )
        self._held.setdefault(tenant, set()).add(member)
        return member

    async def give(self, tenant: str, member: str) -> None:
        held = self._held.get(tenant)
        if held is None or member not in held:
            return
        held.discard(member)
        if not held:
            del self._held[tenant]
        self.open -= 1
        with contextlib.suppress(*TRANSIENT):  # unreachable now: the slot expires on its own
            await self.limits.give(tenant, "streams", member)

    async def renew(self) -> None:
        """A part of the API process: keeps this process's slots alive while their streams are open."""
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            for tenant, members in list(self._held.items()):
                await self.limits.renew(tenant, "streams", list(members), self.ttl_s)


def tenant_of(request: Request[Any, Any, Any]) -> str:
    """The request's tenant (resolved by the guard or by the `tenant` dependency)."""
    return request.scope["state"]["parley.tenant"]  # type: ignore[typeddict-item]


def detach(request: Request[Any, Any, Any]) -> None:
    """This request now waits rather than works: stop counting it as work in flight (see `services.api.guard`)."""
    release = request.scope.get("state", {}).pop("parley.detach", None)
    if release is not None:
        release()


class _Frames:
    """A stream's frames. Closing them gives the stream's slot back, even if they were never started. `retry`:
    the SSE `retry:` field to send with the first frame (an EventSource's reconnection delay)."""

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        release: Callable[[], Awaitable[None]],
        retry: bytes = b"",
        closing: asyncio.Event | None = None,
    ) -> None:
        self._frames = frames
        self.closing = closing
        self._release: Callable[[], Awaitable[None]] | None = release
        self._first = retry

    def __aiter__(self) -> _Frames:
        return self

    async def __anext__(self) -> bytes:
        frame = await self._frames.__anext__()
        if self._first:
            frame, self._first = self._first + frame, b""
        return frame

    async def aclose(self) -> None:
        release, self._release = self._release, None
        try:
            aclose = getattr(self._frames, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            if release is not None:
                await release()


class _ClosingStreamingResponse(ASGIStreamingResponse):
    """litestar cancels a stream whose client left while it waits to send; this closes the frames then too."""

    __slots__ = ()

    async def send_body(self, send: Send, receive: Receive) -> None:
        closing: asyncio.Event | None = getattr(self.iterator, "closing", None)
        try:
            if closing is None:
                await super().send_body(send, receive)
                return
            body = asyncio.ensure_future(super().send_body(send, receive))
            ending = asyncio.ensure_future(closing.wait())
            try:
                await asyncio.wait((body, ending), return_when=asyncio.FIRST_COMPLETED)
            finally:
                ending.cancel()
            if body.done():
                body.result()
                return
            body.cancel()  # the server shuts down: end the response properly, between two frames
            with contextlib.suppress(asyncio.CancelledError):
                await body
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.iterator.aclose()  # type: ignore[union-attr]


class EventStream(Stream):
    """A `text/event-stream` answer holding one of the tenant's and the process's stream slots until it ends."""

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        response = super().to_asgi_response(*args, **kwargs)
        response.__class__ = _ClosingStreamingResponse
        return response


class StreamSlot:
    """One open stream's slot, given back exactly once."""

    def __init__(self, slots: StreamSlots, tenant: str, member: str) -> None:
        self._slots: StreamSlots | None = slots
        self.closing = slots.closing
        self.tenant = tenant
        self.member = member

    async def give(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            await slots.give(self.tenant, self.member)


async def take_stream(request: Request[Any, Any, Any]) -> StreamSlot:
    """Take a stream slot for this request (429 if none is free); the request then waits rather than works."""
    slots = api(request).streams
    tenant = tenant_of(request)
    slot = StreamSlot(slots, tenant, await slots.take(tenant))
    detach(request)
    return slot


def stream_response(slot: StreamSlot, frames: AsyncIterator[bytes], retry_ms: int | None = None) -> EventStream:
    """The `text/event-stream` answer of `frames`; it gives `slot` back when it ends. `retry_ms`: send the SSE
    `retry:` field (not on the OpenAI-compatible streams, whose framing is OpenAI's)."""
    retry = b"retry: %d\n" % retry_ms if retry_ms else b""
    return EventStream(
        _Frames(frames, slot.give, retry, slot.closing), media_type="text/event-stream", headers=SSE_HEADERS
    )


async def open_stream(
    request: Request[Any, Any, Any], frames: AsyncIterator[bytes], retry_ms: int | None = None
) -> EventStream:
    """`take_stream`, then `stream_response`."""
    return stream_response(await take_stream(request), frames, retry_ms)


async def wait_for_answer(request: Request[Any, Any, Any], sid: str, job_id: str) -> bytes:
    """The job's answer, waiting at most `PARLEY_CHAT_WAIT_S` under a stream slot (a waiting chat is an open
    stream: it costs no Redis connection, but it counts against the tenant's streams)."""
    parley = api(request).parley
    slot = await take_stream(request)
    try:
        return await parley.chats.wait(sid, job_id, parley.settings.chat_wait_s)
    finally:
        await slot.give()
