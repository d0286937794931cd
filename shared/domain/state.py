"""Session state and the pure fold from events to state.

`evolve` is the only place that knows how an event changes a session. The API
folds with it to validate commands, the projector to build read models, and
time travel to answer past versions, so all three agree by construction.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from msgspec import UNSET, Struct, structs

from shared.domain.context import Summary
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
    SessionUpdated,
    SummaryAdded,
    ToolsChanged,
)
from shared.domain.wire import ForkedFrom, ScheduleCreate, Session


class ActiveChat(Struct, frozen=True, array_like=True):
    job_id: str
    requested_at: int
    """The version of its `ChatRequested` event, where the worker reads the request."""
    run_at: datetime | None = None
    """A scheduled chat: not run before this time (the queue defers it until then)."""


class ScheduleState(Struct, frozen=True, kw_only=True):
    """A schedule as the session's state keeps it (the resource adds its next tick: `shared.app.schedules`)."""

    id: str
    spec: ScheduleCreate
    created_at: datetime
    updated_at: datetime
    since: datetime
    """Ticks after this are still to come: the last tick taken, else when it was created, changed or resumed."""
    last_tick: datetime | None = None
    last_job_id: str | None = None
    runs: int = 0
    skipped: int = 0


class SessionState(Struct, kw_only=True):
    id: str
    version: int = 0
    """Version of the last event folded in; 0 before `SessionCreated`."""
    session: Session | None = None
    deleted: bool = False
    message_count: int = 0
    active_chats: tuple[ActiveChat, ...] = ()
    """Chat jobs requested and not yet ended, in the order they are due (`queued`): the first one runs."""
    open_tool_calls: frozenset[str] = frozenset()
    """Ids of the tool calls assistant messages made that no tool result has answered yet: a tool result must
    answer one of them. (Only the open ones, so the state stays small however long the session runs.)"""
    summary: Summary | None = None
    removed: frozenset[int] = frozenset()
    """The seqs of the messages removed from the conversation (rare, so the set stays small)."""
    amended: int = 0
    """The version of the last edit or removal of a message (0: none): what was read of the conversation before it
    may have changed."""
    system_seqs: frozenset[int] | None = None
    """The seqs of the stored system messages, which a prompt never leaves out: a chat with a token budget reads
    the conversation from its newest message backwards and fetches these alone. None in a state folded before it
    was kept (such a chat reads the whole conversation; `parley rebuild` makes it exact)."""

    schedules: tuple[ScheduleState, ...] = ()
    """The session's cron schedules, in creation order."""
    forked_from: ForkedFrom | None = None
    """A fork: its parent and the parent's version its copied history ends at (its own version + 1)."""

    @property
    def exists(self) -> bool:
        return self.session is not None and not self.deleted

    def schedule(self, schedule_id: str) -> ScheduleState | None:
        return next((s for s in self.schedules if s.id == schedule_id), None)

    def active(self, job_id: str) -> ActiveChat | None:
        return next((c for c in self.active_chats if c.job_id == job_id), None)


