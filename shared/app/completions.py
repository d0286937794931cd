"""The OpenAI protocol's use case: a client's whole conversation in, each message stored once, a chat job out.

OpenAI clients resend the whole conversation on every call. `complete` compares it with the stored one (the pure
rule is `shared.domain.openai_wire.plan_turns`) and stores only what is new — amending the stored conversation
where the client's parts from it — then runs the same chat as `POST /chat` (`Chats.request`). A retry of a
request whose answer is stored gets that answer back and runs nothing.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import msgspec

from shared.app.chats import Chats, StaleConversation
from shared.app.ports import ChatJobs
from shared.app.service import Idempotency, SessionService
from shared.domain.commands import Amendment, EditMessage, RemoveMessage
from shared.domain.errors import Contention, NotFound
from shared.domain.ids import derived_id
from shared.domain.openai_wire import (
    ChatCompletion,
    ChatCompletionRequest,
    CompletionChoice,
    CompletionMessage,
    Key,
    TurnPlan,
    chain,
    max_tokens_of,
    message_key,
    plan_turns,
    stored_to_read,
    to_message,
    to_tools,
    without_situation,
)
from shared.domain.wire import ChatRequest, ChatResponse, Message, MessageCreate, Usage

__all__ = ["Answer", "Completions", "PrefixCache", "Replay", "completion_of"]

PAGE = 1000
PLAN_ATTEMPTS = 8
_message = msgspec.json.Decoder(Message)
_response = msgspec.json.Decoder(ChatResponse)


class Answer(msgspec.Struct, frozen=True):
    """The chat job that answers the request (new, or one already running for the same conversation)."""

    job_id: str


class Replay(msgspec.Struct, frozen=True):
    """A retry whose answer is stored: that answer, as the completion it was."""

    completion: ChatCompletion


class PrefixCache:
    """Per process: (tenant, session) → (message count, digest of those messages, id of the last one, the session's
    last amendment version).

    Stored messages change only by an amendment (an edit or a removal, which moves the session's `amended`
    version), so a client that resends its conversation is compared against the digest and only the messages
    stored since are read (the id check catches a session re-imported under the same id)."""

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


class Completions:
    def __init__(self, service: SessionService, chats: Chats, jobs: ChatJobs, default_model: str) -> None:
        self.service = service
        self.chats = chats
        self.jobs = jobs
        self.default_model = default_model
        self.prefixes = PrefixCache()

    async def complete(
        self, tenant: str, sid: str, data: ChatCompletionRequest, idem: Idempotency | None = None
    ) -> Answer | Replay:
        """Store what the session does not hold yet of the client's conversation, and answer it."""
        service = self.service
        sent = [to_message(m, i) for i, m in enumerate(data.messages)]
        model = data.model or self.default_model
        for _ in range(PLAN_ATTEMPTS):
            state = await service.current(tenant, sid)  # the append decides on it (a stale one fails the check)
            if not state.exists:
                raise NotFound(f"session {sid} not found")
            assert state.session is not None
            turns = without_situation(sent, state.session.situation)
            keys = [message_key(m) for m in turns]
            digests = chain(keys)
            n = state.message_count - len(state.removed)  # the conversation as shown
            stored = await self._stored(tenant, sid, stored_to_read(len(keys), n), state.amended, keys, digests)
            plan = plan_turns(keys, stored[0], n)
            if plan.kind == "current" and n:
                self.prefixes.put(tenant, sid, n, digests[n], stored[1][-1], state.amended)
            if plan.kind == "replay":
                assert plan.index is not None
                return Replay(await self._stored_answer(tenant, sid, plan.index, model))
            if plan.kind == "current" and state.active_chats:  # the chat asked for last answers it
                return Answer(max(state.active_chats, key=lambda c: c.requested_at).job_id)
            amend = await self._amendments(tenant, sid, plan, turns, n) if plan.kind == "amend" else ()
            request = ChatRequest(
                messages=turns[plan.start :],
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
            try:
                done = await self.chats.request(tenant, sid, request, idem, amend, planned=state.version)
            except StaleConversation:
                continue  # the conversation or its chats changed since we planned: an identical request joins it
            if plan.start == n and done.last_message_id and done.state_version == state.version:
                self.prefixes.put(tenant, sid, len(keys), digests[-1], done.last_message_id, state.amended)
            return Answer(done.job.id)
        raise Contention(f"session {sid} is changing too fast; retry")

    async def _read(self, tenant: str, sid: str, offset: int, end: int) -> list[Message]:
        out: list[Message] = []
        while offset + len(out) < end:
            at = offset + len(out)
            view = await self.service.read(
                sid, functools.partial(self.service.views.messages, tenant, sid, min(PAGE, end - at), at)
            )
            page = [_message.decode(raw) for raw in view.items or []]
            if not page:
                break
            out += page
        return out

    async def _stored(
        self, tenant: str, sid: str, want: int, amended: int, request: list[Key], digests: list[bytes]
    ) -> tuple[list[Key], list[str]]:
        """The first `want` stored messages' keys and ids (those of a cached prefix as "" placeholders)."""
        if want == 0:
            return [], []
        cached = self.prefixes.get(tenant, sid)
        if cached is not None:
            count, digest, last_id, at = cached
            if at == amended and count <= min(want, len(request)) and digests[count] == digest:
                rest = await self._read(tenant, sid, count - 1, want)
                if rest and rest[0].id == last_id:
                    return list(request[:count]) + [message_key(m) for m in rest[1:]], [""] * (count - 1) + [
                        m.id for m in rest
                    ]
        stored = await self._read(tenant, sid, 0, want)
        return [message_key(m) for m in stored], [m.id for m in stored]

    async def _amendments(
        self, tenant: str, sid: str, plan: TurnPlan, turns: list[MessageCreate], n: int
    ) -> tuple[Amendment, ...]:
        """What an `amend` plan records: the client's version of the stored message where they part (an edit), or
        its removal, and the removal of every stored message after it."""
        assert plan.at is not None
        tail = await self._read(tenant, sid, plan.at, n)
        out: list[Amendment] = []
        if plan.edit:
            mine = turns[plan.at]
            out.append(EditMessage(message=tail[0], content=mine.content, name=mine.name))
            tail = tail[1:]
        return (*out, *(RemoveMessage(message=m) for m in tail))

    async def _stored_answer(self, tenant: str, sid: str, index: int, model: str) -> ChatCompletion:
        """The stored assistant message at `index` as a completion, with the id of the job that produced it."""
        [message] = await self._read(tenant, sid, index, index + 1)
        answer = await self._job_answer(tenant, sid, message)
        if answer is not None:
            return completion_of(answer)
        # an assistant message someone stored with POST /messages (or a job past its retention)
        content = message.content if isinstance(message.content, str) else None
        return ChatCompletion(
            id=message.id,
            created=int(message.created_at.timestamp()),
            model=model,
            choices=[
                CompletionChoice(
                    finish_reason="tool_calls" if message.tool_calls else "stop",
                    message=CompletionMessage(content=content, tool_calls=message.tool_calls),
                )
            ],
            usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0),
        )

    async def _job_answer(self, tenant: str, sid: str, message: Message) -> ChatResponse | None:
        """The response of the chat job whose answer `message` is. Answer ids derive from job ids and share their
        time prefix, so the newest-first scan stops at the first job older than the message's prefix (page one)."""
        prefix = message.id[:13]
        offset = 0
        while True:
            items = await self.chats.list(tenant, sid, 100, offset)
            for raw in items:
                job = msgspec.json.decode(raw)
                if derived_id(job["id"], "answer") == message.id and job.get("response"):
                    return msgspec.convert(job["response"], ChatResponse)
                if job["id"][:13] < prefix:
                    return None
            if len(items) < 100:
                return None
            offset += 100


def completion_of(r: ChatResponse) -> ChatCompletion:
    """Parley's chat answer as OpenAI's `chat.completion`."""
    return ChatCompletion(
        id=r.id,
        created=int(r.created_at.timestamp()),
        model=r.model,
        choices=[
            CompletionChoice(
                index=c.index,
                finish_reason=c.finish_reason,
                message=CompletionMessage(content=c.message.content, tool_calls=c.message.tool_calls),
            )
            for c in r.choices
        ],
        usage=r.usage,
    )
