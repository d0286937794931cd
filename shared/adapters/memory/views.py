"""The read models in memory (the `ReadModels` port), with the Redis APPLY's fences.

`apply` writes an update only if the session still has a head (a purge is final) and its view is exactly at the
update's `from_version`; a rebuild's generation only if it is newer than the live one, and then only its views.
The live write moves the tenant's index, its `projected` counter, the chat job records and the usage counters
in the same step, so a read never sees half an update. Reads answer the head beside the view's version, which is
how the service layer reads its own writes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgspec

from shared.adapters.codec import encode_state, json_encode, member, split_member, upcast
from shared.adapters.memory.log import tail
from shared.adapters.memory.store import Generation, Memory
from shared.app.ports import DueSession, Freshness, Idle, IdleCursor, Pending, View
from shared.domain.projection import JobUpdate, ReadModelUpdate
from shared.domain.retention import keep, shown_from
from shared.domain.search import Position, Query, matches, search_times
from shared.domain.wire import Session, TenantLimits, ToolList

__all__ = ["USAGE_TTL_S", "MemoryReadModels"]

USAGE_TTL_S = 40 * 86_400
"""Usage counters (per tenant and day) are kept this long, as in Redis."""
_ENDED = ("succeeded", "failed", "cancelled")
_session = msgspec.json.Decoder(Session)


class MemoryReadModels:
    def __init__(self, memory: Memory, chat_retention_s: int = 7 * 86_400, outbox_maxlen: int = 10_000) -> None:
        self.memory = memory
        self.chat_retention_s = chat_retention_s
        self.outbox_maxlen = outbox_maxlen

    # -- reads ---------------------------------------------------------------------------------------------------
    async def session(self, tenant: str, session_id: str) -> View:
        return self._view_field(tenant, session_id, "session")

    async def tools(self, tenant: str, session_id: str) -> View:
        return self._view_field(tenant, session_id, "tools")

    def _view_field(self, tenant: str, session_id: str, name: str) -> View:
        head = self.memory.head_of(tenant, session_id)
        if head is None:
            return View(0, 0, None)
        g = self.memory.peek_generation(session_id, head.gen)
        if g is None:
            return View(head.version, 0, None)
        body = getattr(g.view, name) if g.view.session is not None else None
        return View(head.version, g.view.version, body)

    async def messages(
        self,
        tenant: str,
        session_id: str,
        limit: int,
        offset: int,
        count: int | None = None,
        at: int | None = None,
        keep_messages: int | None = None,
    ) -> View:
        m = self.memory
        head = m.head_of(tenant, session_id)
        if head is None:
            return View(0, 0, None, [])
        g = m.peek_generation(session_id, head.gen) or Generation()
        version = g.view.version
        if g.view.session is None and count is None:
            return View(head.version, version, None, [])
        total = len(g.messages) if count is None else count
        upto = math.inf if at is None else at
        last: dict[int, tuple[str, int]] = {}
        removals = False
        for seq, mods in g.mods.items():
            for v, kind in mods:
                if v <= upto:
                    last[seq] = (kind, v)
                    removals = removals or kind == "r"
        if count is None and keep_messages is not None:  # the messages a retention hides come first: skip them
            assert g.view.session is not None
            session = _session.decode(g.view.session)
            tenant_keep = TenantLimits(retention_keep_messages=keep_messages)
            removed = sum(1 for seq, (kind, _) in last.items() if kind == "r" and seq <= total)
            offset += shown_from(total - removed, keep(session, tenant_keep))
        page: list[tuple[int, int]] = []  # (seq, version of its MessageAdded)
        if not removals:  # positions are the messages shown: read the page alone
            stop = min(offset + limit, total)
            page = [(offset + j + 1, v) for j, v in enumerate(g.messages[offset:stop])]
        else:  # skip the removed ones
            shown = 0
            for j, v in enumerate(g.messages[:total], 1):
                mod = last.get(j)
                if not (mod and mod[0] == "r"):
                    shown += 1
                    if shown > offset:
                        page.append((j, v))
                    if len(page) == limit:
                        break
        items = []
        for seq, v in page:
            mod = last.get(seq)
            [(_, fields)] = m.entries(session_id, (mod[1] if mod and mod[0] == "e" else v) - 1, 1)
            items.append(upcast(b"MessageAdded", int(fields[b"s"]), fields[b"d"]))
        return View(head.version, version, b"live", items)

    async def sessions(self, tenant: str, limit: int, offset: int) -> tuple[Freshness, list[bytes]]:
        m = self.memory
        fresh = self._freshness(tenant)
        ids = sorted((sid for p in range(m.partitions) for sid in m.index.get((p, tenant), ())), reverse=True)
        out = []
        for sid in ids[offset : offset + limit]:
            view = self._view_field(tenant, sid, "session")
            if view.body is not None:
                out.append(view.body)
        return fresh, out

    async def find(
        self, tenant: str, query: Query, after: Position | None, limit: int
    ) -> tuple[Freshness, list[bytes], Position | None]:
        fresh, found = self._search(tenant, query)
        if after is not None:
            found = [at for at in found if (at < after if query.descending else at > after)]
        page = found[:limit]
        out = []
        for at in page:
            view = self._view_field(tenant, at.session_id, "session")
            if view.body is not None:
                out.append(view.body)
        return fresh, out, page[-1] if len(found) > limit else None

    async def count(self, tenant: str, query: Query) -> tuple[Freshness, int, bool]:
        fresh, found = self._search(tenant, query)
        return fresh, len(found), True

    def _freshness(self, tenant: str) -> Freshness:
        m = self.memory
        parts = range(m.partitions)
        return Freshness(
            tuple(m.written.get((p, tenant), 0) for p in parts), tuple(m.projected.get((p, tenant), 0) for p in parts)
        )

    def _search(self, tenant: str, query: Query) -> tuple[Freshness, list[Position]]:
        """Every match in walk order (the memory adapter has no budget: its pages are always full)."""
        m = self.memory
        fresh = self._freshness(tenant)
        found = []
        for p in range(m.partitions):
            for sid, members in m.search.get((p, tenant), {}).items():
                if matches(members, sid, query):
                    found.append(Position(search_times(members, sid)[query.order], sid))
        return fresh, sorted(found, reverse=query.descending)

    # -- the projector's side ---------------------------------------------------------------------------------------
    async def pending(self, session_ids: Sequence[str], gen: int | None = None) -> list[Pending | None]:
        return [tail(self.memory, sid, None, gen) for sid in session_ids]

    async def idle(self, partition: int, until_ms: int, after: IdleCursor | None, limit: int) -> list[Idle]:
        entries = sorted((ms, m) for m, ms in self.memory.idle.get(partition, {}).items() if ms <= until_ms)
        if after is not None:
            cursor = (after.changed_ms, member(after.tenant, after.session_id))
            entries = [e for e in entries if e > cursor]
        out = []
        for ms, m in entries[:limit]:
            tenant, sid = split_member(m)
            out.append(Idle(ms, tenant, sid))
        return out

    async def forget_idle(self, partition: int, tenant: str, session_id: str) -> None:
        self.memory.idle.get(partition, {}).pop(member(tenant, session_id), None)

    async def trim(self, tenant: str, session_id: str, keep_messages: int, budget: int, dry_run: bool) -> int:
        m = self.memory
        head = m.head_of(tenant, session_id)
        g = m.peek_generation(session_id, head.gen) if head is not None else None
        if g is None or g.view.session is None:
            return 0
        kept = keep(_session.decode(g.view.session), TenantLimits(retention_keep_messages=keep_messages))
        if kept is None:
            return 0
        cut = min(len(g.messages) - kept, g.view.trimmed + budget)
        freed = max(0, cut - g.view.trimmed)
        if not dry_run and freed:
            g.view.trimmed = cut
        return freed

    async def forks(self, parent_id: str) -> list[str]:
        return list(self.memory.forks.get(parent_id, []))

    async def due(self, partition: int, until_ms: int, limit: int) -> list[DueSession]:
        ticks = self.memory.next_ticks.get(partition, {})
        entries = sorted((ms, m) for m, ms in ticks.items() if ms <= until_ms)
        return [DueSession(ms, *split_member(m)) for ms, m in entries[:limit]]

    async def forget_due(self, partition: int, tenant: str, session_id: str) -> None:
        self.memory.next_ticks.get(partition, {}).pop(member(tenant, session_id), None)

    async def apply(self, updates: Sequence[tuple[str, ReadModelUpdate]], gen: int | None = None) -> list[bool]:
        encoded = [(tenant, u, _encoded(u)) for tenant, u in updates]  # encode all first, as a pipeline would
        return [
            self._apply(tenant, u, session, tools, state, snapshots, gen)
            for tenant, u, (session, tools, state, snapshots) in encoded
        ]

    def _apply(
        self,
        tenant: str,
        u: ReadModelUpdate,
        session: bytes | None,
        tools: bytes | None,
        state: bytes,
        snapshots: list[tuple[int, bytes]],
        gen: int | None,
    ) -> bool:
        m = self.memory
        sid = u.session_id
        head = m.heads.get(sid)
        if head is None:
            return False  # purged meanwhile: nothing may bring its content back
        live = gen is None
        if gen is not None and gen <= head.gen:
            return False  # a rebuild writes only a generation newer than the live one
        g = m.generation(sid, head.gen if gen is None else gen)
        if g.view.version != u.from_version:
            return False
        g.messages.extend(u.message_versions)
        for seq, version, kind in u.message_mods:
            g.mods.setdefault(seq, []).append((version, kind))
        g.snapshots.update(snapshots)
        if session is None:
            g.view.session = g.view.tools = None
        else:
            g.view.session = session
            if tools is not None:
                g.view.tools = tools
        g.view.version, g.view.tenant, g.view.state = u.to_version, tenant, state
        g.view.search = tuple(u.search)
        if not live:
            return True
        m.index_search(tenant, sid, g.view.search)
        p = m.partition(sid)
        if u.index == "add":
            m.index.setdefault((p, tenant), set()).add(sid)
        elif u.index == "remove":
            m.index.get((p, tenant), set()).discard(sid)
        idle = m.idle.setdefault(p, {})
        if u.session is not None:
            idle[member(tenant, sid)] = int(u.session.updated_at.timestamp() * 1000)
        else:
            idle.pop(member(tenant, sid), None)
        if u.forked_from is not None:
            m.forks.setdefault(u.forked_from, []).append(sid)
        if u.schedules_changed:
            ticks = m.next_ticks.setdefault(p, {})
            if u.next_tick_ms is not None:
                ticks[member(tenant, sid)] = u.next_tick_ms
            else:
                ticks.pop(member(tenant, sid), None)
        m.projected[(p, tenant)] = m.projected.get((p, tenant), 0) + u.to_version - u.from_version
        for job in u.jobs:
            self._job(sid, job)
        for d in u.usage:
            key = (p, tenant, d.day)
            counters = m.usage.get(key) or {"chats": 0, "prompt_tokens": 0, "completion_tokens": 0}
            counters["chats"] += d.chats
            counters["prompt_tokens"] += d.prompt_tokens
            counters["completion_tokens"] += d.completion_tokens
            m.usage.set(key, counters)
            m.usage.expire(key, USAGE_TTL_S)
        if u.outbox:
            outbox = m.outbox[p]
            for version, kind, event_id in u.outbox:
                outbox.add((tenant, sid, version, kind, event_id), m.clock())
            if len(outbox.entries) > self.outbox_maxlen:
                outbox.entries = outbox.entries[-self.outbox_maxlen :]
        return True

    def _job(self, sid: str, job: JobUpdate) -> None:
        m = self.memory
        m.job_ids.setdefault(sid, set()).add(job.job_id)
        key = (sid, job.job_id)
        record = m.jobs.get(key)
        fields = job_fields(job)
        if record is None:
            record = {}
            m.jobs.set(key, record)
        elif (
            fields.get("status") == "queued" and "status" in record
        ):  # a worker may already have marked the job running
            del fields["status"]
        record.update(fields)
        if record.get("status") in _ENDED:
            m.jobs.expire(key, self.chat_retention_s)


def job_fields(job: JobUpdate) -> dict[str, Any]:
    """A job update's fields as plain values (what the Redis hash holds, decoded)."""
    raw = msgspec.to_builtins(job)
    assert isinstance(raw, dict)
    raw.pop("job_id", None)
    return {k: v for k, v in raw.items() if v is not None}


def _encoded(u: ReadModelUpdate) -> tuple[bytes | None, bytes | None, bytes, list[tuple[int, bytes]]]:
    session = json_encode(u.session) if u.session is not None else None
    tools = json_encode(ToolList(u.session.tools)) if u.session is not None and u.tools_changed else None
    return session, tools, encode_state(u.state), [(s.version, encode_state(s)) for s in u.snapshots]
