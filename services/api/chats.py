"""Chat endpoints: request a chat, then answer it three ways — wait for it, stream it as server-sent events, or
`Prefer: respond-async` (202 with the job at once). The API never calls the model: a worker runs the job and
writes its chunk stream, which these endpoints relay (`Chats.follow_chunks`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter

from services.api.auth import provide_tenant
from services.api.body import StrictBody
from services.api.context import api
from services.api.params import (
    IdempotencyKey,
    Limit,
    Offset,
    errors,
    idempotency,
    json_list,
    json_response,
    parse_job_id,
    parse_session_id,
)
from services.api.sse import EventStream, open_stream, wait_for_answer
from shared.app.chats import Chats
from shared.domain.errors import Invalid
from shared.domain.wire import ChatJob, ChatJobList, ChatRequest, ChatResponse, JobAccepted

__all__ = ["ChatController", "RETRY_MS"]

RETRY_MS = 3_000
"""`retry:` of the chat streams: how long an EventSource waits before it reconnects."""
KEEPALIVE_S = 15.0
"""A quiet chat stream sends a comment this often."""
_EVENT_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}(\.1)?")
_encode = msgspec.json.encode
Prefer = Annotated[
    str | None,
    HeaderParameter(name="Prefer", required=False, description="respond-async: answer 202 with the job at once"),
]
LastEventId = Annotated[
    str | None,
    HeaderParameter(
        name="Last-Event-ID",
        required=False,
        pattern=r"^([0-9]{1,20}-[0-9]{1,20}(\.1)?)?$",
        description="Resume after this event's `id:`.",
    ),
]


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    return errors(404, *codes)


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
        responses={
            **_errors(409, 429, 502, 504),
            202: ResponseSpec(
                data_container=JobAccepted, description="Queued (Prefer: respond-async), or scheduled (run_at, delay_s)"
            ),
        },
    )
    async def chat(
        self,
        request: Request,
        tenant: str,
        session_id: str,
        data: ChatRequest,
        prefer: Prefer = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[ChatResponse]:
        """Chat: the request's messages join the session, a worker answers, the answer joins too.

        `stream: true` answers `text/event-stream` (OpenAI-style chunks, then a usage event, then `[DONE]`).
        `run_at` / `delay_s` schedule it: it answers 202 with the job, which waits in the queue until then.
        """
        sid = parse_session_id(session_id)
        chats = api(request).parley.chats
        done = await chats.request(tenant, sid, data, await idempotency(request, idempotency_key))
        job = done.job
        if _respond_async(prefer) or job.run_at is not None:  # scheduled: nothing to wait for
            return json_response(_encode(job), 202, {"Location": f"/sessions/{sid}/chats/{job.id}"})
        if data.stream:
            return await _sse(request, chats, sid, job.id, "0-0")  # type: ignore[return-value]
        return json_response(await wait_for_answer(request, sid, job.id))

    @post(
        "/compact",
        status_code=202,
        responses={**_errors(429), 202: ResponseSpec(data_container=JobAccepted, description="Queued")},
    )
    async def compact(
        self, request: Request, tenant: str, session_id: str, idempotency_key: IdempotencyKey = None
    ) -> Response[JobAccepted]:
        """Compact the conversation now: a job, queued behind the session's chats, has the session's summariser
        (`compaction.model`, else the default model) summarise every message it may (all but the newest
        `compaction.keep_last` and the system messages) into a `SummaryAdded` event; later chats send the summary
        instead. The job's answer is the summary; nothing is stored as a message, and a failed summary drops
        nothing (the job fails `compaction_failed`)."""
        sid = parse_session_id(session_id)
        chats = api(request).parley.chats
        done = await chats.compact(tenant, sid, await idempotency(request, idempotency_key))
        return json_response(_encode(done.job), 202, {"Location": f"/sessions/{sid}/chats/{done.job.id}"})

    @get("/chats", responses=_errors())
    async def list_chats(
        self, request: Request, tenant: str, session_id: str, limit: Limit = 100, offset: Offset = 0
    ) -> Response[ChatJobList]:
        """The session's chat jobs, newest first."""
        return json_list(await api(request).parley.chats.list(tenant, parse_session_id(session_id), limit, offset))

    @get("/chats/{job_id:str}", responses=_errors())
    async def get_chat(self, request: Request, tenant: str, session_id: str, job_id: str) -> Response[ChatJob]:
        """A chat job: its status, attempts, what went into its context, and its answer or error."""
        return json_response(
            await api(request).parley.chats.job(tenant, parse_session_id(session_id), parse_job_id(job_id))
        )

    @post("/chats/{job_id:str}/cancel", status_code=200, responses=_errors(409))
    async def cancel_chat(self, request: Request, tenant: str, session_id: str, job_id: str) -> Response[ChatJob]:
        """Cancel a queued or running chat (409 `chat_not_active` once it ended). What it had streamed so far is
        stored as its answer (unless the request had `save: false`): the conversation ends where the model was
        stopped, as a client that stopped reading the stream saw it."""
        return json_response(
            await api(request).parley.chats.cancel(tenant, parse_session_id(session_id), parse_job_id(job_id))
        )

    @get(
        "/chats/{job_id:str}/stream",
        responses={**_errors(429), 204: ResponseSpec(data_container=None, description="Nothing can follow")},
    )
    async def resume_stream(
        self, request: Request, tenant: str, session_id: str, job_id: str, last_event_id: LastEventId = None
    ) -> EventStream | Response[None]:
        """The job's event stream from the start, or after `Last-Event-ID`: nothing missed, nothing repeated. 204
        once nothing can follow (the client saw the end), so an EventSource stops reconnecting."""
        sid, job = parse_session_id(session_id), parse_job_id(job_id)
        chats = api(request).parley.chats
        await chats.job(tenant, sid, job)  # 404 for unknown jobs and other tenants
        after = last_event_id or "0-0"  # an empty Last-Event-ID is none (an EventSource sends none before an id)
        if not _valid_event_id(after):
            raise Invalid("Last-Event-ID is not an event id of this stream", {"header": "Last-Event-ID"})
        if after.endswith(".1") or await chats.past_the_end(sid, job, after):
            return Response(content=None, status_code=204)
        return await _sse(request, chats, sid, job, after)


