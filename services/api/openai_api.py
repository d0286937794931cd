"""A session as a stateful OpenAI Chat Completions endpoint: `base_url = {PARLEY}/sessions/{id}` in any OpenAI client.

`POST /sessions/{id}/chat/completions` takes the client's whole conversation, stores only the turns the session
does not hold yet (`plan_turns`), and runs the same chat job as `POST /chat` (`RequestChat`: context builder,
token budget, `ContextBuilt`, the job under `/chats`). It answers a `chat.completion`, or streams
`chat.completion.chunk` events as OpenAI does: `data:` lines only, then `data: [DONE]`.
Errors keep Parley's `{"error": {status, code, message}}` and add OpenAI's `type` and `param`.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec

from shared.adapters.codec import json_encode
from shared.domain.commands import Amendment, EditMessage, RemoveMessage, RequestChat
from shared.domain.errors import Contention, NotFound
from shared.domain.events import ChatCancelled, ChatRequested, Event, MessageAdded
from shared.domain.ids import derived_id, uuid7
from shared.domain.wire import ChatRequest, ChatResponse, ErrorBody, Message, MessageCreate, Usage
from shared.domain.openai_wire import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    CompletionChoice,
    CompletionMessage,
    Key,
    ModelCard,
    ModelList,
    OpenAIErrorBody,
    OpenAIErrorDetail,
    WireRejected,
    chain,
    error_type,
    max_tokens_of,
    message_key,
    plan_turns,
    stored_to_read,
    TurnPlan,
    to_message,
    to_tools,
    without_situation,
)
from shared.domain.state import SessionState
from shared.adapters.redis.chats import ChatStore
from shared.app.service import Reply, SessionService
from services.api.auth import provide_tenant
from services.api.body import StrictBody
from services.api.chats import ERROR_STATUS, ChatTimeout, JobAccepted, admitted_chat, chat_failed, follow_chunks, wait_answer
from services.api.errors import EXCEPTION_HANDLERS
from services.api.sse import EventStream, open_stream, stream_response, take_stream
from services.api.sessions import IdempotencyKey, _idempotency, _service, _session_id

PAGE = 1000
PLAN_ATTEMPTS = 8
STARTED = int(time.time())
_messages = msgspec.json.Decoder(Message)
_response = msgspec.json.Decoder(ChatResponse)
_PATH = re.compile(r"at `\$\.?([^`]*)`")


class _Stale(Exception):
    """The session's conversation grew between our read and our append: plan again."""


# -- remembering what we compared -----------------------------------------------------------------------------------
class PrefixCache:
    """Per process: (tenant, session) → (message count, digest of those messages, id of the last one, the session's
    last amendment version).

    Stored messages change only by an amendment (an edit or a removal, which moves the session's `amended`
    version), so a client that resends its conversation is compared against the digest and only the messages
    stored since are read (the id check catches a session re-imported under the same id).
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str], tuple[int, bytes, str, int]] = OrderedDict()

    def get(self, tenant: str, sid: str) -> tuple[int, bytes, str, int] | None:
        item = self._items.get((tenant, sid))
        if item is not None:
            self._items.move_to_end((tenant, sid))
        return item

    def put(self, tenant: str, sid: str, count: int, digest: bytes, last_id: str, amended: int) -> None:
        if count <= 0:
            return
        self._items[(tenant, sid)] = (count, digest, last_id, amended)
        self._items.move_to_end((tenant, sid))
        while len(self._items) > self.size:
            self._items.popitem(last=False)


PREFIXES = PrefixCache()


async def _read_messages(service: SessionService, tenant: str, sid: str, offset: int, end: int) -> list[Message]:
    out: list[Message] = []
    while offset + len(out) < end:
        at = offset + len(out)
        view = await service.read(sid, lambda o=at, n=min(PAGE, end - at): service.views.messages(tenant, sid, n, o))
        page = [_messages.decode(raw) for raw in view.items or []]
        if not page:
            break
        out += page
    return out


async def _stored(
    service: SessionService, tenant: str, sid: str, want: int, amended: int, request: list[Key], digests: list[bytes]
) -> tuple[list[Key], list[str]]:
    """The first `want` stored messages' keys and ids (those of a cached prefix as "" placeholders)."""
    if want == 0:
        return [], []
    cached = PREFIXES.get(tenant, sid)
    if cached is not None:
        count, digest, last_id, at = cached
        if at == amended and count <= min(want, len(request)) and digests[count] == digest:
            rest = await _read_messages(service, tenant, sid, count - 1, want)
            if rest and rest[0].id == last_id:
                return list(request[:count]) + [message_key(m) for m in rest[1:]], [""] * (count - 1) + [m.id for m in rest]
    stored = await _read_messages(service, tenant, sid, 0, want)
    return [message_key(m) for m in stored], [m.id for m in stored]


