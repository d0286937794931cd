"""Session, message and tool endpoints: parse, call the service layer, answer bytes.

Writes answer from the events they appended; reads answer the read models'
pre-encoded JSON without decoding it.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Annotated

import msgspec
from litestar import Controller, MediaType, Request, Response, delete, get, post, route
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter, Parameter

from shared.adapters.codec import json_encode
from shared.domain.commands import AddMessage, CreateSession, DeleteSession, UpdateSession
from shared.domain.errors import Invalid, NotFound, VersionConflict
from shared.domain.events import Event, MessageAdded
from shared.domain.ids import parse_uuid
from shared.domain.wire import (
    ErrorBody,
    Message,
    MessageCreate,
    MessageList,
    Session,
    SessionCreate,
    SessionDeletion,
    SessionList,
    SessionPatch,
    StreamToken,
    StreamTokenRequest,
    ToolList,
)
from shared.domain.state import SessionState
from shared.domain.stream_tokens import StreamGrant, sign
from shared.app import history
from shared.app.service import Idempotency, Reply, SessionService
from services.api.auth import provide_tenant
from services.api.body import StrictBody

Limit = Annotated[int, Parameter(ge=1, le=1000, description="Items per page (1..1000).")]
Offset = Annotated[int, Parameter(ge=0, le=1_000_000_000, description="Items to skip (0..10⁹).")]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key", required=False, min_length=1, max_length=255, pattern=r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$",
        description="1 to 255 printable ASCII characters. Retrying with the same key and body within 24 h answers the first "
        "result and writes nothing.",
    ),
]
AtVersion = Annotated[
    int | None,
    Parameter(ge=1, le=2**63 - 1, required=False, description="Time travel: the state right after this event version (folded from the log)."),
]
Purge = Annotated[bool, Parameter(description="Also erase the log and everything derived from it, leaving a tombstone in /audit.")]
IfMatch = Annotated[
    str | None,
    HeaderParameter(
        name="If-Match", required=False, max_length=64,
        description='The ETag you hold (`"7"`, or `*`); a stale or malformed one answers 412 and changes nothing.',
    ),
]
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,253}[\x21-\x7e])?")
_ETAG = re.compile(r'(?:W/)?"([0-9]{1,19})"|([0-9]{1,19})')
"""An entity tag of ours: a version in quotes (weak or not), or bare, ASCII digits only."""


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    return {c: ResponseSpec(data_container=ErrorBody, description="Error") for c in (401, 422, 503, *codes)}


def _service(request: Request) -> SessionService:
    return request.app.state.service


def _send(reply: Reply) -> Response[bytes]:
    return Response(content=bytes(reply.body), status_code=reply.status, headers=reply.headers, media_type=MediaType.JSON)


def _session_id(raw: str) -> str:
    sid = parse_uuid(raw)
    if sid is None:
        raise NotFound(f"session {raw} not found")
    return sid


def _etag(version: int) -> str:
    return f'"{version}"'


def _expected_version(if_match: str | None) -> int | None:
    if if_match is None or if_match.strip() == "*":
        return None
    m = _ETAG.fullmatch(if_match.strip())
    if m is None:
        raise VersionConflict("If-Match is not an ETag of this session (a version in quotes)", {"header": "If-Match"})
    return int(m.group(1) or m.group(2))


def _session_reply(status: int, state: SessionState, location: bool = False) -> Reply:
    assert state.session is not None
    headers = {"ETag": _etag(state.version)}
    if location:
        headers["Location"] = f"/sessions/{state.id}"
    return Reply(status=status, body=msgspec.Raw(json_encode(state.session)), headers=headers)


async def _idempotency(request: Request, key: str | None) -> Idempotency | None:
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise Invalid("Idempotency-Key must be 1 to 255 printable ASCII characters", {"header": "Idempotency-Key"})
    return Idempotency.of(key, request.method, request.url.path, await request.body())


class SessionController(Controller):
    path = "/sessions"
    tags = ["sessions"]
    # One dependency only: litestar resolves several in an anyio task group, which costs more than the rest of a read.
    dependencies = {"tenant": Provide(provide_tenant)}
    security = [{"bearer": []}, {"apiKey": []}]

    @get("/", responses=_errors())
    async def list_sessions(self, request: Request, tenant: str, limit: Limit = 100, offset: Offset = 0) -> Response[SessionList]:
        """The tenant's sessions, newest first."""
        service = _service(request)
        items = await service.read_sessions(tenant, limit, offset)
        return Response(content=b'{"items":[' + b",".join(items) + b"]}", media_type=MediaType.JSON)

    @post("/", status_code=201, responses=_errors(), dto=StrictBody[SessionCreate], return_dto=None)
    async def create_session(
        self, request: Request, tenant: str, data: SessionCreate, idempotency_key: IdempotencyKey = None
    ) -> Response[Session]:
        """Create a session. Answers the whole session with `Location` and `ETag`."""
        service = _service(request)
        idem = await _idempotency(request, idempotency_key)
        sid = service.new_session_id(tenant, idem)
        reply = await service.execute(tenant, sid, CreateSession(body=data), lambda s, _: _session_reply(201, s, location=True), idem)
        return _send(reply)

    @get("/{session_id:str}", responses=_errors(404))
    async def get_session(self, request: Request, tenant: str, session_id: str, version: AtVersion = None) -> Response[Session]:
        """The session; with `version`, as it was right after that event (deleted sessions too, until purged)."""
        service = _service(request)
        sid = _session_id(session_id)
        if version is not None:
            state = await service.at_version(tenant, sid, version)
            return Response(content=json_encode(state.session), media_type=MediaType.JSON, headers={"ETag": _etag(version)})
        view = await service.read(sid, lambda: service.views.session(tenant, sid))
        return Response(content=view.body, media_type=MediaType.JSON, headers={"ETag": _etag(view.version)})

    @route("/{session_id:str}", http_method=["PUT", "PATCH"], responses=_errors(404, 412), dto=StrictBody[SessionPatch], return_dto=None)
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
        service = _service(request)
        sid = _session_id(session_id)
        command = UpdateSession(patch=data, expected_version=_expected_version(if_match))
        idem = await _idempotency(request, idempotency_key)
        return _send(await service.execute(tenant, sid, command, lambda s, _: _session_reply(200, s), idem))

    @delete("/{session_id:str}", status_code=202, responses=_errors(404, 412))
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
        service = _service(request)
        sid = _session_id(session_id)
        if purge:
            deleted_at = await history.purge(
                service, request.app.state.history, tenant, sid, _expected_version(if_match), lambda s: _end_chats(request, sid, s)
            )
            return Response(content=json_encode(SessionDeletion(id=sid, deleted_at=deleted_at, purged=True)), status_code=202, media_type=MediaType.JSON)

        def respond(_: SessionState, events: list[Event]) -> Reply:
            body = SessionDeletion(id=sid, deleted_at=events[0].occurred_at)
            return Reply(status=202, body=msgspec.Raw(json_encode(body)))

        command = DeleteSession(expected_version=_expected_version(if_match))
        before = await service.log.load(tenant, sid)
        reply = await service.execute(tenant, sid, command, respond, await _idempotency(request, idempotency_key))
        await _end_chats(request, sid, before)
        return _send(reply)

    @post("/{session_id:str}/messages", status_code=201, responses=_errors(404), dto=StrictBody[MessageCreate], return_dto=None)
    async def add_message(
        self, request: Request, tenant: str, session_id: str, data: MessageCreate, idempotency_key: IdempotencyKey = None
    ) -> Response[Message]:
        """Append a message; `seq` is its 1-based position in the session."""
        service = _service(request)
        sid = _session_id(session_id)

        def respond(_: SessionState, events: list[Event]) -> Reply:
            event = events[0]
            assert isinstance(event, MessageAdded)
            return Reply(status=201, body=msgspec.Raw(json_encode(event.data)))

        idem = await _idempotency(request, idempotency_key)
        return _send(await service.execute(tenant, sid, AddMessage(body=data), respond, idem))

    @get("/{session_id:str}/messages", responses=_errors(404))
    async def list_messages(
        self, request: Request, tenant: str, session_id: str, limit: Limit = 100, offset: Offset = 0, version: AtVersion = None
    ) -> Response[MessageList]:
        """The session's messages in conversation order (oldest first); with `version`, those it had right after that event."""
        service = _service(request)
        sid = _session_id(session_id)
        if version is not None:
            count = (await service.at_version(tenant, sid, version)).message_count
            view = await service.read_past(sid, lambda: service.views.messages(tenant, sid, limit, offset, count, version), version)
        else:
            view = await service.read(sid, lambda: service.views.messages(tenant, sid, limit, offset))
        return Response(content=b'{"items":[' + b",".join(view.items or []) + b"]}", media_type=MediaType.JSON)

    @get("/{session_id:str}/tools", responses=_errors(404))
    async def list_tools(self, request: Request, tenant: str, session_id: str, version: AtVersion = None) -> Response[ToolList]:
        """The session's tools; with `version`, those it had right after that event."""
        service = _service(request)
        sid = _session_id(session_id)
        if version is not None:
            state = await service.at_version(tenant, sid, version)
            assert state.session is not None
            return Response(content=json_encode(ToolList(state.session.tools)), media_type=MediaType.JSON)
        view = await service.read(sid, lambda: service.views.tools(tenant, sid))
        return Response(content=view.body, media_type=MediaType.JSON)


    @post("/{session_id:str}/stream-tokens", status_code=201, responses=_errors(404), dto=StrictBody[StreamTokenRequest], return_dto=None)
    async def stream_token(self, request: Request, tenant: str, session_id: str, data: StreamTokenRequest) -> Response[StreamToken]:
        """A short-lived, read-only token for this session's event streams, for a browser's `EventSource` (which
        cannot send `Authorization`): pass it as `?token=` to `/sessions/{id}/events` (SSE) or
        `/sessions/{id}/chats/{job}/stream`. It opens nothing else; it is never logged."""
        service, sid = _service(request), _session_id(session_id)
        await service.read(sid, lambda: service.views.session(tenant, sid))  # 404 for unknown sessions and other tenants
        ttl = data.ttl_s or request.app.state.settings.stream_token_ttl_s
        expires = int(time.time()) + ttl
        token = sign(request.app.state.stream_secret, StreamGrant(tenant, sid, expires))
        body = StreamToken(token=token, session_id=sid, expires_at=datetime.fromtimestamp(expires, UTC))
        return Response(content=json_encode(body), status_code=201, media_type=MediaType.JSON)


async def _end_chats(request: Request, sid: str, before: SessionState | None) -> None:
    """Whoever waits on the deleted session's chats learns they ended."""
    for chat in before.active_chats if before else ():
        await request.app.state.chats.emit(sid, chat.job_id, "error", json_encode({"code": "session_deleted", "message": "the session was deleted"}))
