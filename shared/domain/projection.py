"""The projection: what a run of events changes in the read models, decided purely.

The projector folds a session's unprojected events with `evolve` and asks
`project` which read-model writes follow; the Redis adapter then applies the
whole `ReadModelUpdate` atomically together with the read model's version, so a
crash can neither lose nor double an event.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal

from msgspec import Struct

from shared.domain.events import (
    ChatCancelled,
    ChatCompleted,
    ChatFailed,
    ChatRequested,
    ContextBuilt,
    Event,
    MessageAdded,
    MessageEdited,
    MessageRemoved,
    ScheduleCreated,
    ScheduleDeleted,
    ScheduleFired,
    ScheduleUpdated,
    SessionCreated,
    SessionDeleted,
    SessionForked,
    ToolsChanged,
)
from shared.domain.schedules import next_tick
from shared.domain.search import entries
from shared.domain.state import SessionState, evolve
from shared.domain.wire import ChatError, ChatResponse, ChatStatus, ContextReport, Session

_OUTBOX = frozenset(t for t in (SessionCreated, SessionDeleted, ChatCompleted, ChatFailed, ChatCancelled))
"""The event classes of `WEBHOOK_EVENT_TYPES` (tests/unit/test_webhooks.py checks the two agree)."""

SNAPSHOT_EVERY = 100
"""A snapshot of the state every this many versions: time travel folds at most this many events."""


class JobUpdate(Struct, kw_only=True, omit_defaults=True):
    """A change to a chat job's record, from the events about it (None: unchanged)."""

    job_id: str
    status: ChatStatus | None = None
    model: str | None = None
    stream: bool | None = None
    created_at: datetime | None = None
    run_at: datetime | None = None
    finished_at: datetime | None = None
    context: ContextReport | None = None
    response: ChatResponse | None = None
    error: ChatError | None = None

    @property
    def ended(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


class UsageDelta(Struct, kw_only=True, array_like=True):
    """What a run of events adds to the tenant's usage on one day (UTC): the usage ledger is the log itself."""

    day: str
    """YYYY-MM-DD."""
    chats: int = 0
    """Chats requested."""
    prompt_tokens: int = 0
    """From `ContextBuilt`: every prompt a model was sent (a retried attempt builds, and sends, one again)."""
    completion_tokens: int = 0
    """From the answers' usage (`ChatCompleted`)."""


class ReadModelUpdate(Struct, kw_only=True):
    session_id: str
    from_version: int
    """The read model's version this update applies on top of (its checkpoint)."""
    state: SessionState
    session: Session | None
    """The session resource after the events; None once deleted."""
    tools_changed: bool
    message_versions: list[int]
    """Versions of the `MessageAdded` events, in order: the message list holds pointers into the log."""
    message_mods: list[tuple[int, int, str]] = []
    """(seq, version, "e" edited | "r" removed) of each `MessageEdited` / `MessageRemoved`, in order: reads show
    a message as its latest edit at or before the version they read, and skip it once removed."""
    index: Literal["add", "remove"] | None
    """How the tenant's newest-first session index changes."""
    jobs: list[JobUpdate] = []
    """Chat job records to write, in event order."""
    snapshots: list[SessionState] = []
    """The states at the versions in this run that are multiples of `SNAPSHOT_EVERY`."""
    usage: list[UsageDelta] = []
    """Per day, what the run adds to the tenant's usage counters (chats, tokens)."""
    schedules_changed: bool = False
    """The run created, changed, deleted or fired a schedule, or deleted the session: `next_tick_ms` is new."""
    forked_from: str | None = None
    """The run starts a fork of this session: the fork joins its parent's forks."""
    next_tick_ms: int | None = None
    """The session's next tick of any running schedule (ms since the epoch; None: none): its score in the
    partition's schedule index, which the scheduler walks."""
    outbox: list[tuple[int, str, str]] = []
    """(version, type, event id) of each event of a webhook type (`WEBHOOK_EVENT_TYPES`), in order: the live
    projection puts them into the partition's outbox, exactly once, as the version fence guards it."""
    search: list[str] = []
    """The session's search index entries after the events (`shared.domain.search.entries`; none once deleted):
    they replace the ones it had."""

    @property
    def to_version(self) -> int:
        return self.state.version

    @property
    def event_count(self) -> int:
        return self.state.version - self.from_version


def project(state: SessionState, events: Sequence[Event], snapshot_every: int = SNAPSHOT_EVERY) -> ReadModelUpdate:
    after = state
    snapshots: list[SessionState] = []
    index: Literal["add", "remove"] | None = None
    tools_changed = False
    versions: list[int] = []
    mods: list[tuple[int, int, str]] = []
    jobs: list[JobUpdate] = []
    usage: dict[str, UsageDelta] = {}
    outbox: list[tuple[int, str, str]] = []
    active = [c.job_id for c in state.active_chats]
    schedules_changed = False
    forked_from = None
    # a fork's copies of its parent's events (versions 2..copied) add nothing to the tenant's usage, and send no
    # webhook: they happened to the parent
    copied = state.forked_from.version + 1 if state.forked_from is not None else 0
    for e in events:
        after = evolve(after, e)
        if type(e) in _OUTBOX and e.version > copied:
            outbox.append((e.version, type(e).__name__, e.id))
        if after.version % snapshot_every == 0:
            snapshots.append(after)
        if type(e) is MessageAdded:  # most of any log: skip the match below
            versions.append(e.version)
            continue
        match e:
            case SessionCreated():
                index, tools_changed = "add", True
            case ToolsChanged():
                tools_changed = True
            case MessageEdited(data=m):
                mods.append((m.seq, e.version, "e"))
            case MessageRemoved(data=d):
                mods.append((d.seq, e.version, "r"))
            case MessageAdded():
                versions.append(e.version)
            case SessionForked(data=d) if e.version == 1:  # later: a fork of a fork's inherited origin
                forked_from, copied = d.parent_id, d.version + 1
            case ScheduleCreated() | ScheduleUpdated() | ScheduleDeleted() | ScheduleFired():
                schedules_changed = True
            case SessionDeleted():
                index, schedules_changed = "remove", True
                reason = ChatError(code="session_deleted", message="the session was deleted")
                jobs += [
                    JobUpdate(job_id=j, status="cancelled", finished_at=e.occurred_at, error=reason) for j in active
                ]
            case ChatRequested(data=d):
                _usage(usage, e, copied).chats += 1
                active.append(d.job_id)
                jobs.append(
                    JobUpdate(
                        job_id=d.job_id,
                        status="queued",
                        model=d.params.model,
                        stream=d.params.stream,
                        created_at=e.occurred_at,
                        run_at=d.params.run_at,
                    )
                )
            case ContextBuilt(data=d):
                _usage(usage, e, copied).prompt_tokens += d.prompt_tokens
                report = ContextReport(**{f: getattr(d, f) for f in ContextReport.__struct_fields__})
                jobs.append(JobUpdate(job_id=d.job_id, context=report))
            case ChatCompleted(data=d):
                _usage(usage, e, copied).completion_tokens += d.response.usage.completion_tokens
                jobs.append(
                    JobUpdate(job_id=d.job_id, status="succeeded", finished_at=e.occurred_at, response=d.response)
                )
            case ChatFailed(data=d):
                jobs.append(JobUpdate(job_id=d.job_id, status="failed", finished_at=e.occurred_at, error=d.error))
            case ChatCancelled(data=d):
                error = ChatError(code="cancelled", message=d.reason)
                jobs.append(JobUpdate(job_id=d.job_id, status="cancelled", finished_at=e.occurred_at, error=error))
        if isinstance(e, (ChatCompleted, ChatFailed, ChatCancelled)) and e.data.job_id in active:
            active.remove(e.data.job_id)
    return ReadModelUpdate(
        session_id=state.id,
        from_version=state.version,
        state=after,
        session=after.session if after.exists else None,
        tools_changed=tools_changed,
        message_versions=versions,
        message_mods=mods,
        index=index,
        jobs=jobs,
        snapshots=snapshots,
        usage=list(usage.values()),
        schedules_changed=schedules_changed,
        forked_from=forked_from,
        next_tick_ms=next_tick_ms(after) if schedules_changed else None,
        outbox=outbox,
        search=entries(after),
    )


def next_tick_ms(state: SessionState) -> int | None:
    """When the session's next tick is due, of all its running schedules (None: none, or the session is gone)."""
    if not state.exists:
        return None
    ticks = [
        t
        for s in state.schedules
        if not s.spec.paused and (t := next_tick(s.spec.cron, s.spec.timezone, s.since)) is not None
    ]
    return int(min(ticks).timestamp() * 1000) if ticks else None


def _usage(usage: dict[str, UsageDelta], event: Event, copied: int) -> UsageDelta:
    """The day's delta the event adds to; a fork's copy of its parent's event adds to a throwaway one."""
    if event.version <= copied:
        return UsageDelta(day="")
    day = event.occurred_at.astimezone(UTC).date().isoformat()
    delta = usage.get(day)
    if delta is None:
        delta = usage[day] = UsageDelta(day=day)
    return delta