async def _amendments(service: SessionService, tenant: str, sid: str, plan: TurnPlan, turns: list[MessageCreate], n: int) -> tuple[Amendment, ...]:
    """What `plan` (an `amend`) records: the client's version of the stored message where they part (an edit), or
    its removal, and the removal of every stored message after it."""
    assert plan.at is not None
    tail = await _read_messages(service, tenant, sid, plan.at, n)
    out: list[Amendment] = []
    if plan.edit:
        mine = turns[plan.at]
        out.append(EditMessage(message=tail[0], content=mine.content, name=mine.name))
        tail = tail[1:]
    return (*out, *(RemoveMessage(message=m) for m in tail))


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


def _as_openai(handler: Callable[[Request, Any], Response[ErrorBody]]) -> Callable[[Request, Any], Response[OpenAIErrorBody]]:
    """Parley's error answer, reshaped: same status and fields, plus `type` and `param`."""

    def handle(request: Request, exc: Any) -> Response[OpenAIErrorBody]:
        original = handler(request, exc)
        err = original.content.error
        status = 400 if err.code == "token_budget_exceeded" else err.status
        body = OpenAIErrorDetail(status=status, code=err.code, message=err.message, type=error_type(status), param=_param(err.details), details=err.details)
        return Response(OpenAIErrorBody(body), status_code=status, media_type=MediaType.JSON, headers=dict(original.headers) or None)

    return handle


def _on_rejected(_: Request, exc: WireRejected) -> Response[OpenAIErrorBody]:
    body = OpenAIErrorDetail(status=exc.status, code=exc.code, message=exc.message, type=error_type(exc.status), param=exc.param)
    return Response(OpenAIErrorBody(body), status_code=exc.status, media_type=MediaType.JSON)


OPENAI_EXCEPTION_HANDLERS: dict[Any, Any] = {t: _as_openai(h) for t, h in EXCEPTION_HANDLERS.items()} | {WireRejected: _on_rejected}


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    return {c: ResponseSpec(data_container=OpenAIErrorBody, description="Error (the SDK raises the matching exception)") for c in codes}


# -- answers ----------------------------------------------------------------------------------------------------------
def _completion(r: ChatResponse) -> ChatCompletion:
    return ChatCompletion(
        id=r.id,
        created=int(r.created_at.timestamp()),
        model=r.model,
        choices=[
            CompletionChoice(index=c.index, finish_reason=c.finish_reason, message=CompletionMessage(content=c.message.content, tool_calls=c.message.tool_calls))
            for c in r.choices
        ],
        usage=r.usage,
    )


def _data(value: Any) -> bytes:
    return b"data: " + json_encode(value) + b"\n\n"


def _error_event(code: str, message: str) -> bytes:
    status = 400 if code == "token_budget_exceeded" else ERROR_STATUS.get(code, 502)
    return _data({"error": OpenAIErrorDetail(status=status, code=code, message=message, type=error_type(status), param=None)})


