"""Chat endpoints: record the request as events, queue the job, relay the worker's answer.

The API never calls the model. A synchronous chat waits (bounded) on the job's chunk stream;
a streamed chat relays that stream as server-sent events; `Prefer: respond-async` answers 202.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated

import msgspec
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter

from shared.adapters.codec import json_encode
from shared.domain.commands import CancelChat, RequestChat
from shared.domain.errors import DomainError, Invalid, NotFound
from shared.domain.events import ChatCancelled, ChatRequested, Event
from shared.domain.ids import parse_uuid, uuid7
from shared.domain.wire import ChatJob, ChatJobList, ChatRequest, ChatResponse, ErrorBody
from shared.domain.state import SessionState
from shared.adapters.redis.chats import ChatStore, streamed_text
from shared.adapters.redis.limits import RedisLimits
from shared.app.service import Reply
from services.api.auth import provide_tenant
from services.api.body import StrictBody
from services.api.sse import EventStream, follow, open_stream, take_stream
from services.api.sessions import IdempotencyKey, Limit, Offset, _idempotency, _service, _session_id

RETRY_MS = 3_000
"""`retry:` of the chat streams: how long an EventSource waits before it reconnects."""
KEEPALIVE_S = 15.0
"""A quiet chat stream sends a comment this often."""
_EVENT_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}(\.1)?")
ERROR_STATUS = {"token_budget_exceeded": 422, "cancelled": 409, "session_deleted": 409}


class ChatFailed(DomainError):
    """The chat job ended without an answer; `code` is the job's error code."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class ChatTimeout(DomainError):
    code = "chat_timeout"


class JobAccepted(msgspec.Struct, kw_only=True):
    id: str
    session_id: str
    status: str
    created_at: datetime


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    return {c: ResponseSpec(data_container=ErrorBody, description="Error") for c in (401, 404, 422, *codes)}


def _job_id(raw: str) -> str:
    job = parse_uuid(raw)
    if job is None:
        raise NotFound(f"chat {raw} not found")
    return job


