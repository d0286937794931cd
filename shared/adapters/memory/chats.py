"""Chat jobs in memory (the `ChatJobs` and `ChunkWriter` ports): their records and their chunk streams.

Records are written by the read models' `apply` (from the chat events) and by `mark_running`, which never
restarts an ended job; a job is found only through its own session, and not once the session is deleted. Chunk
streams number their entries as Redis streams do (`ms-seq`, increasing), refuse writes once the session is purged
(a late worker must not bring its text back), expire `retention_s` after their last write, and wake whoever waits
on the job.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from shared.adapters.codec import json_encode
from shared.adapters.memory.store import Memory, Stream, entry_text, parse_entry_id
from shared.app.ports import ENDS, Superseded, View
from shared.domain.wire import ChatJob

__all__ = ["MemoryChatJobs", "MemoryChunkWriter", "job_json"]

_ENDED = ("succeeded", "failed", "cancelled")
BATCH = 500
"""Entries `chunks` answers at most, as in Redis."""


def job_json(job_id: str, session_id: str, record: dict[str, Any]) -> bytes:
    """The `ChatJob` resource from its record, validated against the wire type."""
    return json_encode(msgspec.convert({"id": job_id, "session_id": session_id, **record}, ChatJob))


class MemoryChatJobs:
    def __init__(self, memory: Memory, retention_s: int = 7 * 86_400) -> None:
        self.memory = memory
        self.retention_s = retention_s

    async def job(self, tenant: str, session_id: str, job_id: str) -> View:
        m = self.memory
        head = m.head_of(tenant, session_id)
        if head is None:
            return View(0, 0, None)
        g = m.peek_generation(session_id, head.gen)
        version = g.view.version if g is not None else 0
        live = g is not None and g.view.session is not None
        record = m.jobs.get((session_id, job_id)) if live and job_id in m.job_ids.get(session_id, ()) else None
        return View(head.version, version, job_json(job_id, session_id, record) if record else None)

    async def jobs(self, tenant: str, session_id: str, limit: int, offset: int) -> View:
        m = self.memory
        head = m.head_of(tenant, session_id)
        if head is None:
            return View(0, 0, None)
        g = m.peek_generation(session_id, head.gen)
        version = g.view.version if g is not None else 0
        if g is None or g.view.session is None:  # deleted: its jobs went with it
            return View(head.version, version, None)
        ids = sorted(m.job_ids.get(session_id, ()), reverse=True)[offset : offset + limit]
        items = [job_json(j, session_id, r) for j in ids if (r := m.jobs.get((session_id, j)))]
        return View(head.version, version, b"live", items)

    async def mark_running(self, session_id: str, job_id: str) -> int:
        m = self.memory
        if session_id not in m.heads:
            return 0
        m.job_ids.setdefault(session_id, set()).add(job_id)  # so a purge finds it, listed or not
        record = m.jobs.get((session_id, job_id))
        if record is None:
            record = {}
            m.jobs.set((session_id, job_id), record)
        if record.get("status") in _ENDED:
            return 0
        record["status"] = "running"
        record["started_at"] = msgspec.to_builtins(datetime.now(UTC))
        record["attempts"] = int(record.get("attempts", 0)) + 1
        return int(record["attempts"])

    async def status(self, session_id: str, job_id: str) -> str | None:
        record = self.memory.jobs.get((session_id, job_id))
        status = record.get("status") if record else None
        return str(status) if status is not None else None

    # -- chunk streams ----------------------------------------------------------------------------------------
    async def emit(self, session_id: str, job_id: str, kind: str, data: bytes) -> bytes | None:
        return self.write(session_id, job_id, [(kind, data)])

    def write(self, session_id: str, job_id: str, entries: list[tuple[str, bytes]]) -> bytes | None:
        """Append the entries at once; the last one's id, or None if the session is gone."""
        m = self.memory
        if session_id not in m.heads:
            return None
        key = (session_id, job_id)
        stream = m.chunks.get(key)
        if stream is None:
            stream = Stream()
            m.chunks.set(key, stream)
        eid = (0, 0)
        for kind, data in entries:
            eid = stream.add((kind, bytes(data)), m.clock())
        m.chunks.expire(key, self.retention_s)
        m.wake(job_id, ended=bool(entries) and entries[-1][0] in ENDS)
        return entry_text(eid).encode()

    def writer(self, session_id: str, job_id: str, attempt: int) -> MemoryChunkWriter:
        return MemoryChunkWriter(self, session_id, job_id, attempt)

    def current(self, session_id: str, job_id: str, attempt: int) -> bool:
        """No later attempt than `attempt` has started, and the job's stream has not ended (a delete or a cancel
        wrote its end while the model still streamed: the end stays the last entry)."""
        record = self.memory.jobs.get((session_id, job_id))
        stream = self.memory.chunks.get((session_id, job_id))
        if stream and stream.entries and stream.entries[-1][1][0] in ENDS:
            return False
        return int((record or {}).get("attempts", 0)) <= attempt

    async def chunks(self, session_id: str, job_id: str, after: str) -> list[tuple[str, str, bytes]]:
        start = parse_entry_id(after)
        if start is None:
            raise ValueError(f"{after!r} is not a stream entry id")
        stream = self.memory.chunks.get((session_id, job_id))
        return [(entry_text(i), k, d) for i, (k, d) in stream.after(start, BATCH)] if stream else []

    async def is_terminal(self, session_id: str, job_id: str, entry_id: str) -> bool:
        eid = parse_entry_id(entry_id)
        stream = self.memory.chunks.get((session_id, job_id))
        entry = stream.get(eid) if stream is not None and eid is not None else None
        return entry is not None and entry[0] in ENDS

    async def last_entry(self, session_id: str, job_id: str) -> tuple[str, str, bytes] | None:
        stream = self.memory.chunks.get((session_id, job_id))
        if not stream or not stream.entries:
            return None
        eid, (kind, data) = stream.entries[-1]
        return entry_text(eid), kind, data

    async def streamed(self, session_id: str, job_id: str) -> list[tuple[str, str, bytes]]:
        stream = self.memory.chunks.get((session_id, job_id))
        return [(entry_text(i), k, d) for i, (k, d) in stream.entries] if stream else []


class MemoryChunkWriter:
    """Chunks are stored as they are put (in order; nothing to wait for), unless the session is gone or a later
    attempt started (then `drain` raises `Superseded`)."""

    def __init__(self, jobs: MemoryChatJobs, session_id: str, job_id: str, attempt: int) -> None:
        self.jobs = jobs
        self.session_id = session_id
        self.job_id = job_id
        self.attempt = attempt
        self.superseded = False

    def put(self, data: bytes) -> None:
        if self.superseded or not self.jobs.current(self.session_id, self.job_id, self.attempt):
            self.superseded = True
            raise Superseded(f"a later attempt of chat {self.job_id} runs, or its stream has ended")
        self.jobs.write(self.session_id, self.job_id, [("chunk", data)])

    async def drain(self) -> None:
        if self.superseded:
            raise Superseded(f"a later attempt of chat {self.job_id} runs")
