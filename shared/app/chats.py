"""The chat use cases: request a chat (under the tenant's limits), cancel it, read its job, follow its answer.

A chat request is decided like any write (`RequestChat`: the multitask policy, the request's messages, the job);
the session's first active chat is queued at once, later ones when the projector sees the chat before them end.
The job itself runs in a worker (`shared.app.chat_run`); its answer reaches the waiting client through the job's
chunk stream (`follow_chunks`, `wait`).
"""

from __future__ import annotations

import builtins
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta

import msgspec

from shared.app.follow import follow
from shared.app.ports import ENDS, ChatJobs, ChatQueue, Limits, Wakeups
from shared.app.service import Idempotency, SessionService
from shared.domain.commands import Amendment, CancelChat, RequestChat, Tick
from shared.domain.errors import ChatTimeout, ChatUnanswered, QuotaExceeded, RateLimited
from shared.domain.events import ChatCancelled, ChatRequested, Event, MessageAdded
from shared.domain.ids import uuid7
from shared.domain.state import SessionState
from shared.domain.wire import ChatRequest, JobAccepted

__all__ = [
    "CHAT_SLOT_TTL_S",
    "Chats",
    "Requested",
    "StaleConversation",
    "queue_if_first",
    "streamed_text",
    "unanswered",
]

CHAT_SLOT_TTL_S = 900.0
"""A concurrent-chat slot is given back when the chat ends (by the projector); one whose holder vanished expires."""
_encode = msgspec.json.Encoder().encode


class Requested(msgspec.Struct, kw_only=True, frozen=True):
    """What a chat request recorded: the job, the chats it cancelled (policy `interrupt`), and the id of the last
    message it stored (None: none). Stored with an Idempotency-Key: a retry gets the same back."""

    job: JobAccepted
    cancelled: list[str] = []
    last_message_id: str | None = None
    state_version: int = 0
    """The session's version before the request's events (the one it was decided on)."""


async def queue_if_first(queue: ChatQueue, tenant: str, state: SessionState, job_id: str) -> None:
    """Queue the job, for its time, if it is the session's first active chat: the one that runs next (the others
    are queued by the projector when the chats before them end)."""
    if state.active_chats and state.active_chats[0].job_id == job_id:
        await queue.enqueue(tenant, state.id, [job_id], state.active_chats[0].run_at)


def streamed_text(entries: Sequence[tuple[str, str, bytes]]) -> str:
    """The answer's text as the chunk-stream entries so far carry it."""
    return "".join(
        (msgspec.json.decode(d).get("choices") or [{}])[0].get("delta", {}).get("content") or ""
        for _, kind, d in entries
        if kind == "chunk"
    )


