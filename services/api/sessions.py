"""Session, message and tool endpoints: parse, call `Sessions`, answer bytes.

Reads answer the read models' pre-encoded JSON without decoding it.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post, route
from litestar.di import Provide
from litestar.params import Parameter

from services.api.auth import provide_tenant
from services.api.body import StrictBody
from services.api.context import api
from services.api.params import (
    AtVersion,
    IdempotencyKey,
    IfMatch,
    Limit,
    Offset,
    errors,
    etag,
    expected_version,
    idempotency,
    json_list,
    json_response,
    parse_message_id,
    parse_session_id,
)
from shared.domain.errors import Invalid
from shared.domain.search import FIELDS, Query, parse_fields, query_of
from shared.domain.wire import (
    ForkRequest,
    Message,
    MessageCreate,
    MessageList,
    MessagePatch,
    Session,
    SessionCount,
    SessionCreate,
    SessionDeletion,
    SessionList,
    SessionPatch,
    StreamToken,
    StreamTokenRequest,
    ToolList,
)

__all__ = ["SessionController"]

_FIELD = "|".join(FIELDS)
AgentId = Annotated[str | None, Parameter(max_length=256, description="Only sessions of this agent.")]
UserId = Annotated[str | None, Parameter(max_length=256, description="Only sessions of this user.")]
Status = Annotated[
    Literal["idle", "busy"] | None,
    Parameter(description="`busy`: a chat of the session is queued or running (as projected); `idle`: none is."),
]
CreatedAfter = Annotated[
    datetime | None, Parameter(description="Only sessions created at or after this RFC 3339 time.")
]
CreatedBefore = Annotated[
    datetime | None, Parameter(description="Only sessions created at or before this RFC 3339 time.")
]
UpdatedAfter = Annotated[
    datetime | None, Parameter(description="Only sessions last changed at or after this RFC 3339 time.")
]
UpdatedBefore = Annotated[
    datetime | None, Parameter(description="Only sessions last changed at or before this RFC 3339 time.")
]
Sort = Annotated[
    Literal["created_at", "-created_at", "updated_at", "-updated_at"],
    Parameter(description="The order: by creation or last change; `-` newest first."),
]
Fields = Annotated[
    str | None,
    Parameter(
        pattern=rf"^({_FIELD})(,({_FIELD}))*$",
        max_length=400,
        description="Only these fields of each session, comma-separated (`id` always).",
    ),
]
After = Annotated[
    str | None,
    Parameter(
        pattern=r"^[A-Za-z0-9_-]{1,200}$", description="The `next` cursor of the previous page (of the same query)."
    ),
]
DeprecatedOffset = Annotated[
    int,
    Parameter(
        ge=0,
        le=1_000_000_000,
        description="Deprecated: sessions to skip, only without filters, `sort` or `after`. Use `after`.",
    ),
]
_FILTERS = frozenset(
    ("agent_id", "user_id", "status", "created_after", "created_before", "updated_after", "updated_before")
)
_LIST = _FILTERS | {"sort", "fields", "after", "limit", "offset"}
_METADATA = "metadata."
LIST_DOC = (
    "The tenant's live sessions matching every filter given, in `sort` order, a page at a time: pass `next` as "
    "`after` (null: the last page). Also `metadata.<key>=<value>` (up to 8): sessions whose metadata has that scalar "
    'value at `<key>`, compared as text (`metadata.tier=3` finds 3 and "3"). A page may hold fewer than `limit` '
    "sessions, even none, while `next` is not null (each request walks a bounded part of the index): follow `next`. "
    "Any other parameter is refused (422)."
)
COUNT_DOC = (
    "How many of the tenant's live sessions match every filter given (as the list's, `metadata.<key>=<value>` too). "
    "`exact: false`: a combination of filters walked past its bound and `count` is a lower bound."
)
_TIMES = frozenset(("created_after", "created_before", "updated_after", "updated_before"))
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})?")


def _query(
    request: Request,
    allowed: frozenset[str],
    agent_id: str | None,
    user_id: str | None,
    status: Literal["idle", "busy"] | None,
    created_after: datetime | None,
    created_before: datetime | None,
    updated_after: datetime | None,
    updated_before: datetime | None,
) -> Query:
    """The filters, with the `metadata.<key>` ones read from the query string; an unknown parameter is refused (a
    misspelt filter would otherwise widen the answer silently)."""
    metadata = {}
    for name in request.query_params.keys():
        if name.startswith(_METADATA):
            metadata[name[len(_METADATA) :]] = request.query_params[name]
        elif name not in allowed:
            raise Invalid(f"unknown query parameter {name!r}", {"query": name})
        elif name in _TIMES and not _RFC3339.fullmatch(request.query_params[name]):
            # litestar would also take a number as a Unix time: the document says RFC 3339, so only that
            raise Invalid(f"{name} must be an RFC 3339 time", {"query": name})
    # the text as sent: litestar reads `null` as absent, which would drop a filter (`agent_id=null` is an agent)
    raw = request.query_params
    if "status" in raw and raw["status"] not in ("idle", "busy"):
        raise Invalid("status must be idle or busy", {"query": "status"})
    return query_of(
        agent_id=raw.get("agent_id"),
        user_id=raw.get("user_id"),
        metadata=metadata,
        status=status if "status" in raw else None,
        created_after=created_after,
        created_before=created_before,
        updated_after=updated_after,
        updated_before=updated_before,
    )


Purge = Annotated[
    bool, Parameter(description="Also erase the log and everything derived from it, leaving a tombstone in /audit.")
]


class SessionController(Controller):
    path = "/sessions"
    tags = ["sessions"]
    # One dependency only: litestar resolves several in an anyio task group, which costs more than the rest of a read.
    dependencies = {"tenant": Provide(provide_tenant)}
    security = [{"bearer": []}, {"apiKey": []}]

    @get("/", responses=errors(), description=LIST_DOC)
    async def list_sessions(
        self,
        request: Request,
        tenant: str,
        agent_id: AgentId = None,
        user_id: UserId = None,
        status: Status = None,
        created_after: CreatedAfter = None,
        created_before: CreatedBefore = None,
        updated_after: UpdatedAfter = None,
        updated_before: UpdatedBefore = None,
        sort: Sort = "-created_at",
        fields: Fields = None,
        after: After = None,
        limit: Limit = 100,
        offset: DeprecatedOffset = 0,
    ) -> Response[SessionList]:
        """The tenant's live sessions matching every filter given, in `sort` order (newest first by default), a
        page at a time: pass `next` as `after` for the next page (null: the last). Filter on metadata with
        `metadata.<key>=<value>` (scalar values, compared as text: `metadata.tier=3` finds 3 and "3"; up to 8).
        A page may hold fewer than `limit` sessions (even none) while `next` is not null: each request walks a
        bounded part of the index, so follow `next` until it is null."""
        query = _query(
            request, _LIST, agent_id, user_id, status, created_after, created_before, updated_after, updated_before
        )
        query = msgspec.structs.replace(query, sort=sort)
        sessions = api(request).parley.sessions
        if offset:  # the old paging: only the default listing, from the old index; `next` to go on by cursor
            if request.query_params.keys() - {"offset", "limit"}:
                raise Invalid("offset pages only the default listing; follow next instead", {"query": "offset"})
            items = await sessions.list(tenant, limit, offset)
            nxt = sessions.cursor_after(query, items[-1]) if len(items) == limit else None
            return json_list(items, next=msgspec.json.encode(nxt))
        items, nxt = await sessions.find(tenant, query, after, limit, parse_fields(fields))
        return json_list(items, next=msgspec.json.encode(nxt))

    @get("/count", responses=errors(), description=COUNT_DOC)
    async def count_sessions(
        self,
        request: Request,
        tenant: str,
        agent_id: AgentId = None,
        user_id: UserId = None,
        status: Status = None,
        created_after: CreatedAfter = None,
        created_before: CreatedBefore = None,
        updated_after: UpdatedAfter = None,
        updated_before: UpdatedBefore = None,
    ) -> Response[SessionCount]:
        """How many of the tenant's live sessions match every filter given (the same filters as the list, with
        `metadata.<key>=<value>` too). One filter, with or without a time range, is counted from its index at once;
        a combination walks the most selective one, and past a bound answers a lower bound with `exact: false`."""
        query = _query(
            request, _FILTERS, agent_id, user_id, status, created_after, created_before, updated_after, updated_before
        )
        n, exact = await api(request).parley.sessions.count(tenant, query)
        return json_response(SessionCount(count=n, exact=exact))

    @post("/", status_code=201, responses=errors(), dto=StrictBody[SessionCreate], return_dto=None)
    async def create_session(
        self, request: Request, tenant: str, data: SessionCreate, idempotency_key: IdempotencyKey = None
    ) -> Response[Session]:
        """Create a session. Answers the whole session with `Location` and `ETag`."""
        sessions = api(request).parley.sessions
        session, version = await sessions.create(tenant, data, await idempotency(request, idempotency_key))
        return json_response(session, 201, {"ETag": etag(version), "Location": f"/sessions/{session.id}"})

    @get("/{session_id:str}", responses=errors(404))
    async def get_session(
        self, request: Request, tenant: str, session_id: str, version: AtVersion = None
    ) -> Response[Session]:
        """The session; with `version`, as it was right after that event (deleted sessions too, until purged)."""
        body, at = await api(request).parley.sessions.get(tenant, parse_session_id(session_id), version)
        return json_response(body, headers={"ETag": etag(at)})

    @route(
        "/{session_id:str}",
        http_method=["PUT", "PATCH"],
        responses=errors(404, 412),
        dto=StrictBody[SessionPatch],
        return_dto=None,
    )
    async def update_session(
        self,
        request: Request,
        tenant: str,
        session_id: str,
        data: SessionPatch,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Session]:
        """Change only the fields present; `null` clears a field. PUT and PATCH do the same."""
        sessions = api(request).parley.sessions
        idem = await idempotency(request, idempotency_key)
        session, version = await sessions.update(
            tenant, parse_session_id(session_id), data, expected_version(if_match), idem
        )
        return json_response(session, headers={"ETag": etag(version)})

    @delete("/{session_id:str}", status_code=202, responses=errors(404, 409, 412))
    async def delete_session(
        self,
        request: Request,
        tenant: str,
        session_id: str,
        if_match: IfMatch = None,
        idempotency_key: IdempotencyKey = None,
        purge: Purge = False,
    ) -> Response[SessionDeletion]:
        """Delete the session: it and its messages and tools leave the read models; the log keeps `SessionDeleted`
        (its events and past versions stay readable). `purge=true` erases the log and all derived data as well,
        a deleted session's too, and records a `SessionPurged` tombstone in `GET /audit`; refused with 409
        `has_forks` (changing nothing) while copy-on-write forks read its history: purge them first."""
        sessions = api(request).parley.sessions
        idem = await idempotency(request, idempotency_key)
        deletion = await sessions.delete(tenant, parse_session_id(session_id), expected_version(if_match), idem, purge)
        return json_response(deletion, 202)

    @post(
        "/{session_id:str}/messages",
        status_code=201,
        responses=errors(404),
        dto=StrictBody[MessageCreate],
        return_dto=None,
    )
    async def add_message(
        self,
        request: Request,
        tenant: str,
        session_id: str,
        data: MessageCreate,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Message]:
        """Append a message; `seq` is its 1-based position in the session."""
        sessions = api(request).parley.sessions
        message = await sessions.add_message(
            tenant, parse_session_id(session_id), data, await idempotency(request, idempotency_key)
        )
        return json_response(message, 201)

    @get("/{session_id:str}/messages", responses=errors(404))
    async def list_messages(
        self,
        request: Request,
        tenant: str,
        session_id: str,
        limit: Limit = 100,
        offset: Offset = 0,
        version: AtVersion = None,
    ) -> Response[MessageList]:
        """The session's messages in conversation order (oldest first); with `version`, those it had right after that event."""
        return json_list(
            await api(request).parley.sessions.messages(tenant, parse_session_id(session_id), limit, offset, version)
        )

    @get("/{session_id:str}/messages/{message_id:str}", responses=errors(404))
    async def get_message(self, request: Request, tenant: str, session_id: str, message_id: str) -> Response[Message]:
        """One message as it is now (edited: its current content and `edited_at`; removed: 404)."""
        message = await api(request).parley.sessions.message(
            tenant, parse_session_id(session_id), parse_message_id(message_id)
        )
        return json_response(message)

    @patch(
        "/{session_id:str}/messages/{message_id:str}",
        responses=errors(404),
        dto=StrictBody[MessagePatch],
        return_dto=None,
    )
    async def edit_message(
        self,
        request: Request,
        tenant: str,
        session_id: str,
        message_id: str,
        data: MessagePatch,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Message]:
        """Edit a message's `content` or `name`, as a `MessageEdited` event: the list shows the new text, the context
        builder uses it, and time travel (`?version=`) still shows what was there before."""
        sessions = api(request).parley.sessions
        idem = await idempotency(request, idempotency_key)
        message = await sessions.edit_message(
            tenant, parse_session_id(session_id), parse_message_id(message_id), data, idem
        )
        return json_response(message)

    @delete("/{session_id:str}/messages/{message_id:str}", status_code=200, responses=errors(404))
    async def remove_message(
        self, request: Request, tenant: str, session_id: str, message_id: str, idempotency_key: IdempotencyKey = None
    ) -> Response[Message]:
        """Take a message out of the conversation, as a `MessageRemoved` event, answering it as it was: the list and
        the context builder omit it; its events stay in the log (time travel shows it) until the session is purged.
        Removing an assistant message that made tool calls closes those calls: no tool answer is expected any more."""
        sessions = api(request).parley.sessions
        idem = await idempotency(request, idempotency_key)
        message = await sessions.remove_message(
            tenant, parse_session_id(session_id), parse_message_id(message_id), idem
        )
        return json_response(message)

    @post(
        "/{session_id:str}/fork",
        status_code=201,
        responses=errors(404, 409),
        dto=StrictBody[ForkRequest],
        return_dto=None,
    )
    async def fork_session(
        self,
        request: Request,
        tenant: str,
        session_id: str,
        data: ForkRequest,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Session]:
        """A new session whose history is this one's up to `version` (default: its latest): its log starts with
        `SessionForked`, then the parent's events, made its own (message ids kept); chats queued or running at that
        version are cancelled in the fork and its schedules left behind. It shows `forked_from`. Copy-on-write: the
        fork reads those events from the parent's log, so the parent cannot be purged while it does (409
        `has_forks`). Answers the fork with `Location` and `ETag`."""
        sessions = api(request).parley.sessions
        idem = await idempotency(request, idempotency_key)
        fork, version = await sessions.fork(tenant, parse_session_id(session_id), data, idem)
        return json_response(fork, 201, {"ETag": etag(version), "Location": f"/sessions/{fork.id}"})

    @get("/{session_id:str}/forks", responses=errors(404))
    async def list_forks(self, request: Request, tenant: str, session_id: str) -> Response[SessionList]:
        """The sessions forked from this one, oldest first (deleted ones left out), in one page (`next` is null)."""
        return json_list(await api(request).parley.sessions.forks(tenant, parse_session_id(session_id)), next=b"null")

    @get("/{session_id:str}/tools", responses=errors(404))
    async def list_tools(
        self, request: Request, tenant: str, session_id: str, version: AtVersion = None
    ) -> Response[ToolList]:
        """The session's tools; with `version`, those it had right after that event."""
        return json_response(await api(request).parley.sessions.tools(tenant, parse_session_id(session_id), version))

    @post(
        "/{session_id:str}/stream-tokens",
        status_code=201,
        responses=errors(404),
        dto=StrictBody[StreamTokenRequest],
        return_dto=None,
    )
    async def stream_token(
        self, request: Request, tenant: str, session_id: str, data: StreamTokenRequest
    ) -> Response[StreamToken]:
        """A short-lived, read-only token for this session's event streams, for a browser's `EventSource` (which
        cannot send `Authorization`): pass it as `?token=` to `/sessions/{id}/events` (SSE) or
        `/sessions/{id}/chats/{job}/stream`. It opens nothing else; it is never logged."""
        token = await api(request).parley.sessions.stream_token(tenant, parse_session_id(session_id), data.ttl_s)
        return json_response(token, 201)
