"""The log's administration in memory (the `LogAdmin` port): enumerate, rebuild generations, purge, audit.

`switch` makes a rebuilt generation live only when it and the live one both hold every event (else 0: build on),
answers -1 for a purged session and 2 when a generation at least as new is live already. `purge` checks the tenant
and the expected version (`PurgeConflict`), erases the head, the log, every generation, the chat jobs and their
chunks and the idempotency records, counts the unprojected events as projected, and records the tombstone: one
step, like the Redis PURGE script.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import UTC, datetime

from shared.adapters.codec import decode_event, decode_state, event_json, json_encode
from shared.adapters.memory.store import Memory, Stream
from shared.app.ports import PurgeConflict
from shared.domain.events import Event, SessionPurged
from shared.domain.state import SessionState

__all__ = ["MemoryLogAdmin"]


class MemoryLogAdmin:
    def __init__(self, memory: Memory) -> None:
        self.memory = memory

    # -- enumeration ----------------------------------------------------------------------------------------------
    async def tenants(self) -> list[str]:
        return sorted({tenant for (_, tenant) in self.memory.written})

    async def session_ids(self, tenant: str) -> list[str]:
        m = self.memory
        return sorted(sid for p in range(m.partitions) for sid in m.registry.get((p, tenant), ()))

    async def head(self, session_id: str) -> tuple[int, str | None, int]:
        head = self.memory.heads.get(session_id)
        return (head.version, head.tenant, head.gen) if head is not None else (0, None, 0)

    async def heads(self, session_ids: Sequence[str]) -> list[int]:
        return [h.version if (h := self.memory.heads.get(sid)) else 0 for sid in session_ids]

    async def log_json(self, session_id: str, after: int, count: int) -> list[tuple[int, bytes]]:
        return [(v, event_json(v, f)) for v, f in self.memory.entries(session_id, after, count)]

    async def read_logs(self, after: dict[str, int], count: int) -> dict[str, list[Event]]:
        m = self.memory
        return {sid: [decode_event(v, f) for v, f in m.entries(sid, a, count)] for sid, a in after.items()}

    async def generation_states(self, gens: dict[str, int]) -> dict[str, tuple[str, SessionState]]:
        out: dict[str, tuple[str, SessionState]] = {}
        for sid, gen in gens.items():
            head = self.memory.heads.get(sid)
            if head is None:
                continue  # purged meanwhile
            g = self.memory.peek_generation(sid, gen)
            raw = g.view.state if g is not None else None
            out[sid] = (head.tenant, decode_state(raw) if raw is not None else SessionState(id=sid))
        return out

    async def progress(self, scope: str) -> str | None:
        record = self.memory.rebuilds.get(scope)
        if record is None:
            return None
        return record.get("cursor", "")

    async def set_progress(self, scope: str, cursor: str | None) -> None:
        if cursor is None:
            self.memory.rebuilds.pop(scope, None)
        elif cursor == "":
            self.memory.rebuilds.setdefault(scope, {}).setdefault("started", datetime.now(UTC).isoformat())
        else:
            self.memory.rebuilds.setdefault(scope, {})["cursor"] = cursor

    # -- rebuild --------------------------------------------------------------------------------------------------
    async def generations(self, session_ids: Sequence[str]) -> list[int]:
        return [h.gen if (h := self.memory.heads.get(sid)) else 0 for sid in session_ids]

    async def switch(self, targets: Sequence[tuple[str, str, int]]) -> list[int]:
        return [self._switch(tenant, sid, gen) for tenant, sid, gen in targets]

    def _switch(self, tenant: str, sid: str, new: int) -> int:
        m = self.memory
        head = m.heads.get(sid)
        if head is None:
            return -1
        old = head.gen
        if new <= old:
            return 2
        fresh, live = m.peek_generation(sid, new), m.peek_generation(sid, old)
        if fresh is None or fresh.view.version != head.version or (live.view.version if live else 0) != head.version:
            return 0
        head.gen = new
        index = m.index.setdefault((m.partition(sid), tenant), set())
        if fresh.view.session is not None:
            index.add(sid)
        else:
            index.discard(sid)
        m.index_search(tenant, sid, fresh.view.search)
        m.drop_generation(sid, old)
        return 1

    async def drop(self, session_id: str, gen: int) -> None:
        self.memory.drop_generation(session_id, gen)

    # -- erasure --------------------------------------------------------------------------------------------------
    async def readers(self, session_id: str) -> list[str]:
        return sorted(self.memory.readers.get(session_id, ()))

    async def purge(
        self, tenant: str, session_id: str, expected: int, tombstone: SessionPurged, forked_from: str | None = None
    ) -> bool:
        m = self.memory
        head = m.head_of(tenant, session_id)
        if head is None:
            return False
        if head.version != expected:
            raise PurgeConflict(f"session {session_id} is at version {head.version}, not {expected}")
        if m.readers.get(session_id):
            raise PurgeConflict(f"session {session_id} has forks reading its log")
        if head.fork is not None:
            m.readers.get(head.fork[0], set()).discard(session_id)
        m.readers.pop(session_id, None)
        if forked_from is not None and session_id in m.forks.get(forked_from, ()):
            m.forks[forked_from].remove(session_id)
        p = m.partition(session_id)
        live = m.peek_generation(session_id, head.gen)
        seen = live.view.version if live is not None else 0
        m.projected[(p, tenant)] = m.projected.get((p, tenant), 0) + head.version - seen
        for gen in (head.gen, head.gen + 1):  # the live generation, and one a killed rebuild may have left
            m.drop_generation(session_id, gen)
        for job_id in m.job_ids.pop(session_id, set()):
            m.jobs.pop((session_id, job_id))
            m.chunks.pop((session_id, job_id))
        for record in m.idempotency_of.pop(session_id, set()):
            m.idempotency.pop(record)
        del m.heads[session_id]
        m.logs.pop(session_id, None)
        m.index.get((p, tenant), set()).discard(session_id)
        m.index_search(tenant, session_id, ())
        m.registry.get((p, tenant), set()).discard(session_id)
        at = json_encode(tombstone.occurred_at)[1:-1]
        fields = {b"t": b"SessionPurged", b"i": tombstone.id.encode(), b"a": at, b"d": json_encode(tombstone.data)}
        m.audit.setdefault((p, tenant), Stream()).add(fields, m.clock())
        m.wake(session_id)
        return True

    async def audit(self, tenant: str, after: str | None, limit: int) -> tuple[list[bytes], str | None]:
        """The tenant's tombstones, oldest first, merged over partitions; the cursor is (entry id, partition)."""
        m = self.memory
        since, at = _decode_cursor(after) if after else ((0, 0), -1)
        merged = []
        for p in range(m.partitions):
            stream = m.audit.get((p, tenant))
            for eid, fields in stream.entries if stream else ():
                if after is None or eid > since or (eid == since and p > at):
                    merged.append((eid, p, fields))
        merged.sort(key=lambda x: (x[0], x[1]))
        page, more = merged[:limit], len(merged) > limit
        items = [
            b'{"type":"SessionPurged","id":"%s","occurred_at":"%s","data":%s}' % (f[b"i"], f[b"a"], f[b"d"])
            for _, _, f in page
        ]
        return items, (_encode_cursor(page[-1][0], page[-1][1]) if more and page else None)

    async def rewrite_persistence(self) -> list[str]:
        """Nothing of memory is on disk: nothing to rewrite."""
        return []


def _encode_cursor(entry: tuple[int, int], partition: int) -> str:
    return base64.urlsafe_b64encode(f"{entry[0]}-{entry[1]}-{partition}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[tuple[int, int], int]:
    """Raises ValueError on anything that is not one of our cursors."""
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    ms, seq, partition = (int(x) for x in raw.split("-"))
    if min(ms, seq, partition) < 0 or ms >= 2**64 or seq >= 2**64:
        raise ValueError(cursor)
    return (ms, seq), partition
