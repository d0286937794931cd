"""The data every memory adapter shares, as the Redis adapters share one Redis.

The adapters of one deployment must see each other's writes: an append feeds the projector and wakes waiters, the
read models' APPLY writes chat job records and usage, a purge erases what every other adapter wrote. So they all
work on one `Memory`, and a test or `bootstrap.in_memory` makes one per deployment.

What Redis keeps as bytes (log entries, states, session JSON) is kept as bytes here too, encoded with the same codec:
nothing a caller holds aliases the store, and what the log could not read back fails here as it would there.
Expiry (idempotency records, chat records and chunks, slots) is judged against `clock` when read, as Redis does.
Single-threaded: every method runs between two awaits, which is what makes each "script" atomic.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from shared.adapters.forks import Entry, made_own
from shared.domain.ids import partition_of

__all__ = [
    "EntryId",
    "Expiring",
    "FeedGroup",
    "Generation",
    "Head",
    "Memory",
    "Stream",
    "TTLMap",
    "ViewRecord",
    "entry_text",
    "parse_entry_id",
]

K = TypeVar("K")
V = TypeVar("V")
EntryId = tuple[int, int]
"""A stream entry id (milliseconds, sequence), as Redis streams number their entries."""


def parse_entry_id(text: str | bytes) -> EntryId | None:
    """`ms-seq` (or `ms`, sequence 0) as an entry id; None for anything else."""
    raw = text.decode() if isinstance(text, bytes) else text
    ms, _, seq = raw.partition("-")
    if not ms.isdigit() or (seq and not seq.isdigit()):
        return None
    return int(ms), int(seq or 0)


def entry_text(entry_id: EntryId) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


class Stream(Generic[V]):
    """An append-only stream with time-based entry ids, strictly increasing (Redis's `XADD *`)."""

    __slots__ = ("entries", "last")

    def __init__(self) -> None:
        self.entries: list[tuple[EntryId, V]] = []
        self.last: EntryId = (0, 0)

    def add(self, value: V, now_s: float) -> EntryId:
        ms = int(now_s * 1000)
        eid = (ms, 0) if ms > self.last[0] else (self.last[0], self.last[1] + 1)
        self.entries.append((eid, value))
        self.last = eid
        return eid

    def after(self, eid: EntryId, count: int | None = None) -> list[tuple[EntryId, V]]:
        start = bisect.bisect_right(self.entries, eid, key=_entry_id)
        return self.entries[start:] if count is None else self.entries[start : start + count]

    def get(self, eid: EntryId) -> V | None:
        at = bisect.bisect_left(self.entries, eid, key=_entry_id)
        return self.entries[at][1] if at < len(self.entries) and self.entries[at][0] == eid else None

    def trim_below(self, floor: EntryId) -> None:
        self.entries = [(i, v) for i, v in self.entries if i >= floor]


def _entry_id(entry: tuple[EntryId, object]) -> EntryId:
    return entry[0]


@dataclass
class Expiring(Generic[V]):
    value: V
    expires_at: float | None = None
    """Clock seconds; None: kept until removed."""


class TTLMap(Generic[K, V]):
    """A dict whose entries may expire (judged against the clock when read)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._items: dict[K, Expiring[V]] = {}

    def get(self, key: K) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item.expires_at is not None and item.expires_at <= self.clock():
            del self._items[key]
            return None
        return item.value

    def set(self, key: K, value: V) -> None:
        """Set the value; a TTL the key had stays (Redis's HSET on an existing hash)."""
        old = self._items.get(key)
        keep = old.expires_at if old is not None and self.get(key) is not None else None
        self._items[key] = Expiring(value, keep)

    def expire(self, key: K, ttl_s: float) -> None:
        if self.get(key) is not None:
            self._items[key].expires_at = self.clock() + ttl_s

    def pop(self, key: K) -> V | None:
        value = self.get(key)
        self._items.pop(key, None)
        return value


@dataclass
class Head:
    """A session's head: the log's last version, its tenant, its live read-model generation."""

    version: int
    tenant: str
    gen: int = 0
    fork: tuple[str, int] | None = None
    """A copy-on-write fork's (parent, last inherited version)."""
    purging: bool = False
    """A purge's delete was appended: no fork of it is made until the purge erases it."""


@dataclass
class ViewRecord:
    """A session's view in one generation: the version projected, the state (msgpack), the session JSON and tool
    list JSON (None once deleted)."""

    version: int = 0
    tenant: str = ""
    state: bytes | None = None
    session: bytes | None = None
    tools: bytes | None = None
    search: tuple[str, ...] = ()
    """The session's search index members (`ix` in Redis)."""
    trimmed: int = 0
    """How many of the oldest messages' copies a retention freed (`kt` in Redis; in memory the copies are only
    log versions, so freeing is counting)."""


@dataclass
class Generation:
    """One generation of a session's read models."""

    view: ViewRecord = field(default_factory=ViewRecord)
    messages: list[int] = field(default_factory=list)
    """Log versions of the `MessageAdded` events, in seq order."""
    mods: dict[int, list[tuple[int, str]]] = field(default_factory=dict)
    """seq → (version, "e" | "r") of its edits and removals, in version order."""
    snapshots: dict[int, bytes] = field(default_factory=dict)


@dataclass
class FeedGroup:
    """A partition's feed and its one consumer group (`projector`)."""

    stream: Stream[str] = field(default_factory=Stream)
    created: bool = False
    last_delivered: EntryId = (0, 0)
    pending: dict[EntryId, tuple[str, float, int]] = field(default_factory=dict)
    """entry id → (consumer, delivered at (clock s), deliveries)."""


class Memory:
    """Everything one in-memory deployment holds."""

    def __init__(self, partitions: int = 16, clock: Callable[[], float] = time.time) -> None:
        self.partitions = partitions
        self.clock = clock
        """Wall-clock seconds: expiry, entry ids and days are judged by it (Redis's clock, in Redis)."""
        # the log
        self.heads: dict[str, Head] = {}
        self.logs: dict[str, list[dict[bytes, bytes] | None]] = {}
        """session → its entries (fields as the Redis log stores them); entry i holds version i + 1, None for a
        copy-on-write fork's inherited version (read from its parent: `entries`)."""
        self.readers: dict[str, set[str]] = {}
        """session → the copy-on-write forks that read its log."""
        self.feeds: dict[int, FeedGroup] = {p: FeedGroup() for p in range(partitions)}
        self.written: dict[tuple[int, str], int] = {}
        self.idempotency: TTLMap[tuple[int, str, str], tuple[str, bytes]] = TTLMap(clock)
        self.idempotency_of: dict[str, set[tuple[int, str, str]]] = {}
        self.registry: dict[tuple[int, str], set[str]] = {}
        """(partition, tenant) → every session the tenant created there, deleted ones too, until purged."""
        self.audit: dict[tuple[int, str], Stream[dict[bytes, bytes]]] = {}
        # read models
        self.generations: dict[tuple[str, int], Generation] = {}
        self.index: dict[tuple[int, str], set[str]] = {}
        self.search: dict[tuple[int, str], dict[str, tuple[str, ...]]] = {}
        """(partition, tenant) → {session id: its search index members}: the live sessions' entries."""
        self.idle: dict[int, dict[str, int]] = {}
        """partition → {"tenant/session id": last change, ms}: the retention sweeper's index."""
        self.forks: dict[str, list[str]] = {}
        """parent id → its forks' ids, oldest first."""
        self.next_ticks: dict[int, dict[str, int]] = {}
        """partition → {"tenant/session id": next schedule tick, ms}: the scheduler's index."""
        self.projected: dict[tuple[int, str], int] = {}
        self.usage: TTLMap[tuple[int, str, str], dict[str, int]] = TTLMap(clock)
        self.outbox: dict[int, Stream[tuple[str, str, int, str, str]]] = {p: Stream() for p in range(partitions)}
        """partition → the webhook outbox: (tenant, session, version, event type, event id) per entry."""
        # webhooks
        self.webhooks: dict[str, dict[str, Any]] = {}
        """subscription id → {"sub": its JSON, "start": position, "cursors": {partition: position}, "epoch": n}."""
        self.deliveries: dict[str, list[bytes]] = {}
        """subscription id → its delivery attempts (JSON), newest first."""
        self.webhook_leases: TTLMap[str, str] = TTLMap(clock)
        self.webhook_changes: dict[str, Stream[bytes]] = {}
        """tenant → its subscription changes (JSON)."""
        # chat jobs
        self.jobs: TTLMap[tuple[str, str], dict[str, Any]] = TTLMap(clock)
        """(session, job) → the job record's fields (plain values)."""
        self.job_ids: dict[str, set[str]] = {}
        self.chunks: TTLMap[tuple[str, str], Stream[tuple[str, bytes]]] = TTLMap(clock)
        # the projector's and the tenants' bookkeeping
        self.projectors: dict[str, float] = {}
        self.rebuilds: dict[str, dict[str, str]] = {}
        self.api_keys: dict[str, str] = {}
        """sha256(key) → tenant."""
        self.api_key_ids: dict[str, str] = {}
        """key id → sha256(key)."""
        self.rates: TTLMap[str, float] = TTLMap(clock)
        self.tenant_limits: dict[str, dict[str, str]] = {}
        self.requests: TTLMap[tuple[str, str], int] = TTLMap(clock)
        self.slots: dict[tuple[str, str], dict[str, float]] = {}
        # the chat queue: jobs waiting (in enqueue order) and jobs a worker holds
        self.queued: dict[str, tuple[str, str]] = {}
        self.due: dict[str, float] = {}
        """Scheduled jobs: job id → when it may run (this store's clock); arq's deferred jobs."""
        """job → (tenant, session), oldest first."""
        self.running: dict[str, str] = {}
        """job → the worker that holds it."""
        # wake-ups: who is told that a session's log or a job's chunks grew; blocked readers of the feed and queue
        self.listeners: list[Callable[[str, bool], None]] = []
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    def entries(self, session_id: str, after: int, limit: int) -> list[Entry]:
        """Up to `limit` entries of the session's log after version `after`, a copy-on-write fork's inherited ones
        read from its parent's log and made its own (`shared.adapters.forks`)."""
        start = max(after, 0)
        out: list[Entry] = []
        for version, fields in enumerate(self.logs.get(session_id, [])[start : start + limit], start + 1):
            if fields is None:
                fork = self.heads[session_id].fork
                assert fork is not None, f"session {session_id} misses version {version} and is no fork"
                [(_, lent)] = self.entries(fork[0], version - 2, 1)
                fields = made_own(fork[0], session_id, version - 1, lent)
            out.append((version, fields))
        return out

    def partition(self, session_id: str) -> int:
        return partition_of(session_id, self.partitions)

    def generation(self, session_id: str, gen: int) -> Generation:
        found = self.generations.get((session_id, gen))
        if found is None:
            found = self.generations[(session_id, gen)] = Generation()
        return found

    def peek_generation(self, session_id: str, gen: int) -> Generation | None:
        return self.generations.get((session_id, gen))

    def drop_generation(self, session_id: str, gen: int) -> None:
        self.generations.pop((session_id, gen), None)

    def index_search(self, tenant: str, session_id: str, members: tuple[str, ...]) -> None:
        """Replace the session's search index members (none: it leaves the index)."""
        found = self.search.setdefault((self.partition(session_id), tenant), {})
        if members:
            found[session_id] = members
        else:
            found.pop(session_id, None)

    def head_of(self, tenant: str, session_id: str) -> Head | None:
        """The session's head if this tenant owns it (another tenant's session reads like none)."""
        head = self.heads.get(session_id)
        return head if head is not None and head.tenant == tenant else None

    # -- wake-ups ------------------------------------------------------------------------------------------------
    def wake(self, name: str, ended: bool = False) -> None:
        """`name` (a session id, a job id) grew (`ended`: by a job's last entry): tell every process's waiters."""
        for listener in list(self.listeners):
            listener(name, ended)

    def signal(self, what: str) -> None:
        """`what` ("feed", "queue") has something new: wake its blocked readers."""
        for waiter in self._waiters.pop(what, set()):
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, what: str, timeout_s: float) -> bool:
        """Block until `what` is signalled (True) or `timeout_s` passes (False)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(what, set()).add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters.get(what, set()).discard(waiter)
