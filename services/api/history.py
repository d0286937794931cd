"""The log as an API: a session's events (a page, or followed live over SSE) and the tenant's audit stream."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter, Parameter

from services.api.auth import provide_tenant
from services.api.context import api
from services.api.params import Limit, errors, json_list, parse_session_id, wants_event_stream
from services.api.sse import EventStream, open_stream
from shared.app.sessions import Sessions
from shared.domain.errors import Invalid
from shared.domain.events import AuditPage, EventPage

__all__ = ["EventController", "audit"]

After = Annotated[int, Parameter(ge=0, le=2**63 - 1, description="A version: the page starts after it (exclusive).")]
LastEventId = Annotated[
    str | None,
    HeaderParameter(
        name="Last-Event-ID",
        required=False,
        pattern=r"^([0-9]{1,19})?$",
        description="SSE resume point (a version); wins over `after` (empty: none).",
    ),
]
RETRY_MS = 3_000
"""`retry:` of the event stream: how long an EventSource waits before it reconnects."""
Unnamed = Annotated[
    bool, Parameter(description="SSE only: send events without `event:` names, so `EventSource.onmessage` sees them.")
]
AuditAfter = Annotated[str | None, Parameter(max_length=200, description="The `next` cursor of the previous page.")]
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

    @get(
        "/{session_id:str}/events",
        responses={**errors(404, 429), 204: ResponseSpec(data_container=None, description="SSE: nothing can follow")},
    )
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
        parley = api(request).parley
        sid = parse_session_id(session_id)
        if wants_event_stream(request.headers.get("accept")):
            if last_event_id:  # an empty Last-Event-ID is none (an EventSource sends none before its first id)
                if not _VERSION.fullmatch(last_event_id.strip()) or int(last_event_id) >= 2**63:
                    raise Invalid(
                        "Last-Event-ID must be a version (a non-negative integer)", {"header": "Last-Event-ID"}
                    )
                after = int(last_event_id)
            if await parley.sessions.seen_to_the_end(tenant, sid, after):  # (404 before the stream starts)
                # the client saw SessionDeleted: nothing can follow, and 204 tells an EventSource not to reconnect
                return Response(content=b"", status_code=204)
            return await _tail(request, parley.sessions, tenant, sid, after, parley.settings.sse_keepalive_s, unnamed)  # type: ignore[return-value]
        page = await parley.sessions.events(tenant, sid, after, limit)
        return json_list(page.items, next=b"null" if page.next is None else b"%d" % page.next)


async def _tail(
    request: Request[Any, Any, Any],
    sessions: Sessions,
    tenant: str,
    sid: str,
    after: int,
    keepalive_s: float,
    unnamed: bool,
) -> EventStream:
    async def frames() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(sessions.follow_events(tenant, sid, after, keepalive_s)) as batches:
            async for batch in batches:
                if not batch:
                    yield b": keep-alive\n\n"
                for item in batch:
                    head = _event_head.decode(item)
                    if unnamed:
                        yield b"id: %d\ndata: %s\n\n" % (head.version, item)
                    else:
                        yield b"id: %d\nevent: %s\ndata: %s\n\n" % (head.version, head.type.encode(), item)
                    if head.type == "SessionDeleted":
                        return

    return await open_stream(request, frames(), retry_ms=RETRY_MS)


@get(
    "/audit",
    tags=["history"],
    dependencies={"tenant": Provide(provide_tenant)},
    security=[{"bearer": []}, {"apiKey": []}],
    responses=errors(),
)
async def audit(request: Request, tenant: str, after: AuditAfter = None, limit: Limit = 100) -> Response[AuditPage]:
    """The tenant's erasure record: one `SessionPurged` tombstone per purged session (no content), oldest first."""
    items, cursor = await api(request).parley.history.audit(tenant, after, limit)
    return json_list(items, next=msgspec.json.encode(cursor))
