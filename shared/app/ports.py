"""Every seam between the use cases and the world, as a small protocol.

Adapters implement them: Redis (`shared/adapters/redis`), in memory (`shared/adapters/memory`), the LLM providers
(`shared/adapters/llm`). One contract suite per port runs against each adapter (tests/contracts), so a
use case behaves the same on all of them; the use cases' own tests run on the memory adapters.

| port | what it promises |
|---|---|
| `EventLog` | a session's events, appended atomically under an expected version, exactly once per event id |
| `ReadModels` | the projections the GETs serve, with the version they reached; applied only on top of that version |
| `ChatJobs` | chat job records and each job's chunk stream (what the worker streamed, in order) |
| `ChatQueue` | a chat job runs once the queue hands it out (again after its worker died) |
| `Feed` | which sessions changed, for the projector: handed out, acknowledged, taken over after a crash |
| `Wakeups` | a waiter hears that a session or a job grew, without holding a connection |
| `LogAdmin` | the log beyond append and read: enumerate, rebuild generations, purge, audit |
| `ApiKeys` | key → tenant |
| `Limits` | per-tenant rates, slots and usage, shared by every process |
| `ModelProvider` | an LLM's answer, streamed |
| `Webhooks` | a tenant's subscriptions, each with its cursor in the outbox, its deliveries and its delivery lease |
| `WebhookSender` | a delivery POSTed, never to an address the deployment refuses |
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Literal, NamedTuple, Protocol

from msgspec import Struct

from shared.domain.events import Event, SessionPurged
from shared.domain.projection import ReadModelUpdate
from shared.domain.search import Position, Query
from shared.domain.state import SessionState
from shared.domain.webhooks import OutboxEntry, Subscription
from shared.domain.wire import TenantLimits, ToolCall, Usage, UsageDay

__all__ = [
    "CONFLICT_TAIL",
    "ENDS",
    "MAX_TRIES",
    "Admission",
    "AfterWaiting",
    "ApiKeys",
    "AppendOutcome",
    "Appended",
    "ChatJobs",
    "ChatQueue",
    "ChunkWriter",
    "Completion",
    "Conflict",
    "Cursor",
    "Delta",
    "DueSession",
    "EventLog",
    "Feed",
    "FeedEntry",
    "Forked",
    "Freshness",
    "IdempotencyClaim",
    "IdempotencyMismatch",
    "Idle",
    "IdleCursor",
    "JobFailer",
    "JobRunner",
    "Limits",
    "LogAdmin",
    "Missing",
    "ModelError",
    "ModelProvider",
    "ModelRequest",
    "Pending",
    "ReadModels",
    "Replayed",
    "Sent",
    "Slot",
    "Superseded",
    "View",
    "WakeOn",
    "Wakeups",
    "Watch",
    "WebhookSender",
    "Webhooks",
]


# -- the event log ------------------------------------------------------------------------------------------------
class IdempotencyClaim(Struct, kw_only=True, frozen=True):
    """Stored with an append, atomically: a retry with the same key gets `response` back."""

    key: str
    request_hash: str
    response: bytes


class Appended(Struct, frozen=True):
    version: int


class Replayed(Struct, frozen=True):
    response: bytes


class Conflict(Struct, frozen=True):
    """The head was not at the expected version: it is at `version`, and `newer` are the events after the expected
    version when they are few (up to `CONFLICT_TAIL`; else empty), so the writer can fold them and decide again
    without another round trip to load them."""

    version: int
    newer: tuple[Event, ...] = ()


class IdempotencyMismatch(Struct, frozen=True):
    pass


class Missing(Struct, frozen=True):
    """No such session for this tenant (unknown, or another tenant's)."""


class Forked(Struct, frozen=True):
    """A purge's delete refused: `forks` copy-on-write forks read the session's log (nothing was written)."""

    forks: int


CONFLICT_TAIL = 32
"""At most this many events come back with a `Conflict` (a writer further behind reloads)."""

AppendOutcome = Appended | Replayed | Conflict | IdempotencyMismatch | Missing | Forked


class View(Struct, frozen=True):
    """A read-model answer plus what it takes to judge its freshness.

    `head` is the session's last appended version (0: no such session for this tenant), `version` the version the
    read model has reached. The service layer waits while `version < head`, which is how a client reads its own
    writes."""

    head: int
    version: int
    body: bytes | None
    items: list[bytes] | None = None


class Freshness(Struct, frozen=True):
    """How far a tenant's session index was projected when it was read, per partition: `written` counts the tenant's
    acknowledged events there, `projected` those the read models hold. Both only grow, so a read is as fresh as of
    its start once every partition's `projected` reaches the `written` its first fetch saw: writes acknowledged
    later (under steady writes there always are some) do not hold it back."""

    written: tuple[int, ...]
    projected: tuple[int, ...]

    def behind(self, start: Freshness | None = None) -> list[int]:
        """The partitions not yet projected up to `start`'s writes (default: this reading's own)."""
        written = (start or self).written
        return [p for p, (w, done) in enumerate(zip(written, self.projected)) if done < w]


class EventLog(Protocol):
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
        """Append iff the session's version is `expected_version` (0: the session must not exist). The same events
        appended again (a retried call whose answer was lost) answer `Appended`, once. `purging`: a purge's delete,
        refused as `Forked` while forks read the session; once it is appended no fork of the session is made, so the
        purge that follows cannot be refused by one made in between. `inherits` (parent id,
        last inherited version): a copy-on-write fork's first append (`shared.domain.fork.fork_events`), its
        `SessionForked` and its own events; versions 2..last are read from the parent's log (in the parent's
        partition: the fork's id is chosen there), made the fork's own, by every read. Refused as `Missing` if the
        parent is not this tenant's or does not reach that far."""
        ...

    async def load(self, tenant: str, session_id: str, known: SessionState | None = None) -> SessionState | None:
        """The session's state at its last event, or None if this tenant has no such session."""
        ...

    async def recall(self, tenant: str, session_id: str, key: str, request_hash: str) -> bytes | None:
        """The stored response of an idempotent write: None if the key is unused, b"" if it was used with another
        request. `session_id` names the partition the record lives in."""
        ...

    async def fork_depth(self, session_id: str, limit: int) -> int:
        """How many parents a read of the session's inherited history walks, counted up to `limit`: 0 for a log
        that stores its whole history (any session but a copy-on-write fork, a copied fork too)."""
        ...

    async def read(self, session_id: str, after: int = 0, limit: int = 100) -> list[Event]: ...

    async def events(self, tenant: str, session_id: str, after: int, limit: int) -> View:
        """Up to `limit` events after version `after`, as wire JSON in `items`; `head` 0: no such session."""
        ...

    async def at_version(self, tenant: str, session_id: str, version: int) -> tuple[int, SessionState | None]:
        """(head, the state right after event `version`, or None past the head); head 0: no such session."""
        ...


# -- read models --------------------------------------------------------------------------------------------------
class Pending(Struct, frozen=True):
    """A session's events the read models have not folded in yet, and the state to fold them onto."""

    tenant: str
    state: SessionState
    events: list[Event]
    head: int


class Idle(NamedTuple):
    """A session in the idle index: its last change (ms since the epoch), its tenant, its id."""

    changed_ms: int
    tenant: str
    session_id: str


IdleCursor = Idle
"""Where a walk of the idle index goes on from: the last entry it saw."""


class DueSession(NamedTuple):
    """A session in the schedule index: when its next tick is due (ms since the epoch), its tenant, its id."""

    due_ms: int
    tenant: str
    session_id: str


class ReadModels(Protocol):
    async def session(self, tenant: str, session_id: str) -> View: ...

    async def tools(self, tenant: str, session_id: str) -> View: ...

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
        """`items` holds the page's message JSON, oldest first, each as its latest edit, removed ones skipped;
        `body` is None once the session is gone. `count`, `at`: the page as it was at version `at` (`count`
        messages then), deleted or not. `keep_messages`: the tenant's retention (0: none); then the page skips
        the messages a retention hides now (`shared.domain.retention.keep`: the session's own retention wins).
        None: every message (a lookup by id, a past version)."""
        ...

    async def sessions(self, tenant: str, limit: int, offset: int) -> tuple[Freshness, list[bytes]]:
        """(the index's freshness, session JSON newest first)."""
        ...

    async def find(
        self, tenant: str, query: Query, after: Position | None, limit: int
    ) -> tuple[Freshness, list[bytes], Position | None]:
        """(the index's freshness, the JSON of up to `limit` live sessions matching `query` after `after` in its order,
        where the next page starts: None at the end). A page may be short, even empty, with a next position: each
        partition walks a bounded number of index entries per call."""
        ...

    async def count(self, tenant: str, query: Query) -> tuple[Freshness, int, bool]:
        """(the index's freshness, how many live sessions match, exact: False when a bounded walk stopped first and
        the count is a lower bound)."""
        ...

    async def idle(self, partition: int, until_ms: int, after: IdleCursor | None, limit: int) -> list[Idle]:
        """Up to `limit` of the partition's live sessions last changed at or before `until_ms`, oldest first,
        after `after` (the last one a previous call answered): what the retention sweeper looks at."""
        ...

    async def forget_idle(self, partition: int, tenant: str, session_id: str) -> None:
        """Drop a session the idle index still names but that is gone (purged)."""
        ...

    async def trim(self, tenant: str, session_id: str, keep_messages: int, budget: int, dry_run: bool) -> int:
        """Free the read model's copies of (at most `budget` more of) the messages the session's retention hides
        from its list (`keep_messages`: the tenant's; the session's own wins); the log keeps them, and reads of
        them go there. How many it freed (`dry_run`: would free)."""
        ...

    async def forks(self, parent_id: str) -> list[str]:
        """The ids of the sessions forked from `parent_id`, oldest first (the caller checks their tenant)."""
        ...

    async def due(self, partition: int, until_ms: int, limit: int) -> list[DueSession]:
        """Up to `limit` of the partition's sessions with a schedule tick due at or before `until_ms`, soonest
        first: what the scheduler fires."""
        ...

    async def forget_due(self, partition: int, tenant: str, session_id: str) -> None:
        """Drop a session the schedule index still names but that is gone (purged)."""
        ...

    async def pending(self, session_ids: Sequence[str], gen: int | None = None) -> list[Pending | None]:
        """For each session, what the projector still has to apply (None: unknown session). `gen`: a rebuild's
        generation instead of the live one."""
        ...

    async def apply(self, updates: Sequence[tuple[str, ReadModelUpdate]], gen: int | None = None) -> list[bool]:
        """Apply each (tenant, update) iff its read model is at `update.from_version`; False: someone else did.
        `gen`: write a rebuild's generation (its views only: the index, counters and chat jobs stay live)."""
        ...


# -- chat jobs ------------------------------------------------------------------------------------------------------
class Superseded(Exception):
    """A later attempt of the chat job has started (this one's lease lapsed while it still ran), or its stream has
    ended (a delete or a cancel wrote the end meanwhile): this attempt's chunks are refused, so a stream never
    interleaves two attempts nor goes on past its end; it stops (a later attempt, or the end, answers)."""


class ChunkWriter(Protocol):
    def put(self, data: bytes) -> None:
        """Queue a chunk; chunks are written in order without making the caller wait. Raises `Superseded` (or what
        a write raised) once a write was refused, so a superseded attempt stops reading its model's stream."""
        ...

    async def drain(self) -> None:
        """Wait until every chunk put so far is stored (`Superseded` if a later attempt refused them)."""
        ...


ENDS = frozenset({"done", "error"})
"""The kinds of entry that end a job's chunk stream: its answer, or why it has none."""


class ChatJobs(Protocol):
    async def job(self, tenant: str, session_id: str, job_id: str) -> View:
        """The job's record (`body`: its JSON; None for no such job of this session)."""
        ...

    async def jobs(self, tenant: str, session_id: str, limit: int, offset: int) -> View:
        """The session's jobs, newest first (`items`); `body` None once the session is gone."""
        ...

    async def mark_running(self, session_id: str, job_id: str) -> int:
        """The attempt number, or 0 if the job already ended (or its session was purged)."""
        ...

    async def status(self, session_id: str, job_id: str) -> str | None: ...

    async def emit(self, session_id: str, job_id: str, kind: str, data: bytes) -> bytes | None:
        """Append one entry (`chunk`, `done`, `error`) to the job's stream; None if the session is gone."""
        ...

    def writer(self, session_id: str, job_id: str, attempt: int) -> ChunkWriter:
        """The chunk writer of attempt `attempt` (from `mark_running`): its chunks are stored only while no later
        attempt has started."""
        ...

    async def chunks(self, session_id: str, job_id: str, after: str) -> list[tuple[str, str, bytes]]:
        """(entry id, kind, data) of up to 500 entries after `after` ("0-0": from the start)."""
        ...

    async def is_terminal(self, session_id: str, job_id: str, entry_id: str) -> bool:
        """The entry exists and ends the stream (`done` or `error`)."""
        ...

    async def last_entry(self, session_id: str, job_id: str) -> tuple[str, str, bytes] | None:
        """(entry id, kind, data) of the stream's last entry."""
        ...

    async def streamed(self, session_id: str, job_id: str) -> list[tuple[str, str, bytes]]:
        """Every entry so far."""
        ...


class ChatQueue(Protocol):
    async def enqueue(
        self, tenant: str, session_id: str, job_ids: Sequence[str], run_at: datetime | None = None
    ) -> None:
        """Queue the jobs to run (a job already queued is not queued twice) and wake an idle worker; `run_at`: not
        before then (a scheduled chat; kept across restarts as the queue is)."""
        ...

    async def depth(self) -> int:
        """Jobs waiting for a worker (for metrics and the chat workers' autoscaler)."""
        ...


JobRunner = Callable[[str, str, str], Awaitable[str]]
"""What a chat worker runs for a job, with (tenant, session, job): the use case (`shared.app.chat_run`), answering
how the run ended (`waiting`: not the session's first chat yet)."""
JobFailer = Callable[[str, str, str, str, str], Awaitable[None]]
"""What a chat worker calls with (tenant, session, job, code, message) once a job ran out of attempts."""
AfterWaiting = Callable[[str, str, str], Awaitable[None]]
"""Called with (tenant, session, job) once a run that answered `waiting` (not its session's first chat) has left
the queue: the job is queued again if it became first meanwhile."""
MAX_TRIES = 5
"""Attempts of a chat job that raised an unexpected error before it is failed with `internal_error` (every chat
worker, whatever its queue)."""


# -- the projector's work -----------------------------------------------------------------------------------------
class FeedEntry(tuple):  # type: ignore[type-arg]
    """(partition, entry id, session id)"""

    __slots__ = ()

    @property
    def partition(self) -> int:
        return self[0]  # type: ignore[no-any-return]

    @property
    def entry_id(self) -> bytes:
        return self[1]  # type: ignore[no-any-return]

    @property
    def session_id(self) -> str:
        return self[2]  # type: ignore[no-any-return]


class PartitionLag(Struct, frozen=True):
    """How far projection is behind on one partition (for metrics)."""

    partition: int
    entries: int
    """Feed entries (one per acknowledged write) not yet projected: undelivered plus pending."""
    pending: int
    """Read by a projector, not yet acknowledged."""
    oldest_ms: int | None
    """When the oldest of them was written (Redis's clock, ms since the epoch); None: caught up."""


class Feed(Protocol):
    async def ensure_groups(self) -> None: ...

    async def lag(self) -> list[PartitionLag]:
        """Every partition's projection lag (two pipelined round trips; for the metrics sampler)."""
        ...

    async def read(self, count: int, block_ms: int | None) -> list[FeedEntry]:
        """New entries (sessions that changed), handed to this consumer only."""
        ...

    async def claim_stale(self, min_idle_ms: int, count: int) -> list[FeedEntry]:
        """Take over entries that a dead consumer read but never acknowledged."""
        ...

    async def ack(self, entries: Sequence[FeedEntry]) -> None: ...

    async def trim(self) -> None:
        """Drop entries every consumer is done with."""
        ...

    async def backlog(self, partition: int, count: int = 2_000) -> list[str]:
        """A superset of the partition's unprojected sessions (a reader catching them up itself)."""
        ...

    async def heartbeat(self) -> None: ...

    async def forget_consumer(self) -> None: ...

    async def alive(self, within_ms: int) -> bool:
        """Some projector sent a heartbeat within `within_ms`."""
        ...


class Watch(Protocol):
    def clear(self) -> None: ...

    async def wait(self, timeout_s: float) -> bool:
        """True if woken, False after `timeout_s`."""
        ...


WakeOn = Literal["appends", "chunks", "end"]
"""What wakes a waiter: `appends` to a session's log, `chunks` written to a job's stream (its end too), or only
the job's `end` (its last entry: a synchronous chat waits for its answer, not for every batch before it)."""


class Wakeups(Protocol):
    def watching(self, name: str, session_id: str, on: WakeOn) -> AbstractAsyncContextManager[Watch]:
        """Wake-ups for `name` (a session id for `appends`, else a job id), in `session_id`'s partition."""
        ...


# -- the log's administration ---------------------------------------------------------------------------------------
class LogAdmin(Protocol):
    async def tenants(self) -> list[str]: ...

    async def session_ids(self, tenant: str) -> list[str]:
        """Every session the tenant created and has not purged, deleted ones too, in id (creation) order."""
        ...

    async def head(self, session_id: str) -> tuple[int, str | None, int]:
        """(version, tenant, live read-model generation); (0, None, 0) for no such session."""
        ...

    async def heads(self, session_ids: Sequence[str]) -> list[int]:
        """Each session's last version (0: none)."""
        ...

    async def log_json(self, session_id: str, after: int, count: int) -> list[tuple[int, bytes]]:
        """(version, wire JSON) of up to `count` events after `after`, as `/events` shows them."""
        ...

    async def generations(self, session_ids: Sequence[str]) -> list[int]: ...

    async def generation_states(self, gens: dict[str, int]) -> dict[str, tuple[str, SessionState]]:
        """For each session, (tenant, the state its generation `gens[sid]` reached); purged ones are left out."""
        ...

    async def read_logs(self, after: dict[str, int], count: int) -> dict[str, list[Event]]:
        """Each session's next (up to `count`) events after the version given."""
        ...

    async def switch(self, targets: Sequence[tuple[str, str, int]]) -> list[int]:
        """Make each (tenant, session, generation) live: 1 done, 0 not caught up, -1 purged, 2 a newer one is live."""
        ...

    async def drop(self, session_id: str, gen: int) -> None: ...

    async def progress(self, scope: str) -> str | None:
        """The cursor of a rebuild of `scope` (None: none ran, or the last one finished)."""
        ...

    async def set_progress(self, scope: str, cursor: str | None) -> None:
        """Record a rebuild's cursor ("": started), or forget it (None)."""
        ...

    async def readers(self, session_id: str) -> list[str]:
        """The copy-on-write forks that read this session's log (`shared.domain.fork`); purged ones left out."""
        ...

    async def purge(
        self, tenant: str, session_id: str, expected: int, tombstone: SessionPurged, forked_from: str | None = None
    ) -> bool:
        """Erase the session and record `tombstone`, atomically. False: no such session for this tenant; raises
        `PurgeConflict` if its version is not `expected` or a fork reads its log (`readers`). A fork's purge
        (`forked_from`: its parent's id) leaves its parent's readers and its list of forks (`ReadModels.forks`)."""
        ...

    async def audit(self, tenant: str, after: str | None, limit: int) -> tuple[list[bytes], str | None]: ...

    async def rewrite_persistence(self) -> list[str]:
        """Ask the store to rewrite its files (erased data leaves the disk too); answers what it started."""
        ...


class PurgeConflict(Exception):
    """The session changed between reading it and purging it: read again."""


# -- tenants ----------------------------------------------------------------------------------------------------------
class ApiKeys(Protocol):
    async def tenant_of(self, key: str) -> str | None: ...

    async def create(self, tenant: str) -> str: ...

    async def revoke(self, key_or_id: str) -> bool: ...

    async def list(self) -> list[tuple[str, str]]:
        """(key id, tenant) of every stored key."""
        ...


class Admission(Struct, frozen=True, array_like=True):
    admitted: bool
    burst: int
    """0: the tenant has no rate limit."""
    remaining: int
    wait_ms: int
    """Admitted: until the burst is whole again; refused: until a request is admitted again."""
    rps: float = 0
    granted: int = 1
    """Requests admitted by this call (a lease asks for several); 0 when refused."""
    day: str = ""
    """The UTC day the granted requests were counted on (a lease's unused ones are taken back from it)."""


class Slot(Struct, frozen=True):
    taken: bool
    limit: int
    held: int


class Limits(Protocol):
    async def admit(self, tenant: str, want: int = 1, unused: int = 0, unused_day: str = "") -> Admission:
        """Up to `want` requests of the tenant's at once, against its rate (as many as fit, at least one or none;
        counted for the day); first taking back `unused` requests an earlier grant counted on `unused_day`
        (`want` 0: only that)."""
        ...

    async def take(self, tenant: str, kind: str, member: str, ttl_s: float) -> Slot:
        """One of the tenant's `kind` slots ("chats", "streams") for `member`, held `ttl_s` unless renewed."""
        ...

    async def renew(self, tenant: str, kind: str, members: Sequence[str], ttl_s: float) -> None: ...

    async def give(self, tenant: str, kind: str, *members: str) -> None: ...

    async def limits(self, tenant: str, max_age_s: float = 1.0) -> TenantLimits:
        """The tenant's limits (its own, else the defaults)."""
        ...

    async def overrides(self, tenant: str) -> dict[str, str]: ...

    async def set_limits(self, tenant: str, values: dict[str, Any], reset: Sequence[str] = ()) -> None: ...

    async def usage(self, tenant: str, days: int) -> list[UsageDay]:
        """The tenant's counters for the last `days` UTC days, newest first."""
        ...

    async def report(self, tenant: str, days: int) -> tuple[TenantLimits, list[UsageDay]]:
        """The tenant's limits as they apply now (not cached) and `usage(tenant, days)`, read together."""
        ...


# -- the LLM ----------------------------------------------------------------------------------------------------------
class ModelRequest(Struct, kw_only=True):
    model: str
    messages: list[dict[str, Any]]
    """Chat Completions `messages`, as OpenAI's API takes them."""
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class Delta(Struct, kw_only=True, omit_defaults=True):
    """One streamed piece of the answer, in OpenAI's delta shape."""

    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class Completion(Struct, kw_only=True):
    """The whole answer; a provider's stream ends with exactly one."""

    content: str | None
    tool_calls: list[ToolCall] | None
    finish_reason: str
    model: str
    usage: Usage | None = None


class ModelError(Exception):
    """The provider failed for good (after its retries). `code` becomes the chat job's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ModelProvider(Protocol):
    def stream(self, request: ModelRequest) -> AsyncGenerator[Delta | Completion, None]: ...

    @property
    def models(self) -> list[str]:
        """The model names this deployment serves by default."""
        ...


# -- webhooks ---------------------------------------------------------------------------------------------------------
class Cursor(Struct, frozen=True):
    """Where a subscription is in the outbox: after `start` in every partition, unless `partitions` says further.
    `epoch` grows with every replay, so a deliverer that read an older cursor cannot move the new one."""

    epoch: int
    start: str
    partitions: dict[int, str]

    def after(self, partition: int) -> str:
        return self.partitions.get(partition, self.start)


class Webhooks(Protocol):
    async def create(self, sub: Subscription, change: bytes) -> None:
        """Store a new subscription; its cursor starts at the outbox's present (it gets what is projected from
        now on). Each change (`change`: a `WebhookChange`'s JSON) joins the tenant's changes in the same step."""
        ...

    async def get(self, tenant: str, sub_id: str) -> Subscription | None:
        """None: no such subscription for this tenant (another tenant's reads like an unknown one)."""
        ...

    async def of(self, tenant: str) -> list[Subscription]:
        """The tenant's subscriptions, oldest first."""
        ...

    async def ids(self) -> list[str]:
        """Every tenant's subscription ids (what the deliverers walk)."""
        ...

    async def load(self, sub_id: str) -> tuple[Subscription, Cursor] | None: ...

    async def update(self, sub: Subscription, change: bytes, was: datetime) -> bool | None:
        """Store the subscription's new fields (its cursor stays) iff it is still as it was when read (its
        `updated_at` is `was`: every change moves it on); None: it changed meanwhile (read it again and redo the
        change); False: it was deleted."""
        ...

    async def delete(self, tenant: str, sub_id: str, change: bytes) -> bool:
        """Remove it with its cursor, deliveries and lease; False: no such subscription for this tenant."""
        ...

    async def replay(self, tenant: str, sub_id: str, after: str, change: bytes) -> bool:
        """Move the cursor back (or on) to just after `after` in every partition, in a new epoch."""
        ...

    async def changes(self, tenant: str, after: str | None, limit: int) -> tuple[list[bytes], str | None]:
        """The tenant's subscription changes (JSON), oldest first, after cursor `after`; and the next cursor."""
        ...

    async def advance(self, sub_id: str, epoch: int, partition: int, position: str) -> bool:
        """Move the partition's cursor to `position` iff the cursor is still in `epoch` (no replay meanwhile)."""
        ...

    async def record(self, sub_id: str, delivery: bytes, keep: int) -> None:
        """Add a delivery attempt (JSON) to the subscription's list, keeping the newest `keep`; nothing once it
        is deleted."""
        ...

    async def deliveries(self, sub_id: str, limit: int) -> list[bytes]:
        """The newest `limit` delivery attempts (JSON), newest first."""
        ...

    async def lease(self, sub_id: str, holder: str, ttl_ms: int) -> bool:
        """Take the subscription's delivery lease, or renew it if `holder` has it; False: another holder has it."""
        ...

    async def release(self, sub_id: str, holder: str) -> None: ...

    async def outbox(self, after: dict[int, str], count: int) -> dict[int, list[OutboxEntry]]:
        """For each partition in `after`, up to `count` of its outbox entries after the position given (exclusive),
        oldest first (one round trip however many partitions)."""
        ...


class Sent(Struct, frozen=True):
    """What a delivery's POST got: a status code, or an error (no answer, refused address) and no code."""

    status_code: int | None
    error: str | None = None


class WebhookSender(Protocol):
    async def vet(self, url: str) -> str | None:
        """Why the URL cannot receive deliveries (its host resolves to a loopback or private address the
        deployment does not allow, or does not resolve), or None."""
        ...

    async def send(self, url: str, headers: dict[str, str], body: bytes) -> Sent:
        """POST the body (vetting the address again: DNS may have changed), following no redirects."""
        ...
