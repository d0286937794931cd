"""Projection as a use case: bring sessions' read models up to their logs' heads.

The projector's loop (`services/worker/projector.py`) runs it for the sessions its feed names; a read that waited too
long runs it for the one session it reads (`SessionService._fresh`); `parley rebuild` runs it on the live generation
before each switch. All three share this code, so they agree by construction, and APPLY's version check lets them
race harmlessly.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence

from shared.app.ports import ChatQueue, Feed, FeedEntry, Limits, ReadModels
from shared.domain.projection import ReadModelUpdate, project
from shared.supervise import is_transient

__all__ = ["Projection"]

log = logging.getLogger("parley.projector")

HOOKS_AT_ONCE = 32
"""Chat hooks (enqueues, slots given back) a projector runs side by side."""


class Projection:
    def __init__(
        self, views: ReadModels, feed: Feed, queue: ChatQueue | None = None, limits: Limits | None = None
    ) -> None:
        """`queue`: queue a session's next chat when chat events are projected; `limits`: give back the
        concurrent-chat slots of chats that ended."""
        self.views = views
        self.feed = feed
        self.queue = queue
        self.limits = limits
        self.applied = 0

    async def handle(self, entries: Sequence[FeedEntry]) -> None:
        """Project the sessions these feed entries name, then acknowledge the entries."""
        if not entries:
            return
        await self.catch_up({e.session_id for e in entries})
        await self.feed.ack(entries)

    async def catch_up_partitions(self, partitions: Iterable[int]) -> None:
        """Bring every session a partition's feed still names up to its head (a reader's help)."""
        for p in partitions:
            await self.catch_up(await self.feed.backlog(p))

    async def catch_up(self, session_ids: Iterable[str]) -> None:
        """Bring each session's read model to its log's head."""
        todo = sorted(set(session_ids))
        while todo:
            pending = await self.views.pending(todo)
            updates, heads = [], []
            for p in pending:
                if p is not None and p.events:
                    try:
                        updates.append((p.tenant, project(p.state, p.events)))
                    except Exception:
                        log.exception("cannot project session %s; it stays behind until fixed", p.state.id)
                        continue
                    heads.append(p.head)
            results = await self._apply(updates)
            todo, applied = [], []
            for (tenant, u), head, ok in zip(updates, heads, results):
                if ok:
                    self.applied += u.event_count
                    applied.append((tenant, u))
                if ok is False or (ok and u.to_version < head):
                    todo.append(u.session_id)
            await self._after(applied)

    async def _apply(self, updates: list[tuple[str, ReadModelUpdate]]) -> list[bool | None]:
        """Apply them together; if that fails for a reason other than the store's, one by one, so one session the
        store refuses (None: skipped, logged) does not stop the others."""
        try:
            return list(await self.views.apply(updates))
        except Exception as e:
            if is_transient(e):
                raise
        out: list[bool | None] = []
        for update in updates:
            try:
                out += await self.views.apply([update])
            except Exception as e:
                if is_transient(e):
                    raise
                log.exception(
                    "cannot store session %s's read models; it stays behind until fixed", update[1].session_id
                )
                out.append(None)
        return out

    async def _after(self, applied: list[tuple[str, ReadModelUpdate]]) -> None:
        """The chat hooks of a batch: a session's next chat is queued when one was requested or ended; ended chats
        give their concurrent-chat slots back (one call per tenant). `HOOKS_AT_ONCE` at a time, not one round trip
        after another, nor a batch's worth of connections at once (the chat jobs share the pool)."""
        calls: list[Callable[[], Awaitable[None]]] = []
        ended: dict[str, list[str]] = {}
        for tenant, u in applied:
            if self.queue is not None and u.state.active_chats and any(j.status is not None for j in u.jobs):
                first = u.state.active_chats[0]
                calls.append(functools.partial(self.queue.enqueue, tenant, u.session_id, [first.job_id], first.run_at))
            ended.setdefault(tenant, []).extend(j.job_id for j in u.jobs if j.ended)
        if self.limits is not None:
            give = self.limits.give
            calls += [functools.partial(give, tenant, "chats", *jobs) for tenant, jobs in ended.items() if jobs]
        for i in range(0, len(calls), HOOKS_AT_ONCE):
            await asyncio.gather(*(call() for call in calls[i : i + HOOKS_AT_ONCE]))