async def _replayed_stream(request: Request, c: ChatCompletion, include_usage: bool) -> EventStream:
    """A stored answer as a stream: the role, the content, the tool calls, the finish reason (and the usage)."""

    async def events() -> AsyncIterator[bytes]:
        usage: Any = None if include_usage else msgspec.UNSET
        m = c.choices[0].message

        def chunk(delta: ChunkDelta, finish: str | None = None) -> bytes:
            return _data(ChatCompletionChunk(id=c.id, created=c.created, model=c.model, choices=[ChunkChoice(delta=delta, finish_reason=finish)], usage=usage))

        yield chunk(ChunkDelta(role="assistant", content=""))
        if m.content:
            yield chunk(ChunkDelta(content=m.content))
        if m.tool_calls:
            yield chunk(ChunkDelta(tool_calls=[{"index": i, **msgspec.to_builtins(t)} for i, t in enumerate(m.tool_calls)]))
        yield chunk(ChunkDelta(), c.choices[0].finish_reason)
        if include_usage:
            yield _data(ChatCompletionChunk(id=c.id, created=c.created, model=c.model, choices=[], usage=c.usage))
        yield b"data: [DONE]\n\n"

    return await open_stream(request, events())


async def _relay(request: Request, sid: str, job_id: str, model: str, include_usage: bool, wait_s: float) -> EventStream:
    """The job's chunk stream with OpenAI's framing: no `id:` lines, no comments, `[DONE]` at the end.

    The first entries are awaited before any byte of the answer goes out: a job that fails before its first token
    (token budget, provider down) answers an HTTP error the SDK raises, not a broken stream. A stream quiet for
    `wait_s` ends with a `chat_timeout` error event (the job goes on)."""
    created = int(time.time())
    usage: Any = None if include_usage else msgspec.UNSET
    slot = await take_stream(request)
    batches = follow_chunks(request, sid, job_id, keepalive_s=wait_s)  # an empty batch: quiet for wait_s
    try:
        first = await anext(batches)
        if not first:
            raise ChatTimeout(f"chat {job_id} sent nothing within {wait_s:g} s; it goes on: GET /sessions/{sid}/chats/{job_id}", {"job_id": job_id})
        if first[0][1] == "error":
            raise chat_failed(first[0][2])
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
                    yield _error_event("chat_timeout", f"chat {job_id} sent nothing for {wait_s:g} s; it goes on: GET /sessions/{sid}/chats/{job_id}")
                    return
                for _, kind, data in batch:
                    if kind == "chunk":
                        for c in msgspec.json.decode(data).get("choices") or ():
                            delta = msgspec.convert(c.get("delta") or {}, ChunkDelta)
                            yield chunk([ChunkChoice(index=c.get("index", 0), delta=delta, finish_reason=c.get("finish_reason"))])
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
        responses=_errors(400, 401, 404, 409, 413, 422, 502, 503, 504),
    )
    async def create_completion(
        self, request: Request, tenant: str, session_id: str, data: ChatCompletionRequest, idempotency_key: IdempotencyKey = None
    ) -> Response[ChatCompletion]:
        """OpenAI Chat Completions on this session (point an OpenAI client's `base_url` at `/sessions/{id}`).

        Send the whole conversation, as OpenAI clients do: only the messages the session does not hold yet are
        stored (README: "Use it from any OpenAI client"). `stream: true` answers `text/event-stream` of
        `chat.completion.chunk` objects (`data:` lines only), a usage chunk with `stream_options.include_usage`,
        then `data: [DONE]`. The completion's `id` is the chat job's id (`GET /sessions/{id}/chats/{job}`).
        """
        if data.n not in (None, 1):
            raise WireRejected("n must be 1: a session holds one conversation", "n")
        service, sid = _service(request), _session_id(session_id)
        settings = request.app.state.settings
        chats: ChatStore = request.app.state.chats
        sent = [to_message(m, i) for i, m in enumerate(data.messages)]
        model = data.model or settings.model
        stream = bool(data.stream)
        include_usage = bool(stream and data.stream_options and data.stream_options.include_usage)
        idem = await _idempotency(request, idempotency_key)

        for _ in range(PLAN_ATTEMPTS):
            state = await service.log.load(tenant, sid, service.cache.get(tenant, sid))
            if state is None or not state.exists:
                raise NotFound(f"session {sid} not found")
            assert state.session is not None
            service.cache.put(tenant, state)  # the append decides on this state (a stale one would only fail the check)
            turns = without_situation(sent, state.session.situation)
            keys = [message_key(m) for m in turns]
            digests = chain(keys)
            n = state.message_count - len(state.removed)  # the conversation as shown
            stored = await _stored(service, tenant, sid, stored_to_read(len(keys), n), state.amended, keys, digests)
            plan = plan_turns(keys, stored[0], n)
            if plan.kind == "current" and n:
                PREFIXES.put(tenant, sid, n, digests[n], stored[1][-1], state.amended)
            if plan.kind == "replay":
                assert plan.index is not None
                return await self._replay(request, service, chats, tenant, sid, plan.index, model, stream, include_usage)
            if plan.kind == "current" and state.active_chats:
                return await self._answer(request, chats, sid, state.active_chats[-1].job_id, model, stream, include_usage)
            amend = await _amendments(service, tenant, sid, plan, turns, n) if plan.kind == "amend" else ()
            new = turns[plan.start :]
            try:
                job_id, cancelled, last_id = await self._request(request, service, tenant, sid, new, amend, data, state, model, idem)
            except _Stale:
                continue
            if plan.start == n and last_id:
                PREFIXES.put(tenant, sid, len(keys), digests[-1], last_id, state.amended)
            break
        else:
            raise Contention(f"session {sid} is changing too fast; retry")

        for other in cancelled:
            await chats.emit(sid, other, "error", json_encode({"code": "cancelled", "message": f"interrupted by chat {job_id}"}))
        head = service.cache.get(tenant, sid)
        if head is not None and head.active_chats and head.active_chats[0].job_id == job_id:
            await request.app.state.queue.enqueue(tenant, sid, [job_id])
        return await self._answer(request, chats, sid, job_id, model, stream, include_usage)

    async def _request(
        self, request: Request, service: SessionService, tenant: str, sid: str, new: list[MessageCreate], amend: tuple[Amendment, ...],
        data: ChatCompletionRequest, state: SessionState, model: str, idem: Any,
    ) -> tuple[str, list[str], str | None]:
        """Record the amendments, the new turns and the chat request, iff the session is still at the version we
        planned on (else `_Stale`: plan again)."""
        assert state.session is not None
        chat = ChatRequest(
            messages=new,
            stream=bool(data.stream),
            max_tokens=max_tokens_of(data, state.session.token_budget),
            model=model,
            temperature=data.temperature,
            top_p=data.top_p,
            stop=data.stop,
            seed=data.seed,
            tools=to_tools(data.tools),
            tool_choice=data.tool_choice,
            response_format=data.response_format,
        )
        cancelled: list[str] = []
        last: list[str | None] = [None]

        def respond(after: SessionState, events: list[Event]) -> Reply:
            if after.version - len(events) != state.version:
                raise _Stale()  # the conversation or its chats changed since we planned: an identical request joins
            added = [e for e in events if isinstance(e, MessageAdded)]
            last[0] = added[-1].data.id if added else None
            cancelled[:] = [e.data.job_id for e in events if isinstance(e, ChatCancelled)]
            req = next(e for e in events if isinstance(e, ChatRequested))
            body = JobAccepted(id=req.data.job_id, session_id=sid, status="queued", created_at=req.occurred_at)
            return Reply(status=202, body=msgspec.Raw(json_encode(body)))

        job_id = uuid7()
        command = RequestChat(job_id=job_id, request=chat, default_model=request.app.state.settings.model, amend=amend)
        async with admitted_chat(request, tenant, job_id) as keep:
            reply = await service.execute(tenant, sid, command, respond, idem)
            accepted = msgspec.json.decode(bytes(reply.body))["id"]
            keep(accepted == job_id)
        if accepted != job_id:  # an Idempotency-Key replay: the first request did the rest
            return accepted, [], None
        return job_id, cancelled, last[0]

    async def _answer(self, request: Request, chats: ChatStore, sid: str, job_id: str, model: str, stream: bool, include_usage: bool) -> Response[ChatCompletion]:
        wait_s = request.app.state.settings.chat_wait_s
        if stream:
            return await _relay(request, sid, job_id, model, include_usage, wait_s)  # type: ignore[return-value]
        done = await wait_answer(request, sid, job_id, wait_s)
        return Response(_completion(_response.decode(done)), media_type=MediaType.JSON)

    async def _replay(
        self, request: Request, service: SessionService, chats: ChatStore, tenant: str, sid: str, index: int, model: str, stream: bool, include_usage: bool
    ) -> Response[ChatCompletion]:
        """A retry whose answer is stored: that answer again, with the id of the job that produced it; nothing runs."""
        [message] = await _read_messages(service, tenant, sid, index, index + 1)
        answer = await _job_answer(service, chats, tenant, sid, message)
        if answer is not None:
            completion = _completion(answer)
        else:  # an assistant message someone stored with POST /messages (or a job past its retention)
            completion = ChatCompletion(
                id=message.id,
                created=int(message.created_at.timestamp()),
                model=model,
                choices=[CompletionChoice(finish_reason="tool_calls" if message.tool_calls else "stop",
                                          message=CompletionMessage(content=message.content if isinstance(message.content, str) else None, tool_calls=message.tool_calls))],
                usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0),
            )
        if stream:
            return await _replayed_stream(request, completion, include_usage)  # type: ignore[return-value]
        return Response(completion, media_type=MediaType.JSON)

    @get("/models", responses=_errors(401, 404, 503))
    async def list_models(self, request: Request, tenant: str, session_id: str) -> ModelList:
        """The models this deployment serves (the SDK's `models.list()`); a completion accepts any model name."""
        service, sid = _service(request), _session_id(session_id)
        await service.read(sid, lambda: service.views.session(tenant, sid))  # 404 for unknown sessions and other tenants
        return ModelList(data=[ModelCard(id=request.app.state.settings.model, created=STARTED, owned_by="parley")])

    @get("/models/{model:str}", responses=_errors(401, 404, 503))
    async def get_model(self, request: Request, tenant: str, session_id: str, model: str) -> ModelCard:
        """One model (the SDK's `models.retrieve(id)`): a completion passes any model name to the model server, so
        every name is answered, as the model card OpenAI answers for it."""
        service, sid = _service(request), _session_id(session_id)
        await service.read(sid, lambda: service.views.session(tenant, sid))
        return ModelCard(id=model, created=STARTED, owned_by="parley")


async def _job_answer(service: SessionService, chats: ChatStore, tenant: str, sid: str, message: Message) -> ChatResponse | None:
    """The response of the chat job whose answer `message` is. Answer ids derive from job ids and share their time
    prefix, so the newest-first scan stops at the first job older than the message's prefix (usually page one)."""
    prefix = message.id[:13]
    offset = 0
    while True:
        view = await service.read(sid, lambda o=offset: chats.jobs(tenant, sid, 100, o))
        items = view.items or []
        for raw in items:
            job = msgspec.json.decode(raw)
            if derived_id(job["id"], "answer") == message.id and job.get("response"):
                return msgspec.convert(job["response"], ChatResponse)
            if job["id"][:13] < prefix:
                return None
        if len(items) < 100:
            return None
        offset += 100