def evolve(state: SessionState, event: Event) -> SessionState:
    """The state right after `event`. Pure: returns a new state, never mutates."""
    if event.version != state.version + 1:
        raise ValueError(f"event version {event.version} does not follow {state.version} in session {state.id}")
    session = state.session
    at = event.occurred_at
    match event:
        case SessionCreated(data=d):
            session = Session(
                id=state.id,
                agent_id=d.agent_id,
                user_id=d.user_id,
                situation=d.situation,
                token_budget=d.token_budget,
                context_overflow=d.context_overflow,
                multitask=d.multitask,
                tools=d.tools,
                metadata=d.metadata,
                compaction=d.compaction,
                forked_from=state.forked_from,
                version=event.version,
                created_at=at,
                updated_at=at,
                retention=d.retention,
            )
            return structs.replace(state, version=event.version, session=session, system_seqs=frozenset())
        case SessionUpdated(data=d):
            changes = {f: v for f in d.__struct_fields__ if (v := getattr(d, f)) is not UNSET}
            session = structs.replace(_live(state), **changes, version=event.version, updated_at=at)
            return structs.replace(state, version=event.version, session=session)
        case ToolsChanged(data=d):
            session = structs.replace(_live(state), tools=d.tools, version=event.version, updated_at=at)
            return structs.replace(state, version=event.version, session=session)
        case MessageAdded(data=m):
            if m.seq != state.message_count + 1 or m.session_id != state.id:
                raise ValueError(
                    f"message {m.id} (seq {m.seq} of session {m.session_id}) is not message "
                    f"{state.message_count + 1} of session {state.id}"
                )
            session = structs.replace(_live(state), version=event.version, updated_at=at)
            calls = state.open_tool_calls
            if m.tool_call_id is not None:
                calls = calls - {m.tool_call_id}
            if m.tool_calls:
                calls = calls | {c.id for c in m.tool_calls}
            systems = state.system_seqs
            if m.role == "system" and systems is not None:
                systems = systems | {m.seq}
            return structs.replace(
                state,
                version=event.version,
                session=session,
                message_count=m.seq,
                open_tool_calls=calls,
                system_seqs=systems,
            )
        case MessageEdited(data=m):
            if not 1 <= m.seq <= state.message_count or m.session_id != state.id or m.seq in state.removed:
                raise ValueError(f"edited message {m.id} (seq {m.seq}) is not a message of session {state.id}")
            return _touch(state, event, amended=event.version)
        case MessageRemoved(data=d):
            if not 1 <= d.seq <= state.message_count:
                raise ValueError(f"removed message {d.message_id} (seq {d.seq}) is not a message of session {state.id}")
            if d.seq in state.removed:
                raise ValueError(f"message {d.message_id} (seq {d.seq}) of session {state.id} was removed already")
            calls = state.open_tool_calls - set(d.tool_call_ids)
            systems = state.system_seqs - {d.seq} if state.system_seqs is not None else None
            return _touch(
                state,
                event,
                open_tool_calls=calls,
                removed=state.removed | {d.seq},
                amended=event.version,
                system_seqs=systems,
            )
        case SessionDeleted():
            _live(state)
            return structs.replace(state, version=event.version, deleted=True, active_chats=())
        case ChatRequested(data=d):
            chat = ActiveChat(d.job_id, event.version, d.params.run_at)
            return _touch(state, event, active_chats=queued(state.active_chats, chat, event.occurred_at))
        case ChatCompleted(data=d) | ChatFailed(data=d) | ChatCancelled(data=d):
            return _touch(state, event, active_chats=tuple(c for c in state.active_chats if c.job_id != d.job_id))
        case SummaryAdded(data=d):
            return _touch(state, event, summary=Summary(content=d.content, up_to_seq=d.up_to_seq))
        case ContextBuilt():
            return _touch(state, event)
        case SessionForked(data=d):
            if event.version > 1 and state.forked_from is not None:  # a fork of a fork: its parent's origin,
                return structs.replace(state, version=event.version)  # inherited as history; it changes nothing
            if state.version != 0:
                raise ValueError(f"SessionForked is the first event of a fork's log, not event {event.version}")
            return structs.replace(
                state, version=event.version, forked_from=ForkedFrom(session_id=d.parent_id, version=d.version)
            )
        case ScheduleCreated(data=d):
            made = ScheduleState(id=d.schedule_id, spec=d.schedule, created_at=at, updated_at=at, since=at)
            return _touch(state, event, schedules=(*state.schedules, made))
        case ScheduleUpdated(data=d):
            old = _schedule(state, d.schedule_id)
            changes = {f: v for f in ("cron", "timezone", "paused") if (v := getattr(d, f)) is not UNSET}
            spec = structs.replace(old.spec, **changes)
            return _touch(
                state, event, schedules=_replace(state, structs.replace(old, spec=spec, updated_at=at, since=at))
            )
        case ScheduleDeleted(data=d):
            _schedule(state, d.schedule_id)
            return _touch(state, event, schedules=tuple(s for s in state.schedules if s.id != d.schedule_id))
        case ScheduleFired(data=d):
            old = _schedule(state, d.schedule_id)
            taken = structs.replace(
                old,
                since=d.tick,
                last_tick=d.tick,
                last_job_id=d.job_id or old.last_job_id,
                runs=old.runs + (d.job_id is not None),
                skipped=old.skipped + (d.job_id is None),
            )
            return _touch(state, event, schedules=_replace(state, taken))
    raise TypeError(f"unknown event {type(event).__name__}")


OVERTAKE_MARGIN = timedelta(seconds=1)
"""A chat goes before a scheduled one only if that one is due more than this after it: a scheduled chat whose time
has come may be running (and the clocks of processes differ a little), and a running chat keeps its place."""


def queued(chats: tuple[ActiveChat, ...], chat: ActiveChat, at: datetime) -> tuple[ActiveChat, ...]:
    """`chats` with `chat`, requested `at`, in its place: chats run in the order they are due, so a chat goes after
    every chat due before it and ahead of the scheduled ones still waiting for a later time (a reminder set for
    an hour from now does not hold the session's conversation for that hour), in request order among equals."""
    due = at if chat.run_at is None else max(at, chat.run_at)
    for i, c in enumerate(chats):
        if c.run_at is not None and c.run_at - OVERTAKE_MARGIN > due:
            return (*chats[:i], chat, *chats[i:])
    return (*chats, chat)


def fold(state: SessionState, events: Iterable[Event]) -> SessionState:
    for event in events:
        state = evolve(state, event)
    return state


def _touch(state: SessionState, event: Event, **changes: object) -> SessionState:
    """A chat event: the session's version and `updated_at` move, nothing else of the resource."""
    session = structs.replace(_live(state), version=event.version, updated_at=event.occurred_at)
    return structs.replace(state, version=event.version, session=session, **changes)


def _schedule(state: SessionState, schedule_id: str) -> ScheduleState:
    found = state.schedule(schedule_id)
    if found is None:
        raise ValueError(f"schedule {schedule_id} is not a schedule of session {state.id}")
    return found


def _replace(state: SessionState, schedule: ScheduleState) -> tuple[ScheduleState, ...]:
    return tuple(schedule if s.id == schedule.id else s for s in state.schedules)


def _live(state: SessionState) -> Session:
    if state.session is None or state.deleted:
        raise ValueError(f"event applied to a session that does not exist: {state.id}")
    return state.session
