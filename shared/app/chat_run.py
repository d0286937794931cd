"""The chat job: build the context, call the model, stream the answer, record it once.

arq may run a job more than once (a worker died, a timeout). Every step is decided on the
session's log, so a repeat run changes nothing: the answer is appended only while the job is
still active, and the answer's ids are derived from the job id.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec

from shared.app.chats import queue_if_first, streamed_text
from shared.app.ports import (
    ENDS,
    ChatJobs,
    ChatQueue,
    Completion,
    Delta,
    Limits,
    ModelError,
    ModelProvider,
    ModelRequest,
    Superseded,
)
from shared.app.service import SessionService
from shared.domain.commands import AddSummary, CompleteChat, FailChat, RecordContext
from shared.domain.context import (
    ContextMessage,
    ContextPlan,
    Summary,
    TokenBudgetExceeded,
    TokenCounter,
    message_tokens,
    plan_context,
    to_openai,
)
from shared.domain.errors import DomainError, NotFound
from shared.domain.events import ChatRequested, Event, MessageAdded
from shared.domain.state import SessionState
from shared.domain.wire import (
    AssistantMessage,
    ChatChoice,
    ChatResponse,
    Compaction,
    ContextReport,
    Message,
    Tool,
    Usage,
)

log = logging.getLogger("parley.chat")

SUMMARY_INSTRUCTION = (
    "Summarize the conversation below for whoever continues it: keep facts, names, numbers, decisions "
    "and open questions. Write plain sentences, no preamble."
)
CANCEL_CHECK_S = 0.1
PAGE = 1000
"""Messages per read of the conversation (at most)."""
FIRST_PAGE = 100
"""Messages of the first read backwards from the newest, with a budget, and of the read past the budget's reach.
Between them each read is sized from the tokens per message read so far to what the budget has left (up to
`PAGE`): a budget usually holds tens of messages, and a long session must not cost a chat more than a short one."""
_encode = msgspec.json.Encoder().encode
_message_decoder = msgspec.json.Decoder(Message)


class Cancelled(Exception):
    pass


class CompactionFailed(ModelError):
    """The summary could not be written (the model failed or answered nothing) and the session's compaction says
    to fail (`on_failure: fail`, or a compaction job): nothing was dropped, nothing recorded."""

    def __init__(self, message: str) -> None:
        super().__init__("compaction_failed", message)


class ChatRunner:
    def __init__(
        self,
        service: SessionService,
        chats: ChatJobs,
        provider: ModelProvider,
        counter_for: Callable[[str], TokenCounter],
        summary_reserve: int = 256,
        on_usage: Callable[[Usage], None] = lambda usage: None,
        limits: Limits | None = None,
        queue: ChatQueue | None = None,
    ) -> None:
        """`counter_for(model)`: the token counter of a model (its tokenizer); `on_usage`: told each answer's
        usage (the provider's, else our own count), for metrics."""
        self.service = service
        self.chats = chats
        self.provider = provider
        self.limits = limits
        """The tenant's chat slot is given back as soon as the job ends here: waiting for the projector to see the
        end (which also gives it back, after a crash say) would hold slots a client already got its answer for."""
        self.counter_for = counter_for
        self.queue = queue
        """Where `requeue` queues a job that answered `waiting` and became its session's first chat meanwhile."""
        self.summary_reserve = summary_reserve
        self.on_usage = on_usage

    async def run(self, tenant: str, session_id: str, job_id: str) -> str:
        """One attempt at a job; answers what happened (for arq's log)."""
        try:  # the cached state and the log's tail: the job's own appends then find the session cached
            state: SessionState | None = await self.service.current(tenant, session_id)
        except NotFound:
            state = None
        active = state.active(job_id) if state is not None else None
        if state is None or active is None:
            await self._ensure_terminal(tenant, session_id, job_id)
            return "ended"
        if state.active_chats[0].job_id != job_id:
            return "waiting"  # the projector enqueues it again when the chats before it end
        attempt, read = await asyncio.gather(  # the request is read meanwhile (dropped if the job ended)
            self.chats.mark_running(session_id, job_id),
            self.service.log.read(session_id, after=active.requested_at - 1, limit=1),
        )
        if not attempt or not read:  # ended, or its session purged meanwhile
            return "ended"
        [requested] = read
        assert isinstance(requested, ChatRequested)
        try:
            plan, tools, written = await self._context(tenant, session_id, state, requested)
            if requested.data.params.compact:
                completion = written or Completion(
                    content=state.summary.content if state.summary else "",
                    tool_calls=None,
                    finish_reason="stop",
                    model=requested.data.params.model,
                )
            else:
                completion = await self._answer(session_id, job_id, requested, plan, tools, attempt)
        except (TokenBudgetExceeded, ModelError) as e:
            code, message = (e.code, e.message)
            await self.fail(tenant, session_id, job_id, code, message)
            return f"failed: {code}"
        except Cancelled:
            await self._ensure_terminal(tenant, session_id, job_id)  # if whoever cancelled could not say so
            return "cancelled"
        except Superseded:  # a later attempt runs (it answers), or the stream ended (a delete, a cancel): stop writing
            return "superseded"
        usage = completion.usage or _count_usage(plan, completion, self.counter_for(completion.model))
        response = ChatResponse(
            id=job_id,
            session_id=session_id,
            created_at=datetime.now(UTC),
            model=completion.model,
            choices=[
                ChatChoice(
                    finish_reason=completion.finish_reason,
                    message=AssistantMessage(content=completion.content, tool_calls=completion.tool_calls),
                )
            ],
            usage=usage,
        )
        appended = await self._record(
            tenant, session_id, CompleteChat(job_id=job_id, response=response, save=requested.data.params.save)
        )
        if appended:
            self.on_usage(usage)
            await self._ended(tenant, session_id, job_id, "done", _encode(response))
        else:
            await self._ensure_terminal(tenant, session_id, job_id)
        return "succeeded"

    async def requeue(self, tenant: str, session_id: str, job_id: str) -> None:
        """A run that answered `waiting` has left the queue: queue the job again if it is its session's first chat
        now. The chat before it may have ended while that run finished, and the projector's enqueue then found the
        job still queued and did nothing (a scheduled chat that came due while a chat that overtook it ran)."""
        if self.queue is None:
            return
        try:
            state = await self.service.current(tenant, session_id)
        except NotFound:
            return
        await queue_if_first(self.queue, tenant, state, job_id)

    # -- context ------------------------------------------------------------------------
    async def _context(
        self, tenant: str, session_id: str, state: SessionState, requested: ChatRequested
    ) -> tuple[ContextPlan, list[Tool], Completion | None]:
        """The prompt, the tools, and the summary this job wrote (None: none)."""
        d = requested.data
        assert state.session is not None
        session = state.session
        compaction = session.compaction or Compaction()
        counter = self.counter_for(d.params.model)
        # The conversation as it stands now (a queued chat sees the answers of the chats before it), less the
        # messages of chats requested after this one (a chat that overtook a scheduled one sees that one's request).
        later: set[str] = set()
        for c in state.active_chats:
            if c.requested_at <= requested.version:
                continue
            [other] = await self.service.log.read(session_id, after=c.requested_at - 1, limit=1)
            if isinstance(other, ChatRequested):
                later.update(other.data.message_ids)
        saved = set(d.message_ids)
        reach = (
            session.token_budget
            if session.token_budget is not None and session.context_overflow == "truncate" and not d.params.compact
            else None
        )
        stored, dropped_range = await self._conversation(tenant, session_id, state, later, reach, counter)
        history = [(m.seq, _context_message(m)) for m in stored if m.id not in saved]
        own = [m for m in stored if m.id in saved]
        if len(own) < len(saved):  # overtaken: chats answered since its request, and the read did not reach it
            own = sorted(own + await self._own(tenant, session_id, state, requested, own), key=lambda m: m.seq)
        new = [_context_message(m) for m in own] + [
            ContextMessage(
                id=None,
                role=m.role,
                content=_plain(m.content),
                name=m.name,
                tool_call_id=m.tool_call_id,
                tool_calls=_plain(m.tool_calls),
            )
            for m in d.unsaved
        ]
        tools = _tools(session.tools, d.params.tools)
        tools_json = _encode(tools) if tools else None
        summary = state.summary

        def plan(summary: Summary | None, policy: Any = session.context_overflow) -> ContextPlan:
            return plan_context(
                situation=session.situation,
                summary=summary,
                history=history,
                new=new,
                tools_json=tools_json,
                budget=session.token_budget,
                max_tokens=d.params.max_tokens,
                policy=policy,
                counter=counter,
                summary_reserve=self.summary_reserve,
                threshold=compaction.threshold,
                keep_last=compaction.keep_last,
                compact=d.params.compact,
            )

        result = plan(summary)
        summarized: list[str] = []
        written = None
        if result.to_summarize:
            seq_of = {m.id: seq for seq, m in history}
            covered = [m for m in result.to_summarize if m.id in seq_of]
            model = compaction.model or d.params.model
            try:
                written = await self._summarize(summary, result.to_summarize, model, compaction.prompt)
            except CompactionFailed:
                if d.params.compact or compaction.on_failure == "fail":
                    raise
                log.warning("compaction failed; the prompt is truncated instead", extra={"fields": {"job": d.job_id}})
                result = plan(summary, "truncate")
            else:
                content = written.content or ""
                up_to = result.summary_up_to_seq or max(
                    (seq_of[m.id] for m in covered), default=summary.up_to_seq if summary else 0
                )
                summarized = [m.id for m in covered if m.id]
                added = AddSummary(
                    job_id=d.job_id, content=content, up_to_seq=up_to, summarized=summarized, model=written.model
                )
                await self._record(tenant, session_id, added)
                result = plan(Summary(content=content, up_to_seq=up_to))
                if result.to_summarize and not d.params.compact:
                    raise TokenBudgetExceeded("the conversation does not fit the token budget even after summarising")
        report = ContextReport(
            included=result.included,
            dropped=result.dropped,
            summarized=summarized,
            prompt_tokens=result.prompt_tokens,
            budget=result.budget,
            max_tokens=result.max_tokens,
            dropped_range=dropped_range,
        )
        await self._record(tenant, session_id, RecordContext(job_id=d.job_id, report=report))
        return result, tools, written

    async def _conversation(
        self,
        tenant: str,
        session_id: str,
        state: SessionState,
        later: set[str],
        reach: int | None,
        counter: TokenCounter,
    ) -> tuple[list[Message], tuple[int, int] | None]:
        """The stored conversation up to the request, less `later` (the messages of chats requested after this
        one), and the seq range left out unread.

        With a budget to `reach` (the `truncate` policy), it is read from the newest message backwards until the
        messages read cost more than the budget, plus a page of `FIRST_PAGE` so that no unit is cut short; each read
        is sized to what the budget has left, so a budget's worth costs the same on any session. Truncation drops
        the oldest units first, so nothing older can be in the prompt. The system messages before that are fetched
        alone (a prompt keeps them all), and the read stops at the summary too (the messages it covers stay out, but
        for system ones). So a chat costs O(budget), not O(session). Without a budget to reach, every message since
        the summary is read; in a state that does not know its system messages (`SessionState.system_seqs`), all."""
        shown = state.message_count - len(state.removed)
        if state.system_seqs is None:
            return [m for m in await self._messages(tenant, session_id, 0, shown) if m.id not in later], None
        summary_seq = state.summary.up_to_seq if state.summary is not None else 0
        first_shown = summary_seq - sum(1 for r in state.removed if r <= summary_seq)
        tail: list[Message] = []
        cost, over, start, size = 0, False, shown, FIRST_PAGE if reach is not None else PAGE
        while start > first_shown:
            end, start = start, max(first_shown, start - size)
            page = await self._messages(tenant, session_id, start, end)
            tail = page + tail
            if over:
                break
            if reach is not None:
                cost += sum(message_tokens(counter, _context_message(m)) for m in page if m.id not in later)
                over = cost > reach
                per_message = max(1.0, cost / len(tail))
                size = (
                    FIRST_PAGE if over else min(PAGE, max(FIRST_PAGE, math.ceil((reach - cost) / per_message * 1.25)))
                )
        oldest = tail[0].seq if tail else state.message_count + 1
        systems = sorted(s for s in state.system_seqs if s < oldest)
        older = [m for s in systems for m in await self._messages(tenant, session_id, *_offsets(s, state.removed))]
        conversation = [m for m in older + tail if m.id not in later]
        return conversation, (summary_seq + 1, oldest - 1) if start > first_shown else None

    async def _own(
        self, tenant: str, session_id: str, state: SessionState, requested: ChatRequested, found: list[Message]
    ) -> list[Message]:
        """The chat's saved messages (its request) that the conversation's read did not reach: a chat that chats
        asked for later overtook (it was scheduled) can find its request behind a budget's worth of their messages,
        or under a summary. They are the events right before its `ChatRequested`; each is read where it is shown."""
        missing = set(requested.data.message_ids) - {m.id for m in found}
        n = len(requested.data.message_ids)
        events = await self.service.log.read(session_id, after=requested.version - 1 - n, limit=n)
        seqs = [
            e.data.seq
            for e in events
            if isinstance(e, MessageAdded) and e.data.id in missing and e.data.seq not in state.removed
        ]
        if not seqs:
            return []
        spans = [_offsets(seq, state.removed) for seq in seqs]
        page = await self._messages(tenant, session_id, min(a for a, _ in spans), max(b for _, b in spans))
        return [m for m in page if m.id in missing]

    async def _messages(self, tenant: str, session_id: str, start: int, end: int) -> list[Message]:
        """The messages shown at offsets `start`..`end` (end exclusive), oldest first."""
        out: list[Message] = []
        offset = start
        while offset < end:
            limit = min(PAGE, end - offset)
            view = await self.service.read(
                session_id,
                functools.partial(self.service.views.messages, tenant, session_id, limit, offset),
                catch_up=True,
            )
            page = [_message_decoder.decode(raw) for raw in view.items or []]
            if not page:
                break
            out += page
            offset += len(page)
        return out

    async def _summarize(
        self, previous: Summary | None, messages: list[ContextMessage], model: str, prompt: str | None
    ) -> Completion:
        """The summary's completion (its text stripped); `CompactionFailed` if the model failed or wrote nothing."""
        lines = [f"Earlier summary: {previous.content}"] if previous else []
        lines += [f"{m.role}: {_text(m.content)}" for m in messages]
        request = ModelRequest(
            model=model,
            messages=[
                {"role": "system", "content": prompt or SUMMARY_INSTRUCTION},
                {"role": "user", "content": "\n".join(lines)},
            ],
            max_tokens=self.summary_reserve - 16,
        )
        final = None
        try:
            async for item in self.provider.stream(request):
                if isinstance(item, Completion):
                    final = item
        except ModelError as e:
            raise CompactionFailed(f"the summariser ({model}) failed: {e.message}") from e
        text = (final.content or "").strip() if final else ""
        if final is None or not text:
            raise CompactionFailed(f"the summariser ({model}) wrote nothing")
        return msgspec.structs.replace(final, content=text, tool_calls=None)

    # -- the answer --------------------------------------------------------------------
    async def _answer(
        self,
        session_id: str,
        job_id: str,
        requested: ChatRequested,
        plan: ContextPlan,
        tools: list[Tool],
        attempt: int,
    ) -> Completion:
        p = requested.data.params
        request = ModelRequest(
            model=p.model,
            messages=to_openai(plan.messages),
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            stop=p.stop,
            seed=p.seed,
            tools=msgspec.to_builtins(tools) if tools else None,
            tool_choice=p.tool_choice,
            response_format=p.response_format,
        )
        return await self._stream(session_id, job_id, request, attempt)

    async def _stream(self, session_id: str, job_id: str, request: ModelRequest, attempt: int) -> Completion:
        # A retried attempt resumes the stream: skip what an earlier attempt already sent, if the answer agrees.
        sent = streamed_text(await self.chats.streamed(session_id, job_id)) if attempt > 1 else ""
        produced = ""
        next_check = time.monotonic() + CANCEL_CHECK_S
        writer = self.chats.writer(session_id, job_id, attempt)
        async with contextlib.aclosing(self.provider.stream(request)) as items:  # closed early on cancel: the call ends
            async for item in items:
                if time.monotonic() >= next_check:
                    if await self.chats.status(session_id, job_id) == "cancelled":
                        raise Cancelled()
                    next_check = time.monotonic() + CANCEL_CHECK_S
                if isinstance(item, Completion):
                    finish = {"id": job_id, "choices": [{"index": 0, "delta": {}, "finish_reason": item.finish_reason}]}
                    writer.put(_encode(finish))
                    await writer.drain()
                    return item
                delta = item
                if item.content:
                    before, produced = produced, produced + item.content
                    if len(produced) <= len(sent) and sent.startswith(produced):
                        continue
                    if len(before) < len(sent) and produced.startswith(sent):
                        delta = Delta(content=produced[len(sent) :])
                writer.put(
                    _encode(
                        {
                            "id": job_id,
                            "choices": [{"index": 0, "delta": msgspec.to_builtins(delta), "finish_reason": None}],
                        }
                    )
                )
        await writer.drain()
        raise ModelError("model_error", "the model's stream ended without an answer")

    # -- recording ---------------------------------------------------------------------
    async def _record(self, tenant: str, session_id: str, command: Any) -> bool:
        """Append what the job decided; False when the job had already ended (a repeat run)."""
        appended: list[bool] = []

        def respond(_: SessionState, events: list[Event]) -> None:
            appended.append(bool(events))

        try:
            await self.service.execute(tenant, session_id, command, respond)
        except DomainError as e:
            log.info("chat %s: %s", getattr(command, "job_id", "?"), e.message)
            return False
        return bool(appended and appended[-1])

    async def fail(self, tenant: str, session_id: str, job_id: str, code: str, message: str) -> None:
        """End the job as failed (if it is still active) and tell whoever waits on its stream."""
        if await self._record(tenant, session_id, FailChat(job_id=job_id, code=code, message=message)):
            await self._ended(tenant, session_id, job_id, "error", _encode({"code": code, "message": message}))

    async def _ended(self, tenant: str, session_id: str, job_id: str, kind: str, data: bytes) -> None:
        """Give the chat's slot back and tell whoever waits, side by side (one round trip of latency, not two). The
        slot's one command is sent first; a client hears the answer only after it went through the relay and the
        API, so one that chats again at once finds its slot free."""
        give = self.limits.give(tenant, "chats", job_id) if self.limits is not None else asyncio.sleep(0)
        await asyncio.gather(give, self.chats.emit(session_id, job_id, kind, data))

    async def _ensure_terminal(self, tenant: str, session_id: str, job_id: str) -> None:
        """A run that finds its job ended makes sure the chunk stream says how (an earlier run may have died first)."""
        entries = await self.chats.streamed(session_id, job_id)
        if entries and entries[-1][1] in ENDS:
            return
        try:
            view = await self.service.read(session_id, lambda: self.chats.job(tenant, session_id, job_id))
        except DomainError:
            return
        job = msgspec.json.decode(view.body or b"{}")
        if job.get("response"):
            await self.chats.emit(session_id, job_id, "done", _encode(job["response"]))
        elif job.get("error"):
            await self.chats.emit(session_id, job_id, "error", _encode(job["error"]))


def _count_usage(plan: ContextPlan, completion: Completion, counter: TokenCounter) -> Usage:
    """Usage by our own count (the plan's prompt, the answer's text and calls), for providers that report none."""
    calls = "".join(c.function.name + c.function.arguments for c in completion.tool_calls or ())
    out = counter.count(completion.content or "") + (counter.count(calls) if calls else 0)
    return Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=out, total_tokens=plan.prompt_tokens + out)


def _tools(session_tools: list[Tool], request_tools: list[Tool] | None) -> list[Tool]:
    """The session's tools and the request's, the request's winning on a name clash."""
    by_name = {t.function.name: t for t in session_tools}
    by_name.update({t.function.name: t for t in request_tools or []})
    return list(by_name.values())


def _context_message(m: Message) -> ContextMessage:
    return ContextMessage(
        id=m.id,
        role=m.role,
        content=_plain(m.content),
        name=m.name,
        tool_call_id=m.tool_call_id,
        tool_calls=_plain(m.tool_calls),
    )


def _plain(value: Any) -> Any:
    return msgspec.to_builtins(value) if value is not None else None


def _text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return " ".join(p.get("text", "") for p in content if isinstance(p, dict))


def _offsets(seq: int, removed: frozenset[int]) -> tuple[int, int]:
    """The offsets (start, end) at which the message `seq` is shown: offsets skip removed messages."""
    at = seq - 1 - sum(1 for r in removed if r < seq)
    return at, at + 1
