"""A session as a stateful OpenAI Chat Completions endpoint: `base_url = {PARLEY}/sessions/{id}` in any OpenAI client.

`POST /sessions/{id}/chat/completions` takes the client's whole conversation, stores only the turns the session
does not hold yet (`shared.app.completions`), and runs the same chat job as `POST /chat` (context builder, token
budget, `ContextBuilt`, the job under `/chats`). It answers a `chat.completion`, or streams
`chat.completion.chunk` events as OpenAI does: `data:` lines only, then `data: [DONE]`.
Errors keep Parley's `{"error": {status, code, message}}` and add OpenAI's `type` and `param`.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec

from services.api.auth import provide_tenant
from services.api.body import StrictBody
from services.api.context import api
from services.api.errors import EXCEPTION_HANDLERS, UNANSWERED_STATUS
from services.api.params import IdempotencyKey, idempotency, parse_session_id
from services.api.sse import EventStream, open_stream, stream_response, take_stream, wait_for_answer
from shared.app.chats import Chats, unanswered
from shared.app.completions import Answer, completion_of
from shared.domain.errors import ChatTimeout
from shared.domain.openai_wire import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    ModelCard,
    ModelList,
    OpenAIErrorBody,
    OpenAIErrorDetail,
    WireRejected,
    error_type,
)
from shared.domain.wire import ChatResponse, ErrorBody

__all__ = ["OpenAIController"]

STARTED = int(time.time())
_response = msgspec.json.Decoder(ChatResponse)
_PATH = re.compile(r"at `\$\.?([^`]*)`")
_encode = msgspec.json.encode


# -- errors ---------------------------------------------------------------------------------------------------------
def _param(details: Any) -> str | None:
    if isinstance(details, dict):
        for k in ("param", "field", "header"):
            if isinstance(details.get(k), str):
                return details[k]
    if isinstance(details, list) and details and isinstance(details[0], dict):
        if (m := _PATH.search(str(details[0].get("message", "")))) and m.group(1):
            return m.group(1)
        if isinstance(details[0].get("key"), str):
            return details[0]["key"]
    return None


def _as_openai(
    handler: Callable[[Request, Any], Response[ErrorBody]],
) -> Callable[[Request, Any], Response[OpenAIErrorBody]]:
    """Parley's error answer, reshaped: same status and fields, plus `type` and `param`."""

    def handle(request: Request, exc: Any) -> Response[OpenAIErrorBody]:
        original = handler(request, exc)
        err = original.content.error
        status = 400 if err.code == "token_budget_exceeded" else err.status
        body = OpenAIErrorDetail(
            status=status,
            code=err.code,
            message=err.message,
            type=error_type(status),
            param=_param(err.details),
            details=err.details,
        )
        return Response(
            OpenAIErrorBody(body), status_code=status, media_type=MediaType.JSON, headers=dict(original.headers) or None
        )

    return handle


def _on_rejected(_: Request, exc: WireRejected) -> Response[OpenAIErrorBody]:
    body = OpenAIErrorDetail(
        status=exc.status, code=exc.code, message=exc.message, type=error_type(exc.status), param=exc.param
    )
    return Response(OpenAIErrorBody(body), status_code=exc.status, media_type=MediaType.JSON)


OPENAI_EXCEPTION_HANDLERS: dict[Any, Any] = {t: _as_openai(h) for t, h in EXCEPTION_HANDLERS.items()} | {
    WireRejected: _on_rejected
}


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    return {
        c: ResponseSpec(data_container=OpenAIErrorBody, description="Error (the SDK raises the matching exception)")
        for c in codes
    }


# -- answers ----------------------------------------------------------------------------------------------------------
def _data(value: Any) -> bytes:
    return b"data: " + _encode(value) + b"\n\n"


def _error_event(code: str, message: str) -> bytes:
    status = 400 if code == "token_budget_exceeded" else UNANSWERED_STATUS.get(code, 502)
    return _data(
        {"error": OpenAIErrorDetail(status=status, code=code, message=message, type=error_type(status), param=None)}
    )


async def _replayed_stream(request: Request[Any, Any, Any], c: ChatCompletion, include_usage: bool) -> EventStream:
    """A stored answer as a stream: the role, the content, the tool calls, the finish reason (and the usage)."""

    async def events() -> AsyncIterator[bytes]:
        usage: Any = None if include_usage else msgspec.UNSET
        m = c.choices[0].message

        def chunk(delta: ChunkDelta, finish: str | None = None) -> bytes:
            return _data(
                ChatCompletionChunk(
                    id=c.id,
                    created=c.created,
                    model=c.model,
                    choices=[ChunkChoice(delta=delta, finish_reason=finish)],
                    usage=usage,
                )
            )

        yield chunk(ChunkDelta(role="assistant", content=""))
        if m.content:
            yield chunk(ChunkDelta(content=m.content))
        if m.tool_calls:
            yield chunk(
                ChunkDelta(tool_calls=[{"index": i, **msgspec.to_builtins(t)} for i, t in enumerate(m.tool_calls)])
            )
        yield chunk(ChunkDelta(), c.choices[0].finish_reason)
        if include_usage:
            yield _data(ChatCompletionChunk(id=c.id, created=c.created, model=c.model, choices=[], usage=c.usage))
        yield b"data: [DONE]\n\n"

    return await open_stream(request, events())


