"""Chat jobs in Redis: their records (written by the projector's APPLY), their chunk streams
(written by the worker, read by the API), and the arq queue that runs them."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from shared.adapters.codec import json_encode, pairs
from shared.adapters.redis.cluster import Client
from shared.adapters.redis.keys import Keys, partition_of
from shared.adapters.redis.lua import MAX_STALE, StaleGenerations, call_live, run_pipeline, stale_generation
from shared.adapters.redis.scripts import CHUNKS, MARK_RUNNING, READ_CHAT, READ_VIEW, REGISTRY
from shared.app.ports import ENDS, Superseded, View
from shared.domain.wire import ChatJob

__all__ = ["ChatStore", "ChunkWriter", "job_json"]


_JSON_FIELDS = ("created_at", "run_at", "started_at", "finished_at", "context", "response", "error")


def job_json(job_id: str, session_id: str, fields: dict[bytes, bytes]) -> bytes:
    """The `ChatJob` resource from its hash, validated against the wire type."""
    raw: dict[str, Any] = {"id": job_id, "session_id": session_id}
    for k, v in fields.items():
        name = k.decode()
        if name in _JSON_FIELDS:
            raw[name] = msgspec.json.decode(v)
        elif name == "stream":
            raw[name] = v == b"1"
        elif name == "attempts":
            raw[name] = int(v)
        else:
            raw[name] = v.decode()
    return json_encode(msgspec.convert(raw, ChatJob))


class ChatStore:
    def __init__(self, redis: Client, keys: Keys, retention_s: int = 7 * 86_400) -> None:
        self.redis = redis
        self.keys = keys
        self.retention_s = retention_s

    async def job(self, tenant: str, session_id: str, job_id: str) -> View:
        k = self.keys
        reply = await call_live(
            self.redis,
            READ_CHAT,
            k.generations,
            session_id,
            lambda g: (
                [k.head(session_id), k.view(session_id, g), k.chat(session_id, job_id), k.chats(session_id)],
                [tenant, job_id, g],
            ),
        )
        head, version, fields = int(reply[0]), int(reply[1]), pairs(reply[3:])
        return View(head, version, job_json(job_id, session_id, fields) if fields else None)

    async def jobs(self, tenant: str, session_id: str, limit: int, offset: int) -> View:
        """The session's jobs, newest first (records past their retention are gone)."""
        k = self.keys
        for _ in range(MAX_STALE):
            g = k.generations[session_id]
            reply, ids = await run_pipeline(
                self.redis,
                REGISTRY,
                lambda pipe, g=g: [
                    READ_VIEW.queue(pipe, [k.head(session_id), k.view(session_id, g)], [tenant, "j", g]),
                    pipe.zrevrange(k.chats(session_id), offset, offset + limit - 1),
                ],
            )
            live = stale_generation(reply)
            if live is None:
                break
            k.generations.saw(session_id, live)
        else:
            raise StaleGenerations(f"session {session_id}'s generation kept changing")
        hv, vv = int(reply[0]), int(reply[1])
        if hv == 0:
            return View(0, 0, None)
        if len(reply) < 3 or reply[2] is None:  # deleted: its jobs went with it
            return View(hv, vv, None)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(k.chat(session_id, job_id.decode()))
        records = await pipe.execute()
        items = [job_json(j.decode(), session_id, r) for j, r in zip(ids, records) if r]
        return View(hv, vv, b"live", items)

    async def mark_running(self, session_id: str, job_id: str) -> int:
        """The attempt number, or 0 if the job already ended."""
        started = json_encode(datetime.now(UTC))
        keys = [self.keys.chat(session_id, job_id), self.keys.head(session_id), self.keys.chats(session_id)]
        return int(await MARK_RUNNING(self.redis, keys, [started, job_id]))

    async def status(self, session_id: str, job_id: str) -> str | None:
        raw = await self.redis.hget(self.keys.chat(session_id, job_id), "status")
        return raw.decode() if raw else None

    # -- chunk streams -----------------------------------------------------------------
    async def emit(self, session_id: str, job_id: str, kind: str, data: bytes) -> bytes | None:
        """Append one entry; None if the session is gone (purged)."""
        keys = self._chunk_keys(session_id, job_id)
        return await CHUNKS(self.redis, keys, [self.retention_s, job_id, "", kind, data])

    def writer(self, session_id: str, job_id: str, attempt: int) -> ChunkWriter:
        return ChunkWriter(self.redis, self._chunk_keys(session_id, job_id), job_id, self.retention_s, attempt)

    def _chunk_keys(self, session_id: str, job_id: str) -> list[str]:
        k, p = self.keys, partition_of(session_id, self.keys.partitions)
        return [k.head(session_id), k.chunks(session_id, job_id), k.relay(p), k.chat(session_id, job_id), k.ends(p)]

    async def chunks(self, session_id: str, job_id: str, after: str) -> list[tuple[str, str, bytes]]:
        """(entry id, kind, data) of up to 500 entries after `after`; waiting for more is `shared.adapters.redis.notify`'s."""
        reply = await self.redis.xread({self.keys.chunks(session_id, job_id): after}, count=500)
        out = []
        for _, entries in reply or []:
            for eid, f in entries:
                out.append((eid.decode(), f[b"k"].decode(), f[b"d"]))
        return out

    async def is_terminal(self, session_id: str, job_id: str, entry_id: str) -> bool:
        try:
            entries = await self.redis.xrange(self.keys.chunks(session_id, job_id), entry_id, entry_id)
        except ResponseError:  # not a stream entry id: the client made it up
            return False
        return bool(entries) and entries[0][1].get(b"k", b"").decode() in ENDS

    async def last_entry(self, session_id: str, job_id: str) -> tuple[str, str, bytes] | None:
        """(entry id, kind, data) of the job's last chunk-stream entry, or None if it has none."""
        entries = await self.redis.xrevrange(self.keys.chunks(session_id, job_id), count=1)
        if not entries:
            return None
        eid, f = entries[0]
        return eid.decode(), f[b"k"].decode(), f[b"d"]

    async def streamed(self, session_id: str, job_id: str) -> list[tuple[str, str, bytes]]:
        """Everything a job streamed so far (a retried attempt resumes after it)."""
        entries = await self.redis.xrange(self.keys.chunks(session_id, job_id))
        return [(eid.decode(), f[b"k"].decode(), f[b"d"]) for eid, f in entries]


