"""Session, message and tool endpoints: parse, call `Sessions`, answer bytes.

Reads answer the read models' pre-encoded JSON without decoding it.
"""

from __future__ import annotations

from typing import Annotated

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
from shared.domain.wire import (
    ForkRequest,
    Message,
    MessageCreate,
    MessageList,
    MessagePatch,
    Session,
    SessionCreate,
    SessionDeletion,
    SessionList,
    SessionPatch,
    StreamToken,
    StreamTokenRequest,
    ToolList,
)

__all__ = ["SessionController"]

Purge = Annotated[
    bool, Parameter(description="Also erase the log and everything derived from it, leaving a tombstone in /audit.")
]


class SessionController(Controller):
    path = "/sessions"
    tags = ["sessions"]
    # One dependency only: litestar resolves several in an anyio task group, which costs more than the rest of a read.
    dependencies = {"tenant": Provide(provide_tenant)}
    security = [{"bearer": []}, {"apiKey": []}]

    @get("/", responses=errors())
    async def list_sessions(
        self, request: Request, tenant: str, limit: Limit = 100, offset: Offset = 0
    ) -> Response[SessionList]:
        """The tenant's sessions, newest first."""
        return json_list(await api(request).parley.sessions.list(tenant, limit, offset))

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

    @delete("/{session_id:str}", status_code=202, responses=errors(404, 412))
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
        a deleted session's too, and records a `SessionPurged` tombstone in `GET /audit`."""
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
        "/{session_id:str}/fork", status_code=201, responses=errors(404), dto=StrictBody[ForkRequest], return_dto=None
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
        version are cancelled in the fork and its schedules left behind. It shows `forked_from`; it stands alone
        (purging the parent leaves it whole). Answers the fork with `Location` and `ETag`."""
        sessions = api(request).parley.sessions
        idem = await idempotency(request, idempotency_key)
        fork, version = await sessions.fork(tenant, parse_session_id(session_id), data, idem)
        return json_response(fork, 201, {"ETag": etag(version), "Location": f"/sessions/{fork.id}"})

    @get("/{session_id:str}/forks", responses=errors(404))
    async def list_forks(self, request: Request, tenant: str, session_id: str) -> Response[SessionList]:
        """The sessions forked from this one, oldest first (deleted ones left out)."""
        return json_list(await api(request).parley.sessions.forks(tenant, parse_session_id(session_id)))

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