class ChatController(Controller):
    path = "/sessions/{session_id:str}"
    tags = ["chat"]
    dependencies = {"tenant": Provide(provide_tenant)}
    security = [{"bearer": []}, {"apiKey": []}]

    @post(
        "/chat",
        status_code=200,
        dto=StrictBody[ChatRequest],
        return_dto=None,
        responses={**_errors(409, 502, 504), 202: ResponseSpec(data_container=JobAccepted, description="Queued (Prefer: respond-async)")},
    )
    async def chat(
        self,
        request: Request,
        tenant: str,
        session_id: str,
        data: ChatRequest,
        prefer: Annotated[str | None, HeaderParameter(name="Prefer", required=False, description="respond-async: answer 202 with the job at once")] = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[ChatResponse]:
        """Chat: the request's messages join the session, a worker answers, the answer joins too.

        `stream: true` answers `text/event-stream` (OpenAI-style chunks, then a usage event, then `[DONE]`).
        """
        service = _service(request)
        sid = _session_id(session_id)
        job_id = uuid7()
        cancelled: list[str] = []

        def respond(state: SessionState, events: list[Event]) -> Reply:
            cancelled[:] = [e.data.job_id for e in events if isinstance(e, ChatCancelled)]  # this decision's, not a retried one's
            req = next(e for e in events if isinstance(e, ChatRequested))
            body = JobAccepted(id=req.data.job_id, session_id=sid, status="queued", created_at=req.occurred_at)
            return Reply(status=202, body=msgspec.Raw(json_encode(body)), headers={"Location": f"/sessions/{sid}/chats/{req.data.job_id}"})

        command = RequestChat(job_id=job_id, request=data, default_model=request.app.state.settings.model)
        idem = await _idempotency(request, idempotency_key)
        async with admitted_chat(request, tenant, job_id) as keep:
            reply = await service.execute(tenant, sid, command, respond, idem)
            accepted = msgspec.json.decode(bytes(reply.body))
            keep(accepted["id"] == job_id)
        if accepted["id"] != job_id:  # an Idempotency-Key replay: the first request did the rest
            cancelled.clear()
        job_id = accepted["id"]
        chats: ChatStore = request.app.state.chats
        for other in cancelled:
            await chats.emit(sid, other, "error", json_encode({"code": "cancelled", "message": f"interrupted by chat {job_id}"}))
        state = service.cache.get(tenant, sid)
        if state is not None and state.active_chats and state.active_chats[0].job_id == job_id:
            await request.app.state.queue.enqueue(tenant, sid, [job_id])
        if prefer and "respond-async" in prefer.lower():
            return Response(content=bytes(reply.body), status_code=202, headers=reply.headers, media_type=MediaType.JSON)
        if data.stream:
            return await _sse(request, sid, job_id, "0-0")  # type: ignore[return-value]
        return Response(content=await wait_answer(request, sid, job_id, request.app.state.settings.chat_wait_s), media_type=MediaType.JSON)

    @get("/chats", responses=_errors())
    async def list_chats(self, request: Request, tenant: str, session_id: str, limit: Limit = 100, offset: Offset = 0) -> Response[ChatJobList]:
        """The session's chat jobs, newest first."""
        service, sid = _service(request), _session_id(session_id)
        chats: ChatStore = request.app.state.chats
        view = await service.read(sid, lambda: chats.jobs(tenant, sid, limit, offset))
        return Response(content=b'{"items":[' + b",".join(view.items or []) + b"]}", media_type=MediaType.JSON)

    @get("/chats/{job_id:str}", responses=_errors())
    async def get_chat(self, request: Request, tenant: str, session_id: str, job_id: str) -> Response[ChatJob]:
        """A chat job: its status, attempts, what went into its context, and its answer or error."""
        service, sid, job = _service(request), _session_id(session_id), _job_id(job_id)
        chats: ChatStore = request.app.state.chats
        view = await service.read(sid, lambda: chats.job(tenant, sid, job))
        return Response(content=view.body, media_type=MediaType.JSON)

    @post("/chats/{job_id:str}/cancel", status_code=200, responses=_errors(409))
    async def cancel_chat(self, request: Request, tenant: str, session_id: str, job_id: str) -> Response[ChatJob]:
        """Cancel a queued or running chat (409 `chat_not_active` once it ended). What it had streamed so far is
        stored as its answer (unless the request had `save: false`): the conversation ends where the model was
        stopped, as a client that stopped reading the stream saw it."""
        service, sid, job = _service(request), _session_id(session_id), _job_id(job_id)
        chats: ChatStore = request.app.state.chats
        await service.read(sid, lambda: chats.job(tenant, sid, job))  # an unknown job is a 404, an ended one a 409
        partial = None
        state = await service.log.load(tenant, sid)
        active = state.active(job) if state is not None else None
        if active is not None:
            [requested] = await service.log.read(sid, after=active.requested_at - 1, limit=1)
            if isinstance(requested, ChatRequested) and requested.data.params.save:
                partial = streamed_text(await chats.streamed(sid, job)) or None
        await service.execute(tenant, sid, CancelChat(job_id=job, partial=partial), lambda s, e: Reply(status=200, body=msgspec.Raw(b"{}")))
        await chats.emit(sid, job, "error", json_encode({"code": "cancelled", "message": "cancelled by the client"}))
        view = await service.read(sid, lambda: chats.job(tenant, sid, job))
        return Response(content=view.body, media_type=MediaType.JSON)

    @get("/chats/{job_id:str}/stream", responses=_errors())
    async def resume_stream(
        self,
        request: Request,
        tenant: str,
        session_id: str,
        job_id: str,
        last_event_id: Annotated[
            str | None,
            HeaderParameter(name="Last-Event-ID", required=False, pattern=r"^([0-9]{1,20}-[0-9]{1,20}(\.1)?)?$", description="Resume after this event's `id:`."),
        ] = None,
    ) -> EventStream | Response[None]:
        """The job's event stream from the start, or after `Last-Event-ID`: nothing missed, nothing repeated. 204
        once nothing can follow (the client saw the end), so an EventSource stops reconnecting."""
        service, sid, job = _service(request), _session_id(session_id), _job_id(job_id)
        chats: ChatStore = request.app.state.chats
        await service.read(sid, lambda: chats.job(tenant, sid, job))  # 404 for unknown jobs and other tenants
        after = last_event_id or "0-0"  # an empty Last-Event-ID is none (an EventSource sends none before an id)
        if not _valid_event_id(after):
            raise Invalid("Last-Event-ID is not an event id of this stream", {"header": "Last-Event-ID"})
        if after.endswith(".1") or await _past_the_end(chats, sid, job, after):
            return Response(content=None, status_code=204)
        return await _sse(request, sid, job, after)


async def _past_the_end(chats: ChatStore, sid: str, job_id: str, after: str) -> bool:
    """The job ended and `after` lies beyond its last event: nothing can follow."""
    last = await chats.last_entry(sid, job_id)
    return last is not None and last[1] in ("done", "error") and _id_key(after) > _id_key(last[0])


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.removesuffix(".1").split("-")
    return int(ms), int(seq)


def _valid_event_id(text: str) -> bool:
    """A stream entry id (`ms-seq`, each below 2**64), optionally with our `.1` suffix for [DONE]."""
    if not _EVENT_ID.fullmatch(text):
        return False
    ms, seq = text.removesuffix(".1").split("-")
    return int(ms) < 2**64 and int(seq) < 2**64


CHAT_SLOT_TTL_S = 900.0
"""A concurrent-chat slot is given back when the chat ends (by the projector); one whose holder vanished expires."""


class RateLimited(DomainError):
    code = "rate_limited"
    status = 429
    retry_after = 1


class QuotaExceeded(DomainError):
    code = "quota_exceeded"
    status = 429

    def __init__(self, message: str, details: object, retry_after: int) -> None:
        super().__init__(message, details)
        self.retry_after = retry_after


@contextlib.asynccontextmanager
async def admitted_chat(request: Request, tenant: str, job_id: str) -> AsyncIterator[Callable[[bool], None]]:
    """Admit a chat under the tenant's limits: its chat tokens today (429 `quota_exceeded`) and its concurrent
    chats (429 `rate_limited`), taking a slot for `job_id`. The body calls `keep(False)` when no new chat was
    recorded (an Idempotency-Key replay); the slot is then given back, as it is when the body raises."""
    limits: RedisLimits = request.app.state.limits
    own = await limits.limits(tenant)
    if own.chat_tokens_per_day:
        used = await limits.tokens_today(tenant)
        if used >= own.chat_tokens_per_day:
            now = datetime.now(UTC)
            midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
            raise QuotaExceeded(
                f"this tenant used its {own.chat_tokens_per_day} chat tokens of today (UTC)",
                {"limit": "chat_tokens_per_day", "max": own.chat_tokens_per_day, "used": used},
                max(1, int((midnight - now).total_seconds())),
            )
    slot = await limits.take(tenant, "chats", job_id, CHAT_SLOT_TTL_S)
    if not slot.taken:
        raise RateLimited(f"this tenant has {slot.limit} chats queued or running; retry when one ends", {"limit": "concurrent_chats", "max": slot.limit})
    kept = [True]
    try:
        yield lambda keep: kept.__setitem__(0, keep)
    except BaseException:
        kept[0] = False
        raise
    finally:
        if not kept[0]:
            await limits.give(tenant, "chats", job_id)


def follow_chunks(
    request: Request, sid: str, job_id: str, after: str = "0-0", keepalive_s: float = KEEPALIVE_S, deadline: float | None = None
) -> AsyncIterator[list[tuple[str, str, bytes]]]:
    """The job's chunk stream after `after`, batch by batch as the worker writes it (`services.api.sse.follow`)."""
    chats: ChatStore = request.app.state.chats
    cursor = after

    async def fetch() -> list[tuple[str, str, bytes]]:
        nonlocal cursor
        entries = await chats.chunks(sid, job_id, cursor)
        if entries:
            cursor = entries[-1][0]
        return entries

    return follow(request.app.state.notifier, job_id, sid, fetch, keepalive_s, deadline)


def chat_failed(data: bytes) -> ChatFailed:
    err = msgspec.json.decode(data)
    return ChatFailed(err["code"], err["message"], ERROR_STATUS.get(err["code"], 502))


async def wait_answer(request: Request, sid: str, job_id: str, wait_s: float) -> bytes:
    """The job's answer (its `done` entry), waiting at most `wait_s`; holds no Redis connection while it waits."""
    slot = await take_stream(request)
    deadline = time.monotonic() + wait_s
    try:
        async with contextlib.aclosing(follow_chunks(request, sid, job_id, keepalive_s=wait_s, deadline=deadline)) as batches:
            async for batch in batches:
                for _, kind, data in batch:
                    if kind == "done":
                        return data
                    if kind == "error":
                        raise chat_failed(data)
    finally:
        await slot.give()
    raise ChatTimeout(f"chat {job_id} did not finish within {wait_s:g} s; it goes on: GET /sessions/{sid}/chats/{job_id}", {"job_id": job_id})


async def _sse(request: Request, sid: str, job_id: str, after: str) -> EventStream:
    chats: ChatStore = request.app.state.chats

    async def frames() -> AsyncIterator[bytes]:
        cursor = after
        if cursor != "0-0" and await chats.is_terminal(sid, job_id, cursor):
            yield b"id: %s.1\ndata: [DONE]\n\n" % cursor.encode()  # the client saw the last event, not [DONE]
            return
        async for batch in follow_chunks(request, sid, job_id, cursor):
            if not batch:
                yield b": keep-alive\n\n"
            for eid, kind, data in batch:
                if kind == "chunk":
                    yield b"id: %s\ndata: %s\n\n" % (eid.encode(), data)
                elif kind == "done":
                    usage = msgspec.json.decode(data).get("usage")
                    yield b"id: %s\ndata: %s\n\n" % (eid.encode(), json_encode({"id": job_id, "choices": [], "usage": usage}))
                    yield b"id: %s.1\ndata: [DONE]\n\n" % eid.encode()
                    return
                else:  # named so that it is not EventSource's own `error` event (a connection failure)
                    yield b"id: %s\nevent: chat.failed\ndata: %s\n\n" % (eid.encode(), json_encode({"error": msgspec.json.decode(data)}))
                    yield b"id: %s.1\ndata: [DONE]\n\n" % eid.encode()
                    return

    return await open_stream(request, frames(), retry_ms=RETRY_MS)
