"""The Redis event log and read models (the `EventLog` and `ReadModels` ports).

Writes: one `APPEND` script call (idempotency check, expected-version check,
XADD of the events, feed entry) — one round trip. Reads: one pipeline or one
script. Works the same on redis-server and on fakeredis (with Lua).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from shared.codec import decode_event, decode_state, encode_state, event_fields, json_encode, pairs, upcast
from shared.domain.events import SCHEMA_VERSION, Event
from shared.domain.model import ToolList
from shared.domain.projection import JobUpdate, ReadModelUpdate
from shared.domain.state import SessionState, fold
from shared.ports import (
    Appended,
    AppendOutcome,
    Conflict,
    IdempotencyClaim,
    IdempotencyMismatch,
    Missing,
    Pending,
    Replayed,
    View,
)
from shared.redis import scripts
from shared.redis.keys import Keys, partition_of
from shared.redis.lua import Script, run_pipeline

APPEND = Script(scripts.APPEND)
LOAD = Script(scripts.LOAD)
APPLY = Script(scripts.APPLY)
READ_MESSAGES = Script(scripts.READ_MESSAGES)
ALL_SCRIPTS = (APPEND, LOAD, APPLY, READ_MESSAGES)

LOAD_BATCH = 500
"""Events per LOAD call; a longer tail is read in several calls."""


class RedisStore:
    """Implements `EventLog` and `ReadModels` on one Redis (or one Redis Cluster)."""

    def __init__(self, redis: Redis, keys: Keys, idempotency_ttl_s: int = 86_400, chat_retention_s: int = 7 * 86_400) -> None:
        self.redis = redis
        self.keys = keys
        self.idempotency_ttl_s = idempotency_ttl_s
        self.chat_retention_s = chat_retention_s

    # -- EventLog ----------------------------------------------------------------------
    async def append(
        self,
        tenant: str,
        session_id: str,
        expected_version: int,
        events: Sequence[Event],
        claim: IdempotencyClaim | None = None,
    ) -> AppendOutcome:
        k = self.keys
        partition = partition_of(session_id, k.partitions)
        idem_key = k.idempotency(partition, tenant, claim.key) if claim else k.idempotency(partition, tenant, "-")
        args: list[Any] = [
            tenant,
            expected_version,
            session_id,
            "1" if claim else "0",
            claim.request_hash if claim else "",
            claim.response if claim else "",
            self.idempotency_ttl_s,
            SCHEMA_VERSION,
        ]
        for e in events:
            args.extend(event_fields(e))
        reply = await APPEND(
            self.redis,
            [k.head(session_id), k.log(session_id), k.feed(partition), k.written(partition), idem_key],
            args,
        )
        match reply[0]:
            case b"appended":
                return Appended(int(reply[1]))
            case b"replayed":
                return Replayed(reply[1])
            case b"conflict":
                return Conflict(int(reply[1]))
            case b"mismatch":
                return IdempotencyMismatch()
            case b"missing":
                return Missing()
        raise RuntimeError(f"unexpected append reply {reply!r}")

    async def load(self, tenant: str, session_id: str, known: SessionState | None = None) -> SessionState | None:
        state = known
        while True:
            pending = (await self._tails([session_id], [state]))[0]
            if pending is None or pending.tenant != tenant:
                return None
            state = fold(pending.state, pending.events)
            if state.version >= pending.head:
                return state

    async def recall(self, tenant: str, session_id: str, key: str, request_hash: str) -> bytes | None:
        p = partition_of(session_id, self.keys.partitions)
        h, r = await self.redis.hmget(self.keys.idempotency(p, tenant, key), "h", "r")
        if h is None:
            return None
        return r if h.decode() == request_hash else b""

    async def read(self, session_id: str, after: int = 0, limit: int = 100) -> list[Event]:
        entries = await self.redis.xrange(self.keys.log(session_id), f"{after + 1}-0", "+", count=limit)
        return [decode_event(_version(eid), fields) for eid, fields in entries]

    # -- ReadModels: reads ---------------------------------------------------------------
    async def session(self, tenant: str, session_id: str) -> View:
        return await self._view_field(tenant, session_id, b"j")

    async def tools(self, tenant: str, session_id: str) -> View:
        return await self._view_field(tenant, session_id, b"tools")

    async def _view_field(self, tenant: str, session_id: str, field: bytes) -> View:
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(k.head(session_id), "v", "t")
        pipe.hmget(k.view(session_id), "v", "t", "j", "tools")
        (hv, ht), (vv, vt, j, tools) = await pipe.execute()
        if hv is None or ht != tenant.encode():
            return View(0, 0, None)
        body = j if field == b"j" else tools
        return View(int(hv), int(vv or 0), body if j is not None and vt == ht else None)

    async def messages(self, tenant: str, session_id: str, limit: int, offset: int) -> View:
        k = self.keys
        reply = await READ_MESSAGES(
            self.redis,
            [k.head(session_id), k.view(session_id), k.messages(session_id), k.log(session_id)],
            [tenant, offset, offset + limit - 1],
        )
        head, version, live = int(reply[0]), int(reply[1]), reply[2] == 1
        rest = reply[3:]
        items = [upcast(b"MessageAdded", int(s), d) for s, d in zip(rest[::2], rest[1::2])]
        return View(head, version, b"live" if live else None, items)

    async def sessions(self, tenant: str, limit: int, offset: int) -> tuple[bool, list[bytes]]:
        k = self.keys
        parts = range(k.partitions)
        pipe = self.redis.pipeline(transaction=False)
        for p in parts:
            pipe.hget(k.written(p), tenant)
            pipe.hget(k.projected(p), tenant)
            pipe.zrevrange(k.index(p, tenant), 0, offset + limit - 1)
        replies = await pipe.execute()
        caught_up = all(int(replies[i + 1] or 0) >= int(replies[i] or 0) for i in range(0, len(replies), 3))
        ids = sorted((sid for i in range(2, len(replies), 3) for sid in replies[i]), reverse=True)
        page = [sid.decode() for sid in ids[offset : offset + limit]]
        if not page:
            return caught_up, []
        pipe = self.redis.pipeline(transaction=False)
        for sid in page:
            pipe.hget(k.view(sid), "j")
        bodies = await pipe.execute()
        return caught_up, [b for b in bodies if b is not None]

    # -- ReadModels: the projector's side --------------------------------------------------
    async def pending(self, session_ids: Sequence[str]) -> list[Pending | None]:
        return await self._tails(session_ids, [None] * len(session_ids))

    async def _tails(self, session_ids: Sequence[str], known: Sequence[SessionState | None]) -> list[Pending | None]:
        """One pipeline of LOAD calls: each session's state (the newer of `known` and the view's) and
        up to LOAD_BATCH events after it."""
        k = self.keys
        replies = await run_pipeline(
            self.redis,
            ALL_SCRIPTS,
            lambda pipe: [
                LOAD.queue(pipe, [k.head(sid), k.view(sid), k.log(sid)], [s.version if s else 0, LOAD_BATCH])
                for sid, s in zip(session_ids, known)
            ],
        )
        out: list[Pending | None] = []
        for sid, s, reply in zip(session_ids, known, replies):
            if reply[0] == 0:
                out.append(None)
                continue
            head, tenant, raw_state, entries = int(reply[0]), reply[1].decode(), reply[3], reply[4]
            state = decode_state(raw_state) if raw_state is not None else (s or SessionState(id=sid))
            events = [decode_event(_version(eid), pairs(fields)) for eid, fields in entries]
            out.append(Pending(tenant=tenant, state=state, events=events, head=head))
        return out

    @staticmethod
    def check_encodable(update: ReadModelUpdate) -> None:
        """Raise if the update cannot be stored (so one bad session cannot fail a whole batch)."""
        encode_state(update.state)

    async def apply(self, updates: Sequence[tuple[str, ReadModelUpdate]]) -> list[bool]:
        k = self.keys

        def fill(pipe: Any) -> None:
            for tenant, u in updates:
                sid = u.session_id
                p = partition_of(sid, k.partitions)
                session_json = json_encode(u.session) if u.session is not None else b""
                tools_json = json_encode(ToolList(u.session.tools)) if u.session is not None and u.tools_changed else b""
                job_keys, job_args = [], []
                for job in u.jobs:
                    fields = job_fields(job)
                    job_keys.append(k.chat(sid, job.job_id))
                    job_args += [job.job_id, len(fields) // 2, *fields]
                APPLY.queue(
                    pipe,
                    [k.view(sid), k.messages(sid), k.index(p, tenant), k.projected(p), k.chats(sid), *job_keys],
                    [
                        tenant, u.from_version, u.to_version, encode_state(u.state), session_json, tools_json,
                        u.index or "", sid, self.chat_retention_s, len(u.message_versions), *u.message_versions, *job_args,
                    ],
                )

        if not updates:
            return []
        return [r == 1 for r in await run_pipeline(self.redis, ALL_SCRIPTS, fill)]

    async def load_scripts(self) -> None:
        for s in ALL_SCRIPTS:
            await self.redis.script_load(s.source)


def job_fields(job: JobUpdate) -> list[Any]:
    """A job update as hash field/value pairs: scalars as text, nested values as JSON."""
    out: list[Any] = []
    for name in ("status", "model"):
        if (value := getattr(job, name)) is not None:
            out += [name, value]
    if job.stream is not None:
        out += ["stream", "1" if job.stream else "0"]
    for name in ("created_at", "finished_at", "context", "response", "error"):
        if (value := getattr(job, name)) is not None:
            out += [name, json_encode(value)]
    return out


def _version(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])