def _valid_event_id(text: str) -> bool:
    """A stream entry id (`ms-seq`, each below 2**64), optionally with our `.1` suffix for [DONE]."""
    if not _EVENT_ID.fullmatch(text):
        return False
    ms, seq = text.removesuffix(".1").split("-")
    return int(ms) < 2**64 and int(seq) < 2**64


async def _sse(request: Request[Any, Any, Any], chats: Chats, sid: str, job_id: str, after: str) -> EventStream:
    async def frames() -> AsyncIterator[bytes]:
        cursor = after
        if cursor != "0-0" and await chats.was_last(sid, job_id, cursor):
            yield b"id: %s.1\ndata: [DONE]\n\n" % cursor.encode()  # the client saw the last event, not [DONE]
            return
        async with contextlib.aclosing(chats.follow_chunks(sid, job_id, cursor, KEEPALIVE_S)) as batches:
            async for batch in batches:
                if not batch:
                    yield b": keep-alive\n\n"
                for eid, kind, data in batch:
                    if kind == "chunk":
                        yield b"id: %s\ndata: %s\n\n" % (eid.encode(), data)
                    elif kind == "done":
                        usage = msgspec.json.decode(data).get("usage")
                        yield b"id: %s\ndata: %s\n\n" % (
                            eid.encode(),
                            _encode({"id": job_id, "choices": [], "usage": usage}),
                        )
                        yield b"id: %s.1\ndata: [DONE]\n\n" % eid.encode()
                        return
                    else:  # named so that it is not EventSource's own `error` event (a connection failure)
                        yield b"id: %s\nevent: chat.failed\ndata: %s\n\n" % (
                            eid.encode(),
                            _encode({"error": msgspec.json.decode(data)}),
                        )
                        yield b"id: %s.1\ndata: [DONE]\n\n" % eid.encode()
                        return

    return await open_stream(request, frames(), retry_ms=RETRY_MS)


def _respond_async(prefer: str | None) -> bool:
    """`Prefer` names the `respond-async` preference (RFC 7240: comma-separated preferences, each a token with an
    optional value and parameters; tokens are case-insensitive), not merely contains the text."""
    if not prefer:
        return False
    return any(p.split(";", 1)[0].split("=", 1)[0].strip().lower() == "respond-async" for p in prefer.split(","))