class ChunkWriter:
    """Appends a job's chunks in order without making the model wait on Redis.

    The first chunk is written at once; chunks that arrive while a write is in flight go out
    together in the next pipeline.
    """

    def __init__(self, redis: Client, keys: list[str], job_id: str, retention_s: int, attempt: int) -> None:
        self.redis = redis
        self.keys = keys
        """CHUNKS's keys: the session's head (no head: purged, write nothing), the chunk stream, the partition's relay
        stream, the job's record (its attempt) and the partition's ends stream."""
        self.job_id = job_id
        self.retention_s = retention_s
        self.attempt = attempt
        self._pending: list[bytes] = []
        self._task: asyncio.Task[None] | None = None

    def put(self, data: bytes) -> None:
        task = self._task
        if task is not None and task.done() and not task.cancelled() and (refused := task.exception()) is not None:
            raise refused  # superseded, or the write failed: the producer stops now, not at its stream's end
        self._pending.append(data)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            args: list[Any] = [self.retention_s, self.job_id, self.attempt]  # chunks expire even if it never ends
            for data in batch:
                args += ["chunk", data]
            if await CHUNKS(self.redis, self.keys, args) == -1:
                self._pending = []
                raise Superseded(f"a later attempt of chat {self.job_id} runs, or its stream has ended")

    async def drain(self) -> None:
        """Wait until every chunk put so far is in Redis (raises what a write raised)."""
        if self._task is not None:
            await self._task
