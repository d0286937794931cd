"""The log as an API: a session's events (a page, or followed live over SSE) and the tenant's audit stream."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated

import msgspec
from litestar import Controller, MediaType, Request, Response, get
from litestar.di import Provide
from litestar.params import HeaderParameter, Parameter

from shared.adapters.codec import json_encode
from shared.domain.errors import Invalid, NotFound
from shared.domain.events import AuditPage, EventPage
from shared.app.ports import EventLog
from shared.adapters.redis.history import RedisHistory
from services.api.auth import provide_tenant
from services.api.sse import EventStream, follow, open_stream
from services.api.sessions import Limit, _errors, _service, _session_id

After = Annotated[int, Parameter(ge=0, le=2**63 - 1, description="A version: the page starts after it (exclusive).")]
LastEventId = Annotated[
    str | None,
    HeaderParameter(name="Last-Event-ID", required=False, pattern=r"^([0-9]{1,19})?$", description="SSE resume point (a version); wins over `after` (empty: none)."),
]
SSE_BATCH = 500
RETRY_MS = 3_000
"""`retry:` of the event stream: how long an EventSource waits before it reconnects."""
Unnamed = Annotated[bool, Parameter(description="SSE only: send events without `event:` names, so `EventSource.onmessage` sees them.")]
_VERSION = re.compile(r"[0-9]{1,20}")


class _EventHead(msgspec.Struct):
    type: str
    version: int


_event_head = msgspec.json.Decoder(_EventHead)


class EventController(Controller):
    path = "/sessions"
    tags = ["history"]
    dependencies = {"tenant": Provide(provide_tenant)}
    security = [{"bearer": []}, {"apiKey": []}]

    @get("/{session_id:str}/events", responses=_errors(404))
    async def list_events(
        self,
        request: Request,
        tenant: str,
        session_id: str,
        after: After = 0,
        limit: Limit = 100,
        last_event_id: LastEventId = None,
        unnamed: Unnamed = False,
    ) -> Response[EventPage]:
        """The session's log, oldest first, deleted sessions too (until purged).

        With `Accept: text/event-stream` it follows the log live: the events after `after` (or `Last-Event-ID`),
        then each new one as it is appended; `id:` is the version, `event:` the type (`unnamed=true`: no `event:`
        field, for clients that listen to `onmessage` only; the type is in `data`). It ends after `SessionDeleted`
        (resumed after it: 204, so an EventSource stops reconnecting)."""
        service = _service(request)
        sid = _session_id(session_id)
        if "text/event-stream" in request.headers.get("accept", ""):
            if last_event_id:  # an empty Last-Event-ID is none (an EventSource sends none before its first id)
                if not _VERSION.fullmatch(last_event_id.strip()) or int(last_event_id) >= 2**63:
                    raise Invalid("Last-Event-ID must be a version (a non-negative integer)", {"header": "Last-Event-ID"})
                after = int(last_event_id)
            head = (await service.log.events(tenant, sid, after, 1)).head
            if head == 0:  # 404 before the stream starts
                raise NotFound(f"session {session_id} not found")
            if after >= head and await _deleted(service.log, tenant, sid, head):
                # the client saw SessionDeleted: nothing can follow, and 204 tells an EventSource not to reconnect
                return Response(content=b"", status_code=204)
            return await _tail(request, service.log, tenant, sid, after, request.app.state.settings.sse_keepalive_s, unnamed)  # type: ignore[return-value]
        view = await service.log.events(tenant, sid, after, limit)
        if view.head == 0:
            raise NotFound(f"session {session_id} not found")
        items = view.items or []
        last = after + len(items)
        nxt = b"%d" % last if items and last < view.head else b"null"
        return Response(content=b'{"items":[' + b",".join(items) + b'],"next":' + nxt + b"}", media_type=MediaType.JSON)


async def _deleted(log: EventLog, tenant: str, sid: str, head: int) -> bool:
    last = (await log.events(tenant, sid, head - 1, 1)).items or []
    return bool(last) and _event_head.decode(last[0]).type == "SessionDeleted"


async def _tail(request: Request, log: EventLog, tenant: str, sid: str, after: int, keepalive_s: float, unnamed: bool) -> EventStream:
    cursor = after

    async def fetch() -> list[bytes]:
        nonlocal cursor
        view = await log.events(tenant, sid, cursor, SSE_BATCH)
        if view.head == 0:
            raise _Purged()
        return view.items or []

    async def frames() -> AsyncIterator[bytes]:
        nonlocal cursor
        try:
            async for batch in follow(request.app.state.notifier, sid, sid, fetch, keepalive_s):
                if not batch:
                    yield b": keep-alive\n\n"
                for item in batch:
                    head = _event_head.decode(item)
                    cursor = head.version
                    if unnamed:
                        yield b"id: %d\ndata: %s\n\n" % (head.version, item)
                    else:
                        yield b"id: %d\nevent: %s\ndata: %s\n\n" % (head.version, head.type.encode(), item)
                    if head.type == "SessionDeleted":
                        return
        except _Purged:
            return

    return await open_stream(request, frames(), retry_ms=RETRY_MS)


class _Purged(Exception):
    """The session's log is gone: the stream ends."""


AuditAfter = Annotated[str | None, Parameter(max_length=200, description="The `next` cursor of the previous page.")]


@get("/audit", tags=["history"], dependencies={"tenant": Provide(provide_tenant)}, security=[{"bearer": []}, {"apiKey": []}], responses=_errors())
async def audit(request: Request, tenant: str, after: AuditAfter = None, limit: Limit = 100) -> Response[AuditPage]:
    """The tenant's erasure record: one `SessionPurged` tombstone per purged session (no content), oldest first."""
    history: RedisHistory = request.app.state.history
    try:
        items, cursor = await history.audit(tenant, after, limit)
    except (ValueError, UnicodeDecodeError) as e:
        raise Invalid("after is not a cursor this endpoint gave out", {"query": "after"}) from e
    nxt = json_encode(cursor)
    return Response(content=b'{"items":[' + b",".join(items) + b'],"next":' + nxt + b"}", media_type=MediaType.JSON)