async def _relay(
    request: Request[Any, Any, Any], chats: Chats, sid: str, job_id: str, model: str, include_usage: bool, wait_s: float
) -> EventStream:
    """The job's chunk stream with OpenAI's framing: no `id:` lines, no comments, `[DONE]` at the end.

    The first entries are awaited before any byte of the answer goes out: a job that fails before its first token
    (token budget, provider down) answers an HTTP error the SDK raises, not a broken stream. A stream quiet for
    `wait_s` ends with a `chat_timeout` error event (the job goes on)."""
    created = int(time.time())
    usage: Any = None if include_usage else msgspec.UNSET
    slot = await take_stream(request)
    batches = chats.follow_chunks(sid, job_id, keepalive_s=wait_s)  # an empty batch: quiet for wait_s
    try:
        first = await anext(batches)
        if not first:
            raise ChatTimeout(
                f"chat {job_id} sent nothing within {wait_s:g} s; it goes on: GET /sessions/{sid}/chats/{job_id}",
                {"job_id": job_id},
            )
        if first[0][1] == "error":
            raise unanswered(first[0][2])
    except BaseException:
        await batches.aclose()
        await slot.give()
        raise

    def chunk(choices: list[ChunkChoice], u: Any = usage) -> bytes:
        return _data(ChatCompletionChunk(id=job_id, created=created, model=model, choices=choices, usage=u))

    async def events() -> AsyncIterator[bytes]:
        yield chunk([ChunkChoice(delta=ChunkDelta(role="assistant", content=""))])
        async with contextlib.aclosing(batches):
            batch = first
            while True:
                if not batch:
                    yield _error_event(
                        "chat_timeout",
                        f"chat {job_id} sent nothing for {wait_s:g} s; it goes on: GET /sessions/{sid}/chats/{job_id}",
                    )
                    return
                for _, kind, data in batch:
                    if kind == "chunk":
                        for c in msgspec.json.decode(data).get("choices") or ():
                            delta = msgspec.convert(c.get("delta") or {}, ChunkDelta)
                            yield chunk(
                                [
                                    ChunkChoice(
                                        index=c.get("index", 0), delta=delta, finish_reason=c.get("finish_reason")
                                    )
                                ]
                            )
                    elif kind == "done":
                        if include_usage:
                            yield chunk([], _response.decode(data).usage)
                        yield b"data: [DONE]\n\n"
                        return
                    else:
                        err = msgspec.json.decode(data)
                        yield _error_event(err["code"], err["message"])
                        return
                batch = await anext(batches)

    return stream_response(slot, events())


# -- the controller ---------------------------------------------------------------------------------------------------
class OpenAIController(Controller):
    path = "/sessions/{session_id:str}"
    tags = ["openai"]
    dependencies = {"tenant": Provide(provide_tenant)}
    security = [{"bearer": []}, {"apiKey": []}]
    exception_handlers = OPENAI_EXCEPTION_HANDLERS

    @post(
        "/chat/completions",
        status_code=200,
        dto=StrictBody[ChatCompletionRequest],
        return_dto=None,
        responses=_errors(400, 401, 404, 409, 413, 422, 429, 502, 503, 504),
    )
    async def create_completion(
        self,
        request: Request,
        tenant: str,
        session_id: str,
        data: ChatCompletionRequest,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[ChatCompletion]:
        """OpenAI Chat Completions on this session (point an OpenAI client's `base_url` at `/sessions/{id}`).

        Send the whole conversation, as OpenAI clients do: only the messages the session does not hold yet are
        stored (README: "Use it from any OpenAI client"). `stream: true` answers `text/event-stream` of
        `chat.completion.chunk` objects (`data:` lines only), a usage chunk with `stream_options.include_usage`,
        then `data: [DONE]`. The completion's `id` is the chat job's id (`GET /sessions/{id}/chats/{job}`).
        """
        if data.n not in (None, 1):
            raise WireRejected("n must be 1: a session holds one conversation", "n")
        sid = parse_session_id(session_id)
        parley = api(request).parley
        model = data.model or parley.settings.model
        stream = bool(data.stream)
        include_usage = bool(stream and data.stream_options and data.stream_options.include_usage)
        done = await parley.completions.complete(tenant, sid, data, await idempotency(request, idempotency_key))
        if not isinstance(done, Answer):  # a retry whose answer is stored: that answer again; nothing runs
            if stream:
                return await _replayed_stream(request, done.completion, include_usage)  # type: ignore[return-value]
            return Response(done.completion, media_type=MediaType.JSON)
        if stream:
            return await _relay(
                request, parley.chats, sid, done.job_id, model, include_usage, parley.settings.chat_wait_s
            )  # type: ignore[return-value]
        return Response(
            completion_of(_response.decode(await wait_for_answer(request, sid, done.job_id))), media_type=MediaType.JSON
        )

    @get("/models", responses=_errors(401, 404, 503))
    async def list_models(self, request: Request, tenant: str, session_id: str) -> ModelList:
        """The models this deployment serves (the SDK's `models.list()`); a completion accepts any model name."""
        parley = api(request).parley
        await parley.sessions.get(tenant, parse_session_id(session_id))  # 404 for unknown sessions and other tenants
        return ModelList(data=[ModelCard(id=parley.settings.model, created=STARTED, owned_by="parley")])

    @get("/models/{model:path}", responses=_errors(401, 404, 503))
    async def get_model(self, request: Request, tenant: str, session_id: str, model: str) -> ModelCard:
        """One model (the SDK's `models.retrieve(id)`): a completion passes any model name to the model server, so
        every name is answered, as the model card OpenAI answers for it; a name may hold `/` (`meta-llama/…`, as
        vLLM and OpenRouter name theirs), sent as it is or as `%2F`."""
        await api(request).parley.sessions.get(tenant, parse_session_id(session_id))
        return ModelCard(id=model.removeprefix("/"), created=STARTED, owned_by="parley")
