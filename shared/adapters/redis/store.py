"""The Redis event log and read models (the `EventLog` and `ReadModels` ports).

Writes: one `APPEND` script call (idempotency check, expected-version check,
XADD of the events, feed entry) — one round trip. Reads: one pipeline or one
script. Works the same on redis-server and on fakeredis (with Lua).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.exceptions import RedisError

from shared.adapters.codec import (
    decode_event,
    decode_state,
    encode_state,
    event_fields,
    event_json,
    json_encode,
    member,
    pairs,
    split_member,
    upcast,
)
from shared.adapters.forks import Entry, checked, complete
from shared.adapters.redis.cluster import Client
from shared.adapters.redis.keys import USAGE_TTL_S, Keys, partition_of
from shared.adapters.redis.lua import call_live, run_live, run_pipeline
from shared.adapters.redis.scripts import (
    APPEND,
    APPLY,
    FIND,
    LOAD,
    PURGE,
    READ_EVENTS,
    READ_MESSAGES,
    READ_VIEW,
    REGISTRY,
    SWITCH,
    TIME_TRAVEL,
    TRIM,
)
from shared.app.ports import (
    CONFLICT_TAIL,
    Appended,
    AppendOutcome,
    Conflict,
    DueSession,
    Forked,
    Freshness,
    IdempotencyClaim,
    IdempotencyMismatch,
    Idle,
    IdleCursor,
    Missing,
    Pending,
    Replayed,
    View,
)
from shared.domain.events import SCHEMA_VERSION, Event
from shared.domain.projection import SNAPSHOT_EVERY, JobUpdate, ReadModelUpdate
from shared.domain.search import COUNT_BUDGET, SCAN_BUDGET, PartitionPage, Position, Query, merge, stamp
from shared.domain.state import SessionState, fold
from shared.domain.wire import ToolList

__all__ = [
    "LOAD_BATCH",
    "PURGE",
    "REGISTRY",
    "SWITCH",
    "TIME_TRAVEL",
    "RedisStore",
    "completed",
    "fork_origin",
    "job_fields",
    "known_origin",
    "log_entries",
]

log = logging.getLogger("parley.store")

LOAD_BATCH = 500
"""Events per LOAD call; a longer tail is read in several calls."""


class RedisStore:
    """Implements `EventLog` and `ReadModels` on one Redis (or one Redis Cluster)."""

    def __init__(
        self,
        redis: Client,
        keys: Keys,
        idempotency_ttl_s: int = 86_400,
        chat_retention_s: int = 7 * 86_400,
        outbox_maxlen: int = 10_000,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.idempotency_ttl_s = idempotency_ttl_s
        self.chat_retention_s = chat_retention_s
        self.outbox_maxlen = outbox_maxlen

    # -- EventLog ----------------------------------------------------------------------
    async def append(
        self,
        tenant: str,
        session_id: str,
        expected_version: int,
        events: Sequence[Event],
        claim: IdempotencyClaim | None = None,
        inherits: tuple[str, int] | None = None,
        purging: bool = False,
    ) -> AppendOutcome:
        if not events:
            raise ValueError("an append needs at least one event")  # a head without events would be no session
        k = self.keys
        partition = partition_of(session_id, k.partitions)
        idem_key = k.idempotency(partition, tenant, claim.key) if claim else k.idempotency(partition, tenant, "-")
        fork = checked(events, inherits, partition, lambda sid: partition_of(sid, k.partitions))
        parent, last = fork if fork is not None else ("", 0)
        args: list[Any] = [
            tenant,
            expected_version,
            session_id,
            "1" if claim else "0",
            claim.request_hash if claim else "",
            claim.response if claim else "",
            self.idempotency_ttl_s,
            SCHEMA_VERSION,
            CONFLICT_TAIL,
            parent,
            last,
            "1" if purging else "0",
        ]
        for e in events:
            args.extend(event_fields(e))
        reply = await APPEND(
            self.redis,
            [
                k.head(session_id),
                k.log(session_id),
                k.feed(partition),
                k.written(partition),
                idem_key,
                k.sessions(partition, tenant),
                k.idempotency_of(session_id),
                k.head(parent or session_id),
                k.readers(parent or session_id),
                k.readers(session_id),
            ],
            args,
        )
        match reply[0]:
            case b"appended" | b"already":  # already: a repeat of an append that landed (its reply was lost)
                return Appended(int(reply[1]))
            case b"replayed":
                return Replayed(reply[1])
            case b"conflict":
                newer = tuple(decode_event(_version(eid), pairs(f)) for eid, f in reply[2]) if len(reply) > 2 else ()
                return Conflict(int(reply[1]), newer)
            case b"mismatch":
                return IdempotencyMismatch()
            case b"missing":
                return Missing()
            case b"forked":
                return Forked(int(reply[1]))
        raise RuntimeError(f"unexpected append reply {reply!r}")

    async def load(self, tenant: str, session_id: str, known: SessionState | None = None) -> SessionState | None:
        state = known
        while True:
            pending = (await self._tails([session_id], [state]))[0]
            if pending is None or pending.tenant != tenant:
                return None
            if state is not None and pending.head < state.version:  # purged and imported again: what we knew is void
                state = None
                continue
            state = fold(pending.state, pending.events)
            if state.version >= pending.head:
                return state

    async def recall(self, tenant: str, session_id: str, key: str, request_hash: str) -> bytes | None:
        p = partition_of(session_id, self.keys.partitions)
        h, r = await self.redis.hmget(self.keys.idempotency(p, tenant, key), "h", "r")
        if h is None:
            return None
        return r if h.decode() == request_hash else b""

    async def fork_depth(self, session_id: str, limit: int) -> int:
        depth, sid = 0, session_id
        while depth < limit and (origin := await fork_origin(self.redis, self.keys, sid)) is not None:
            depth, sid = depth + 1, origin[0]
        return depth

    async def read(self, session_id: str, after: int = 0, limit: int = 100) -> list[Event]:
        _, entries = await log_entries(self.redis, self.keys, session_id, after, limit)
        return [decode_event(v, fields) for v, fields in entries]

    async def events(self, tenant: str, session_id: str, after: int, limit: int) -> View:
        """Up to `limit` events after version `after` as wire JSON, straight from the log (always fresh)."""
        k = self.keys
        reply = await READ_EVENTS(self.redis, [k.head(session_id), k.log(session_id)], [tenant, after, limit])
        head = int(reply[0])
        if head == 0:
            return View(0, 0, None)
        stored = [(_version(eid), pairs(fields)) for eid, fields in reply[1]]
        origin = known_origin(*reply[2:4]) if len(reply) > 2 else None
        parents = {
            reply[i].decode(): [int(reply[i + 1]), int(reply[i + 2]), *reply[i + 3 : i + 7]]
            for i in range(4, len(reply), 7)
        }
        entries = await completed(
            self.redis, self.keys, session_id, stored, after, min(head, after + limit), origin, parents
        )
        return View(head, head, b"log", [event_json(v, fields) for v, fields in entries])

    async def at_version(self, tenant: str, session_id: str, version: int) -> tuple[int, SessionState | None]:
        """(head, the state right after event `version`): folded from the nearest snapshot at or below it,
        so the cost is at most `SNAPSHOT_EVERY` events whatever the version. State None: past the head."""
        k = self.keys
        reply = await call_live(
            self.redis,
            TIME_TRAVEL,
            k.generations,
            session_id,
            lambda g: (
                [k.head(session_id), k.snapshots(session_id, g), k.log(session_id)],
                [tenant, version, SNAPSHOT_EVERY, g],
            ),
        )
        head = int(reply[0])
        if len(reply) == 1:
            return head, None
        base, raw = int(reply[1]), reply[2]
        state = decode_state(raw) if raw is not None else SessionState(id=session_id)
        assert state.version == base
        stored = [(_version(eid), pairs(f)) for eid, f in reply[3]]
        entries = await completed(self.redis, self.keys, session_id, stored, base, version, known_origin(*reply[4:6]))
        return head, fold(state, (decode_event(v, fields) for v, fields in entries))

    # -- ReadModels: reads ---------------------------------------------------------------
    async def session(self, tenant: str, session_id: str) -> View:
        return await self._view_field(tenant, session_id, "j")

    async def tools(self, tenant: str, session_id: str) -> View:
        return await self._view_field(tenant, session_id, "tools")

    async def _view_field(self, tenant: str, session_id: str, field: str) -> View:
        k = self.keys
        reply = await call_live(
            self.redis,
            READ_VIEW,
            k.generations,
            session_id,
            lambda g: ([k.head(session_id), k.view(session_id, g)], [tenant, field, g]),
        )
        return View(int(reply[0]), int(reply[1]), reply[2] if len(reply) > 2 else None)

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
        """`count`, `at`: the messages at a past version (`count` of them, edits and removals up to `at` counted);
        the page is read whether or not the session is deleted now."""
        k = self.keys
        reply = await call_live(
            self.redis,
            READ_MESSAGES,
            k.generations,
            session_id,
            lambda g: (
                [
                    k.head(session_id),
                    k.view(session_id, g),
                    k.messages(session_id, g),
                    k.log(session_id),
                    k.mods(session_id, g),
                ],
                [
                    tenant,
                    offset,
                    limit,
                    "" if count is None else count,
                    "" if at is None else at,
                    g,
                    "" if keep_messages is None else keep_messages,
                ],
            ),
        )
        head, version, live = int(reply[0]), int(reply[1]), reply[2] == 1
        items = [upcast(b"MessageAdded", int(s), d) for _, s, d in (entry.split(b"|", 2) for entry in reply[3:])]
        return View(head, version, b"live" if live else None, items)

    async def sessions(self, tenant: str, limit: int, offset: int) -> tuple[Freshness, list[bytes]]:
        k = self.keys
        parts = range(k.partitions)
        pipe = self.redis.pipeline(transaction=False)
        for p in parts:
            pipe.hget(k.written(p), tenant)
            pipe.hget(k.projected(p), tenant)
            pipe.zrevrange(k.index(p, tenant), 0, offset + limit - 1)
        replies = await pipe.execute()
        fresh = _freshness(replies)
        ids = sorted((sid for i in range(2, len(replies), 3) for sid in replies[i]), reverse=True)
        page = [sid.decode() for sid in ids[offset : offset + limit]]
        if not page:
            return fresh, []
        replies = await run_live(
            self.redis,
            REGISTRY,
            k.generations,
            [(READ_VIEW, sid, lambda g, sid=sid: ([k.head(sid), k.view(sid, g)], [tenant, "j", g])) for sid in page],
        )
        return fresh, [r[2] for r in replies if len(r) > 2 and r[2] is not None]

    async def find(
        self, tenant: str, query: Query, after: Position | None, limit: int
    ) -> tuple[Freshness, list[bytes], Position | None]:
        k = self.keys
        args = _find_args(query, "list", query.order, after, limit, SCAN_BUDGET)
        fresh, replies = await self._search(tenant, args)
        pages = []
        for r in replies:
            matches = [_position(m) for m in r[2:]]
            pages.append(PartitionPage(matches, _position(r[1]) if r[0] == b"more" else None))
        page = merge(pages, limit, query.descending)
        if not page.positions:
            return fresh, [], page.next
        ids = [at.session_id for at in page.positions]
        views = await run_live(
            self.redis,
            REGISTRY,
            k.generations,
            [(READ_VIEW, sid, lambda g, sid=sid: ([k.head(sid), k.view(sid, g)], [tenant, "j", g])) for sid in ids],
        )
        return fresh, [r[2] for r in views if len(r) > 2 and r[2] is not None], page.next

    async def count(self, tenant: str, query: Query) -> tuple[Freshness, int, bool]:
        # a count may walk either order: the one a time range bounds, so the range is an index range
        order = "u" if query.bounds("u") != (None, None) and query.bounds("c") == (None, None) else "c"
        fresh, replies = await self._search(tenant, _find_args(query, "count", order, None, 0, COUNT_BUDGET))
        return fresh, sum(int(r[0]) for r in replies), all(int(r[1]) == 1 for r in replies)

    async def _search(self, tenant: str, args: list[Any]) -> tuple[Freshness, list[Any]]:
        """One pipeline: per partition, the tenant's written and projected counters and one FIND call."""
        k = self.keys
        parts = range(k.partitions)

        def fill(pipe: Any) -> None:
            for p in parts:
                pipe.hget(k.written(p), tenant)
                pipe.hget(k.projected(p), tenant)
                FIND.queue(pipe, [k.search(p, tenant)], args)

        replies = await run_pipeline(self.redis, REGISTRY, fill)
        return _freshness(replies), replies[2::3]

    async def idle(self, partition: int, until_ms: int, after: IdleCursor | None, limit: int) -> list[Idle]:
        key = self.keys.idle(partition)
        low = after.changed_ms if after is not None else "-inf"
        seen = member(after.tenant, after.session_id).encode() if after is not None else b""
        out: list[Idle] = []
        offset = 0
        while len(out) < limit:
            # members that share the cursor's score sort by name: skip those up to the cursor's own
            page = await self.redis.zrangebyscore(key, low, until_ms, start=offset, num=limit, withscores=True)
            for m, score in page:
                if after is not None and int(score) == after.changed_ms and m <= seen:
                    continue
                tenant, sid = split_member(m.decode())
                out.append(Idle(int(score), tenant, sid))
            if len(page) < limit:
                break
            offset += len(page)
        return out[:limit]

    async def forget_idle(self, partition: int, tenant: str, session_id: str) -> None:
        await self.redis.zrem(self.keys.idle(partition), member(tenant, session_id))

    async def trim(self, tenant: str, session_id: str, keep_messages: int, budget: int, dry_run: bool) -> int:
        k = self.keys
        return int(
            await call_live(
                self.redis,
                TRIM,
                k.generations,
                session_id,
                lambda g: (
                    [k.head(session_id), k.view(session_id, g), k.messages(session_id, g)],
                    [tenant, g, keep_messages, budget, int(dry_run)],
                ),
            )
        )

    async def forks(self, parent_id: str) -> list[str]:
        low, high = f"[{parent_id}/".encode(), f"[{parent_id}/\xff".encode()
        found: list[str] = []
        for p in range(self.keys.partitions):
            found += [m.decode().partition("/")[2] for m in await self.redis.zrangebylex(self.keys.forks(p), low, high)]
        return sorted(found)  # UUIDv7: oldest first

    async def due(self, partition: int, until_ms: int, limit: int) -> list[DueSession]:
        page = await self.redis.zrangebyscore(
            self.keys.schedules(partition), "-inf", until_ms, start=0, num=limit, withscores=True
        )
        out = []
        for m, score in page:
            tenant, sid = split_member(m.decode())
            out.append(DueSession(int(score), tenant, sid))
        return out

    async def forget_due(self, partition: int, tenant: str, session_id: str) -> None:
        await self.redis.zrem(self.keys.schedules(partition), member(tenant, session_id))

    # -- ReadModels: the projector's side --------------------------------------------------
    async def pending(self, session_ids: Sequence[str], gen: int | None = None) -> list[Pending | None]:
        """`gen`: a rebuild's generation instead of the live one."""
        return await self._tails(session_ids, [None] * len(session_ids), gen)

    async def _tails(
        self, session_ids: Sequence[str], known: Sequence[SessionState | None], gen: int | None = None
    ) -> list[Pending | None]:
        """One pipeline of LOAD calls: each session's state (the newer of `known` and the view's) and
        up to LOAD_BATCH events after it."""
        k = self.keys

        def build(sid: str, s: SessionState | None) -> Any:
            def at(g: int) -> tuple[list[str], list[Any]]:
                g = g if gen is None else gen
                return [k.head(sid), k.view(sid, g), k.log(sid)], [
                    s.version if s else 0,
                    LOAD_BATCH,
                    g,
                    "1" if gen is None else "0",
                ]

            return at

        replies = await run_live(
            self.redis, REGISTRY, k.generations, [(LOAD, sid, build(sid, s)) for sid, s in zip(session_ids, known)]
        )
        out: list[Pending | None] = []
        for sid, s, reply in zip(session_ids, known, replies):
            if reply[0] == 0:
                out.append(None)
                continue
            head, tenant, base, raw_state = int(reply[0]), reply[1].decode(), int(reply[2]), reply[3]
            stored = [(_version(eid), pairs(fields)) for eid, fields in reply[4]]
            try:
                entries = await completed(self.redis, self.keys, sid, stored, base, min(head, base + LOAD_BATCH))
                state = decode_state(raw_state) if raw_state is not None else (s or SessionState(id=sid))
                events = [decode_event(v, fields) for v, fields in entries]
            except RedisError:
                raise  # the store's trouble, not the session's: the caller retries
            except Exception:
                log.exception("cannot decode session %s; it stays behind until fixed (parley rebuild --session)", sid)
                out.append(None)
                continue
            out.append(Pending(tenant=tenant, state=state, events=events, head=head))
        return out

    async def apply(self, updates: Sequence[tuple[str, ReadModelUpdate]], gen: int | None = None) -> list[bool]:
        """`gen`: write a rebuild's generation (its views only: the index, counters and chat jobs stay live)."""
        k = self.keys
        live = gen is None

        def build(tenant: str, u: ReadModelUpdate) -> Any:
            sid = u.session_id
            p = partition_of(sid, k.partitions)
            session_json = json_encode(u.session) if u.session is not None else b""
            tools_json = json_encode(ToolList(u.session.tools)) if u.session is not None and u.tools_changed else b""
            job_keys, job_args = [], []
            snapshots: list[Any] = []
            for snap in u.snapshots:
                snapshots += [snap.version, encode_state(snap)]
            for job in u.jobs if live else ():
                fields = job_fields(job)
                job_keys.append(k.chat(sid, job.job_id))
                job_args += [job.job_id, len(fields) // 2, *fields]
            usage = u.usage if live else []
            usage_keys = [k.usage(p, tenant, d.day) for d in usage]
            usage_args: list[Any] = []
            for d in usage:
                usage_args += [d.chats, d.prompt_tokens, d.completion_tokens, USAGE_TTL_S]
            outbox = [x for entry in u.outbox for x in entry] if live else []
            state = encode_state(u.state)
            mods = [x for mod in u.message_mods for x in mod]
            changed_ms = int(u.session.updated_at.timestamp() * 1000) if u.session is not None else ""
            search = pack(u.search)

            def at(g: int) -> tuple[list[str], list[Any]]:
                g = g if live else gen
                keys = [
                    k.head(sid),
                    k.view(sid, g),
                    k.messages(sid, g),
                    k.snapshots(sid, g),
                    k.index(p, tenant),
                    k.projected(p),
                    k.chats(sid),
                    k.mods(sid, g),
                    k.log(sid),
                    k.idle(p),
                    k.schedules(p),
                    k.outbox(p),
                    k.forks(p),
                    k.search(p, tenant),
                    *job_keys,
                    *usage_keys,
                ]
                args = [
                    tenant,
                    u.from_version,
                    u.to_version,
                    state,
                    session_json,
                    tools_json,
                    u.index or "",
                    sid,
                    self.chat_retention_s,
                    g,
                    "1" if live else "0",
                    member(tenant, sid),
                    changed_ms,
                    ("" if u.next_tick_ms is None else u.next_tick_ms) if u.schedules_changed else "k",
                    f"{u.forked_from}/{sid}" if u.forked_from is not None else "",
                    search,
                    len(u.message_versions),
                    *u.message_versions,
                    len(u.message_mods),
                    *mods,
                    len(u.snapshots),
                    *snapshots,
                    len(job_keys),
                    *job_args,
                    len(usage),
                    *usage_args,
                    len(outbox) // 3,
                    self.outbox_maxlen,
                    *outbox,
                ]
                return keys, args

            return at

        if not updates:
            return []
        calls = [(APPLY, u.session_id, build(tenant, u)) for tenant, u in updates]
        return [r == 1 for r in await run_live(self.redis, REGISTRY, k.generations, calls)]

    async def load_scripts(self) -> None:
        await REGISTRY.load_all(self.redis)


def pack(members: Sequence[str]) -> bytes:
    """Search index members as one value the scripts can split: "<length>:<member>" each (lengths in bytes)."""
    out = bytearray()
    for m in members:
        raw = m.encode()
        out += b"%d:%s" % (len(raw), raw)
    return bytes(out)


def _find_args(query: Query, mode: str, order: str, after: Position | None, limit: int, budget: int) -> list[Any]:
    """FIND's arguments (lua/find.lua names them)."""
    lo, hi = query.bounds(order)
    other = "u" if order == "c" else "c"
    other_lo, other_hi = query.bounds(other)
    terms = query.terms()
    return [
        mode,
        order,
        "1" if query.descending else "0",
        "" if lo is None else stamp(lo),
        "" if hi is None else stamp(hi),
        "" if after is None else f"{stamp(after.ms)}\x00{after.session_id}",
        limit,
        budget,
        other,
        "" if other_lo is None else stamp(other_lo),
        "" if other_hi is None else stamp(other_hi),
        len(terms),
        *terms,
    ]


def _freshness(replies: Sequence[Any]) -> Freshness:
    """From a pipeline whose replies come in threes per partition: written counter, projected counter, the rest."""
    return Freshness(tuple(int(w or 0) for w in replies[0::3]), tuple(int(done or 0) for done in replies[1::3]))


def _position(tail: bytes) -> Position:
    """A match as FIND answers it (milliseconds, a NUL, the session id)."""
    ms, _, sid = tail.decode().partition("\x00")
    return Position(int(ms), sid)


def job_fields(job: JobUpdate) -> list[Any]:
    """A job update as hash field/value pairs: scalars as text, nested values as JSON."""
    out: list[Any] = []
    for name in ("status", "model"):
        if (value := getattr(job, name)) is not None:
            out += [name, value]
    if job.stream is not None:
        out += ["stream", "1" if job.stream else "0"]
    for name in ("created_at", "run_at", "finished_at", "context", "response", "error"):
        if (value := getattr(job, name)) is not None:
            out += [name, json_encode(value)]
    return out


async def log_entries(redis: Client, keys: Keys, session_id: str, after: int, limit: int) -> tuple[int, list[Entry]]:
    """(the session's head, up to `limit` entries of its log after version `after`), a copy-on-write fork's
    inherited ones filled in from its parent's log."""
    pipe = redis.pipeline(transaction=False)
    pipe.hmget(keys.head(session_id), "v", "fp", "fv")
    pipe.xrange(keys.log(session_id), f"{after + 1}-0", "+", count=limit)
    (v, parent, last), raw = await pipe.execute()
    head = int(v or 0)
    if head <= after:
        return head, []
    stored = [(_version(eid), fields) for eid, fields in raw]
    return head, await completed(
        redis, keys, session_id, stored, after, min(head, after + limit), known_origin(parent, last)
    )


async def completed(
    redis: Client,
    keys: Keys,
    session_id: str,
    stored: list[Entry],
    after: int,
    upto: int,
    origin: Callable[[], Awaitable[tuple[str, int] | None]] | None = None,
    read: dict[str, Any] | None = None,
) -> list[Entry]:
    """A read of versions `after + 1..upto` of the session's log (`stored`: what it holds of them), a copy-on-write
    fork's inherited entries filled in (`shared.adapters.forks`); `origin`: the fork's (parent, last inherited
    version) when the caller read it, else its head is asked only if entries are missing; `read`: the parents'
    ranges the caller read too (`READ_EVENTS`), per parent id, used when they are the ones asked for."""

    async def read_parent(parent_id: str, a: int, n: int) -> list[Entry]:
        found = (read or {}).get(parent_id)
        if found is None or found[:2] != [a, n]:
            return (await log_entries(redis, keys, parent_id, a, n))[1]
        _, _, head, raw, parent, last = found
        if int(head) <= a:
            return []
        entries = [(_version(eid), pairs(fields)) for eid, fields in raw]
        return await completed(
            redis, keys, parent_id, entries, a, min(int(head), a + n), known_origin(parent, last), read
        )

    return await complete(
        session_id, stored, after, upto, origin or (lambda: fork_origin(redis, keys, session_id)), read_parent
    )


async def fork_origin(redis: Client, keys: Keys, session_id: str) -> tuple[str, int] | None:
    """(parent, last inherited version) of a copy-on-write fork; None for any other session."""
    return _fork(*await redis.hmget(keys.head(session_id), "fp", "fv"))


def known_origin(parent: bytes | None, last: bytes | None) -> Callable[[], Awaitable[tuple[str, int] | None]]:
    """`fork_origin` as a read already found it in the session's head (`fp`, `fv`): completing asks nothing more."""

    async def origin() -> tuple[str, int] | None:
        return _fork(parent, last)

    return origin


def _fork(parent: bytes | None, last: bytes | None) -> tuple[str, int] | None:
    return (parent.decode(), int(last)) if parent and last else None


def _version(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])