class Chats:
    def __init__(
        self,
        service: SessionService,
        jobs: ChatJobs,
        queue: ChatQueue,
        limits: Limits,
        wakeups: Wakeups,
        default_model: str,
    ) -> None:
        self.service = service
        self.jobs = jobs
        self.queue = queue
        self.limits = limits
        self.wakeups = wakeups
        self.default_model = default_model
        self._tokens: dict[str, tuple[float, int]] = {}
        """tenant → (when read, tokens used today): the quota's cache."""

    # -- requesting -------------------------------------------------------------------------------
    async def request(
        self,
        tenant: str,
        sid: str,
        request: ChatRequest,
        idem: Idempotency | None = None,
        amend: tuple[Amendment, ...] = (),
        planned: int | None = None,
        tick: Tick | None = None,
        compact: bool = False,
    ) -> Requested:
        """Record the request's messages and its job, under the tenant's limits, then queue the job if it is the
        session's first active chat. `amend`: edits and removals recorded first, in the same append. `planned`:
        the session version the caller planned on (`StaleConversation` if it moved: plan again). `tick`: the
        schedule tick this chat runs (`TickTaken` if another took it). `compact`: a compaction job instead of a chat
        (`POST /sessions/{id}/compact`)."""
        if idem is not None and (replay := await self.service.replayed(tenant, sid, idem, Requested)) is not None:
            return replay  # a retry of a chat already requested: no new slot, nothing queued again
        job_id = uuid7()
        command = RequestChat(
            job_id=job_id, request=request, default_model=self.default_model, amend=amend, tick=tick, compact=compact
        )

        def requested(state: SessionState, events: list[Event]) -> Requested:
            before = state.version - len(events)
            if planned is not None and before != planned:
                raise StaleConversation()
            req = next(e for e in events if isinstance(e, ChatRequested))
            added = [e for e in events if isinstance(e, MessageAdded)]
            return Requested(
                job=JobAccepted(
                    id=req.data.job_id,
                    session_id=sid,
                    status="queued",
                    created_at=req.occurred_at,
                    run_at=req.data.params.run_at,
                ),
                cancelled=[e.data.job_id for e in events if isinstance(e, ChatCancelled)],
                last_message_id=added[-1].data.id if added else None,
                state_version=before,
            )

        async with self._admitted(tenant, job_id) as keep:
            done = await self.service.execute(tenant, sid, command, requested, idem, Requested)
            keep(done.job.id == job_id)
        if done.job.id != job_id:  # an Idempotency-Key replay: the first request did the rest
            return done
        for other in done.cancelled:
            await self.jobs.emit(
                sid, other, "error", _encode({"code": "cancelled", "message": f"interrupted by chat {job_id}"})
            )
        state = self.service.cache.get(tenant, sid)
        if state is not None:
            await queue_if_first(self.queue, tenant, state, job_id)
        return done

    async def compact(self, tenant: str, sid: str, idem: Idempotency | None = None) -> Requested:
        """Queue a compaction of the session's conversation (`POST /sessions/{id}/compact`): a job like a chat's,
        under the same limits, in the same order, whose answer is the summary."""
        return await self.request(tenant, sid, ChatRequest(save=False), idem, compact=True)

    async def _tokens_today(self, tenant: str, max_age_s: float = 1.0) -> int:
        """Prompt plus completion tokens the tenant used today (from the usage counters the projector keeps),
        cached in this process for `max_age_s`: a quota is checked on every chat request."""
        now = time.monotonic()
        hit = self._tokens.get(tenant)
        if hit is not None and now - hit[0] < max_age_s:
            return hit[1]
        [day] = await self.limits.usage(tenant, 1)
        tokens = day.prompt_tokens + day.completion_tokens
        self._tokens[tenant] = (now, tokens)
        return tokens

    @contextlib.asynccontextmanager
    async def _admitted(self, tenant: str, job_id: str) -> AsyncIterator[Callable[[bool], None]]:
        """Admit a chat under the tenant's limits: its chat tokens today (`QuotaExceeded`) and its concurrent chats
        (`RateLimited`), taking a slot for `job_id`. The body calls `keep(False)` when no new chat was recorded
        (an Idempotency-Key replay); the slot is then given back, as it is when the body raises."""
        own = await self.limits.limits(tenant)
        if own.chat_tokens_per_day:
            used = await self._tokens_today(tenant)
            if used >= own.chat_tokens_per_day:
                now = datetime.now(UTC)
                midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), UTC)
                raise QuotaExceeded(
                    f"this tenant used its {own.chat_tokens_per_day} chat tokens of today (UTC)",
                    {"limit": "chat_tokens_per_day", "max": own.chat_tokens_per_day, "used": used},
                    max(1, int((midnight - now).total_seconds())),
                )
        slot = await self.limits.take(tenant, "chats", job_id, CHAT_SLOT_TTL_S)
        if not slot.taken:
            raise RateLimited(
                f"this tenant has {slot.limit} chats queued or running; retry when one ends",
                {"limit": "concurrent_chats", "max": slot.limit},
            )
        kept = [True]
        try:
            yield lambda keep: kept.__setitem__(0, keep)
        except BaseException:
            kept[0] = False
            raise
        finally:
            if not kept[0]:
                await self.limits.give(tenant, "chats", job_id)

    async def cancel(self, tenant: str, sid: str, job_id: str) -> bytes:
        """Cancel a queued or running chat (`ChatNotActive` once it ended). What it had streamed so far is stored as
        its answer (unless the request had `save: false`): the conversation ends where the model was stopped.
        Answers the job's record."""
        await self.job(tenant, sid, job_id)  # NotFound for unknown jobs and other tenants
        partial = None
        state = await self.service.log.load(tenant, sid)
        active = state.active(job_id) if state is not None else None
        if active is not None:
            [requested] = await self.service.log.read(sid, after=active.requested_at - 1, limit=1)
            if isinstance(requested, ChatRequested) and requested.data.params.save:
                partial = streamed_text(await self.jobs.streamed(sid, job_id)) or None
        await self.service.execute(tenant, sid, CancelChat(job_id=job_id, partial=partial), lambda s, e: None)
        await self.jobs.emit(sid, job_id, "error", b'{"code":"cancelled","message":"cancelled by the client"}')
        return await self.job(tenant, sid, job_id)

    # -- reading ----------------------------------------------------------------------------------
    async def job(self, tenant: str, sid: str, job_id: str) -> bytes:
        view = await self.service.read(sid, lambda: self.jobs.job(tenant, sid, job_id))
        assert view.body is not None
        return view.body

    async def list(self, tenant: str, sid: str, limit: int, offset: int) -> list[bytes]:
        """The session's jobs, newest first (JSON)."""
        view = await self.service.read(sid, lambda: self.jobs.jobs(tenant, sid, limit, offset))
        return view.items or []

    def follow_chunks(
        self, sid: str, job_id: str, after: str = "0-0", keepalive_s: float = 15.0, deadline: float | None = None
    ) -> AsyncGenerator[builtins.list[tuple[str, str, bytes]], None]:
        """The job's chunk stream after `after`, batch by batch as the worker writes it (`shared.app.follow`)."""
        cursor = after

        async def fetch() -> builtins.list[tuple[str, str, bytes]]:
            nonlocal cursor
            entries = await self.jobs.chunks(sid, job_id, cursor)
            if entries:
                cursor = entries[-1][0]
            return entries

        return follow(self.wakeups, "chunks", job_id, sid, fetch, keepalive_s, deadline)

    async def wait(self, sid: str, job_id: str, wait_s: float) -> bytes:
        """The job's answer (its `done` entry), waiting at most `wait_s` (`ChatTimeout`); `ChatUnanswered` if it
        ended otherwise. Woken only by the stream's last entry, and reads that one: the chunks before it are the
        streaming clients' (a model streaming a long answer would otherwise wake this, and a read, per batch)."""

        async def fetch() -> builtins.list[tuple[str, str, bytes]]:
            last = await self.jobs.last_entry(sid, job_id)
            return [last] if last is not None and last[1] in ENDS else []

        deadline = time.monotonic() + wait_s
        async with contextlib.aclosing(follow(self.wakeups, "end", job_id, sid, fetch, wait_s, deadline)) as batches:
            async for batch in batches:
                for _, kind, data in batch:
                    if kind == "done":
                        return data
                    if kind == "error":
                        raise unanswered(data)
        raise ChatTimeout(
            f"chat {job_id} did not finish within {wait_s:g} s; it goes on: GET /sessions/{sid}/chats/{job_id}",
            {"job_id": job_id},
        )

    async def was_last(self, sid: str, job_id: str, entry_id: str) -> bool:
        """`entry_id` is the job's last event (its answer or its error): a client resuming after it saw the end."""
        return await self.jobs.is_terminal(sid, job_id, entry_id)

    async def past_the_end(self, sid: str, job_id: str, after: str) -> bool:
        """The job ended and `after` (an event id of its stream) lies beyond its last event: nothing can follow."""
        last = await self.jobs.last_entry(sid, job_id)
        return last is not None and last[1] in ENDS and _id_key(after) > _id_key(last[0])


class StaleConversation(Exception):
    """The session moved since the caller planned its request: plan again."""


def unanswered(data: bytes) -> ChatUnanswered:
    err = msgspec.json.decode(data)
    return ChatUnanswered(err["code"], err["message"])


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.removesuffix(".1").split("-")
    return int(ms), int(seq)
