"""Commands and their handlers: `decide(state, command) -> events`, pure.

A handler checks the command against the current state and answers the events
that record it. Persisting them (with the expected-version check) is the
caller's job, so a handler can be re-run on fresher state after a conflict.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from msgspec import UNSET, Struct, UnsetType, structs

from shared.domain import schedules
from shared.domain.errors import (
    ChatInProgress,
    ChatNotActive,
    Invalid,
    MessageChanged,
    NotFound,
    TickTaken,
    VersionConflict,
)
from shared.domain.events import (
    ChatCancelled,
    ChatCancelledData,
    ChatCompleted,
    ChatCompletedData,
    ChatFailed,
    ChatFailedData,
    ChatRequested,
    ChatRequestedData,
    ContextBuilt,
    ContextBuiltData,
    Event,
    MessageAdded,
    MessageEdited,
    MessageRemoved,
    MessageRemovedData,
    ScheduleCreated,
    ScheduleCreatedData,
    ScheduleDeleted,
    ScheduleDeletedData,
    ScheduleFired,
    ScheduleFiredData,
    ScheduleUpdated,
    ScheduleUpdatedData,
    SessionCreated,
    SessionCreatedData,
    SessionDeleted,
    SessionDeletedData,
    SessionUpdated,
    SessionUpdatedData,
    SummaryAdded,
    SummaryAddedData,
    ToolsChanged,
    ToolsChangedData,
)
from shared.domain.fork import fork_events
from shared.domain.ids import derived_id
from shared.domain.state import ScheduleState, SessionState, fold
from shared.domain.wire import (
    ChatError,
    ChatParams,
    ChatRequest,
    ChatResponse,
    Content,
    ContextReport,
    Message,
    MessageCreate,
    ScheduleCreate,
    SchedulePatch,
    SessionCreate,
    SessionPatch,
    Tool,
    ToolCall,
)


class Limits(Struct, kw_only=True, frozen=True):
    max_content_chars: int = 100_000
    max_schedules: int = 16
    """Cron schedules per session."""
    min_schedule_interval_s: float = 60.0
    """The shortest time between two ticks of a schedule."""


class Stamp(Struct, kw_only=True, frozen=True):
    """Where a handler gets ids and the time, so handlers stay pure and testable."""

    now: datetime
    new_id: Callable[[], str]


class CreateSession(Struct, kw_only=True, frozen=True):
    body: SessionCreate


class UpdateSession(Struct, kw_only=True, frozen=True):
    patch: SessionPatch
    expected_version: int | None = None


class DeleteSession(Struct, kw_only=True, frozen=True):
    expected_version: int | None = None
    purge: bool = False
    """The delete a purge begins with: no fork of the session may be made after it (`EventLog.append`)."""


class AddMessage(Struct, kw_only=True, frozen=True):
    body: MessageCreate


class EditMessage(Struct, kw_only=True, frozen=True):
    """Change a message's content (and name). `message` is the message as it is now (from the read models), read
    at the session's version `read_at`: decided on a later version, where it may have changed meanwhile, the edit
    is refused (`MessageChanged`), or two edits of one message made at once would undo each other's fields."""

    message: Message
    content: Content | None
    name: str | None | UnsetType = UNSET
    read_at: int | None = None


class RemoveMessage(Struct, kw_only=True, frozen=True):
    """Take a message out of the conversation; its events stay in the log."""

    message: Message


Amendment = EditMessage | RemoveMessage


class Tick(Struct, kw_only=True, frozen=True):
    """A tick of a schedule a chat request takes: recorded by `ScheduleFired` in the same append, once."""

    schedule_id: str
    at: datetime


class RequestChat(Struct, kw_only=True, frozen=True):
    job_id: str
    request: ChatRequest
    default_model: str
    tick: Tick | None = None
    """The chat runs a schedule's tick (`TickTaken` if that tick, or a later one, was taken already)."""
    compact: bool = False
    """A compaction, not a chat (`ChatParams.compact`): queued behind the session's chats whatever its multitask
    policy, run by the session's summariser model."""
    amend: tuple[Amendment, ...] = ()
    """Edits and removals of stored messages recorded before the request's messages, in the same append (the
    OpenAI endpoint's conversation rule: a client that cut off or edited an answer)."""


class RecordContext(Struct, kw_only=True, frozen=True):
    job_id: str
    report: ContextReport


class AddSummary(Struct, kw_only=True, frozen=True):
    job_id: str
    content: str
    up_to_seq: int
    summarized: list[str]
    model: str | None = None


class CompleteChat(Struct, kw_only=True, frozen=True):
    """Record the answer. Decided on the log, so a chat job run twice answers once."""

    job_id: str
    response: ChatResponse
    save: bool


class FailChat(Struct, kw_only=True, frozen=True):
    job_id: str
    code: str
    message: str


class CancelChat(Struct, kw_only=True, frozen=True):
    job_id: str
    reason: str = "cancelled by the client"
    partial: str | None = None
    """The text the job had streamed when it was stopped: stored as its answer (the request's `save` permitting),
    so the conversation ends where the model was stopped, as the client saw it."""


class CreateSchedule(Struct, kw_only=True, frozen=True):
    schedule_id: str
    body: ScheduleCreate


class UpdateSchedule(Struct, kw_only=True, frozen=True):
    schedule_id: str
    patch: SchedulePatch


class DeleteSchedule(Struct, kw_only=True, frozen=True):
    schedule_id: str


class ForkSession(Struct, kw_only=True, frozen=True):
    """Start a fork (decided on the fork's empty state) from its parent's state at the fork's version
    (`shared.domain.fork`). Copy-on-write unless `events` holds the parent's events 1..`parent.version`: then
    they are stored, made the fork's own (a fork at the end of a long chain of forks of forks)."""

    parent: SessionState
    events: tuple[Event, ...] = ()
    metadata: dict[str, Any] | None = None


class SkipTicks(Struct, kw_only=True, frozen=True):
    """Record ticks of a schedule as not run: `reason` is an error code (`missed`, `chat_in_progress`, …);
    `missed_from`: the first tick of a run of missed ones ending at `tick.at`."""

    tick: Tick
    reason: str
    missed_from: datetime | None = None


Command = (
    CreateSession
    | UpdateSession
    | DeleteSession
    | AddMessage
    | EditMessage
    | RemoveMessage
    | RequestChat
    | RecordContext
    | AddSummary
    | CompleteChat
    | FailChat
    | CancelChat
    | CreateSchedule
    | UpdateSchedule
    | DeleteSchedule
    | SkipTicks
    | ForkSession
)


def decide(state: SessionState, command: Command, stamp: Stamp, limits: Limits = Limits()) -> list[Event]:
    match command:
        case CreateSession():
            return _create(state, command, stamp, limits)
        case UpdateSession():
            return _update(state, command, stamp, limits)
        case DeleteSession():
            _check_live(state, command.expected_version)
            return [
                SessionDeleted(
                    id=stamp.new_id(), version=state.version + 1, occurred_at=stamp.now, data=SessionDeletedData()
                )
            ]
        case AddMessage():
            _check_live(state, None)
            return [
                _message_added(
                    state,
                    state.version + 1,
                    state.message_count + 1,
                    command.body,
                    stamp,
                    limits,
                    state.open_tool_calls,
                )
            ]
        case EditMessage() | RemoveMessage():
            _check_live(state, None)
            return _amend(state, state.version + 1, command, stamp, limits)
        case RequestChat():
            return _request_chat(state, command, stamp, limits)
        case RecordContext(job_id=job) if _running(state, job):
            built = ContextBuiltData(job_id=job, **structs.asdict(command.report))
            return [ContextBuilt(id=stamp.new_id(), version=state.version + 1, occurred_at=stamp.now, data=built)]
        case AddSummary(job_id=job) if _running(state, job):
            summary = SummaryAddedData(
                job_id=job,
                content=command.content,
                up_to_seq=command.up_to_seq,
                summarized=command.summarized,
                model=command.model,
            )
            return [SummaryAdded(id=stamp.new_id(), version=state.version + 1, occurred_at=stamp.now, data=summary)]
        case CompleteChat(job_id=job) if _running(state, job):
            return _complete_chat(state, command, stamp)
        case FailChat(job_id=job) if _running(state, job):
            failed = ChatFailedData(job_id=job, error=ChatError(code=command.code, message=command.message))
            return [ChatFailed(id=stamp.new_id(), version=state.version + 1, occurred_at=stamp.now, data=failed)]
        case CancelChat(job_id=job):
            _check_live(state, None)
            if state.active(job) is None:
                raise ChatNotActive(f"chat {job} is not queued or running")
            events: list[Event] = []
            message_id = None
            if command.partial:
                answer = _answer_message(state, job, command.partial, None, stamp)
                message_id = answer.data.id
                events.append(answer)
            cancelled = ChatCancelledData(job_id=job, reason=command.reason, message_id=message_id)
            return [
                *events,
                ChatCancelled(
                    id=stamp.new_id(), version=state.version + len(events) + 1, occurred_at=stamp.now, data=cancelled
                ),
            ]
        case RecordContext() | AddSummary() | CompleteChat() | FailChat():
            return []  # the job already ended (answered, failed or cancelled): a repeat run changes nothing
        case CreateSchedule() | UpdateSchedule() | DeleteSchedule() | SkipTicks():
            return _schedule(state, command, stamp, limits)
        case ForkSession():
            if state.version != 0:
                raise Invalid(f"session {state.id} already exists")
            return fork_events(command.parent, command.events, state.id, stamp.now, stamp.new_id, command.metadata)
    raise TypeError(f"unknown command {type(command).__name__}")


def _create(state: SessionState, command: CreateSession, stamp: Stamp, limits: Limits) -> list[Event]:
    if state.version != 0:
        raise Invalid(f"session {state.id} already exists")
    b = command.body
    _check_text("situation", b.situation, limits)
    _check_tools(b.tools)
    data = SessionCreatedData(
        agent_id=b.agent_id,
        user_id=b.user_id,
        situation=b.situation,
        token_budget=b.token_budget,
        context_overflow=b.context_overflow,
        multitask=b.multitask,
        tools=b.tools,
        metadata=b.metadata,
        compaction=b.compaction,
        retention=b.retention,
    )
    return [SessionCreated(id=stamp.new_id(), version=1, occurred_at=stamp.now, data=data)]


def _update(state: SessionState, command: UpdateSession, stamp: Stamp, limits: Limits) -> list[Event]:
    _check_live(state, command.expected_version)
    p = command.patch
    _check_text("situation", p.situation, limits)
    changes = {
        f: getattr(p, f)
        for f in (
            "agent_id",
            "user_id",
            "situation",
            "token_budget",
            "context_overflow",
            "multitask",
            "compaction",
            "retention",
        )
        if getattr(p, f) is not UNSET
    }
    if p.metadata is not UNSET:
        changes["metadata"] = p.metadata or {}
    events: list[Event] = []
    version = state.version
    if changes:
        version += 1
        events.append(
            SessionUpdated(
                id=stamp.new_id(), version=version, occurred_at=stamp.now, data=SessionUpdatedData(**changes)
            )
        )
    if p.tools is not UNSET:
        tools = p.tools or []
        _check_tools(tools)
        version += 1
        events.append(
            ToolsChanged(id=stamp.new_id(), version=version, occurred_at=stamp.now, data=ToolsChangedData(tools=tools))
        )
    return events


def _message_added(
    state: SessionState,
    version: int,
    seq: int,
    b: MessageCreate,
    stamp: Stamp,
    limits: Limits,
    known_calls: frozenset[str],
) -> MessageAdded:
    _check_message(b, limits, known_calls)
    message = Message(
        id=stamp.new_id(),
        session_id=state.id,
        role=b.role,
        content=b.content,
        name=b.name,
        tool_call_id=b.tool_call_id,
        tool_calls=b.tool_calls,
        seq=seq,
        created_at=stamp.now,
    )
    return MessageAdded(id=stamp.new_id(), version=version, occurred_at=stamp.now, data=message)


def _check_message(b: MessageCreate, limits: Limits, known_calls: frozenset[str]) -> None:
    if isinstance(b.content, list) and not 1 <= len(b.content) <= 64:
        # the wire type says so; a message built in code (the OpenAI endpoint's) is checked here, because a log entry
        # the decoder refuses would stop the session's projection
        raise Invalid("content parts must number 1 to 64", {"field": "content"})
    if b.content is not None:
        _check_content(b.content, limits)
    elif not (b.role == "assistant" and b.tool_calls):
        raise Invalid(
            "content is required (it may be null only on an assistant message with tool_calls)", {"field": "content"}
        )
    if b.tool_calls and b.role != "assistant":
        raise Invalid("only an assistant message may have tool_calls", {"field": "tool_calls"})
    if b.role == "tool" and b.tool_call_id is None:
        raise Invalid("a message with role 'tool' needs a tool_call_id", {"field": "tool_call_id"})
    if b.role != "tool" and b.tool_call_id is not None:
        raise Invalid("only a message with role 'tool' may have a tool_call_id", {"field": "tool_call_id"})
    if b.tool_call_id is not None and b.tool_call_id not in known_calls:
        raise Invalid(
            f"tool_call_id {b.tool_call_id!r} answers no open tool call (none made it, or it was answered)",
            {"field": "tool_call_id", "rule": "answers_an_open_call"},
        )


def _amend(state: SessionState, version: int, command: Amendment, stamp: Stamp, limits: Limits) -> list[Event]:
    m = command.message
    if m.session_id != state.id or not 1 <= m.seq <= state.message_count or m.seq in state.removed:
        raise NotFound(f"message {m.id} not found")
    if isinstance(command, RemoveMessage):
        calls = [c.id for c in m.tool_calls or ()]
        data = MessageRemovedData(message_id=m.id, seq=m.seq, tool_call_ids=calls)
        return [MessageRemoved(id=stamp.new_id(), version=version, occurred_at=stamp.now, data=data)]
    if command.read_at is not None and state.version != command.read_at:
        raise MessageChanged(f"session {state.id} changed since message {m.id} was read")
    name = m.name if command.name is UNSET else command.name
    if command.content == m.content and name == m.name:  # an edit that changes nothing records nothing
        return []
    _check_message(
        MessageCreate(
            role=m.role, content=command.content, name=name, tool_call_id=m.tool_call_id, tool_calls=m.tool_calls
        ),
        limits,
        frozenset({m.tool_call_id}) if m.tool_call_id else frozenset(),
    )
    edited = structs.replace(m, content=command.content, name=name, edited_at=stamp.now)
    return [MessageEdited(id=stamp.new_id(), version=version, occurred_at=stamp.now, data=edited)]


def _request_chat(state: SessionState, command: RequestChat, stamp: Stamp, limits: Limits) -> list[Event]:
    _check_live(state, None)
    assert state.session is not None
    if command.tick is not None:
        _check_tick(state, command.tick)
    r = command.request
    if r.tools:
        _check_tools(r.tools)
    run_at = _run_at(r.run_at, r.delay_s, stamp.now)
    policy = "enqueue" if command.compact else r.multitask or state.session.multitask
    events: list[Event] = []
    version = state.version
    if state.active_chats and policy == "reject":
        raise ChatInProgress(
            f"chat {state.active_chats[0].job_id} is still in progress in this session",
            {"active": [c.job_id for c in state.active_chats]},
        )
    for amendment in command.amend:  # first, so the rest is decided on the amended conversation
        amended = _amend(state, version + 1, amendment, stamp, limits)
        version += len(amended)
        events += amended
        state = fold(state, amended)
    if state.active_chats and policy == "interrupt":
        for job in (c.job_id for c in state.active_chats):
            version += 1
            data = ChatCancelledData(job_id=job, reason=f"interrupted by chat {command.job_id}")
            events.append(ChatCancelled(id=stamp.new_id(), version=version, occurred_at=stamp.now, data=data))
    known = set(state.open_tool_calls)
    ids: list[str] = []
    for i, m in enumerate(r.messages):
        if r.save:
            version += 1
            event = _message_added(state, version, state.message_count + i + 1, m, stamp, limits, frozenset(known))
            ids.append(event.data.id)
            events.append(event)
        else:
            _check_message(m, limits, frozenset(known))
        known.discard(m.tool_call_id)
        known |= {c.id for c in m.tool_calls or ()}
    compaction = state.session.compaction if state.session is not None else None
    model = r.model or command.default_model
    if command.compact and compaction is not None and compaction.model is not None:
        model = compaction.model
    params = ChatParams(
        model=model,
        compact=command.compact,
        max_tokens=r.max_tokens,
        stream=r.stream,
        save=r.save,
        temperature=r.temperature,
        top_p=r.top_p,
        stop=r.stop,
        seed=r.seed,
        tools=r.tools,
        tool_choice=r.tool_choice,
        response_format=r.response_format,
        run_at=run_at,
    )
    requested = ChatRequestedData(
        job_id=command.job_id,
        params=params,
        message_ids=ids,
        unsaved=[] if r.save else r.messages,
    )
    events.append(ChatRequested(id=stamp.new_id(), version=version + 1, occurred_at=stamp.now, data=requested))
    if command.tick is not None:
        fired = ScheduleFiredData(schedule_id=command.tick.schedule_id, tick=command.tick.at, job_id=command.job_id)
        events.append(ScheduleFired(id=stamp.new_id(), version=version + 2, occurred_at=stamp.now, data=fired))
    return events


def _schedule(
    state: SessionState,
    command: CreateSchedule | UpdateSchedule | DeleteSchedule | SkipTicks,
    stamp: Stamp,
    limits: Limits,
) -> list[Event]:
    _check_live(state, None)
    event: Event
    new_id, version, now = stamp.new_id(), state.version + 1, stamp.now
    match command:
        case CreateSchedule(body=b):
            if len(state.schedules) >= limits.max_schedules:
                raise Invalid(
                    f"a session has at most {limits.max_schedules} schedules",
                    {"rule": "max_schedules", "max_schedules": limits.max_schedules},
                )
            schedules.check(b.cron, b.timezone, stamp.now, limits.min_schedule_interval_s)
            if b.tools:
                _check_tools(b.tools)
            for m in b.messages:  # a tool result answers a call of one conversation, never one of every tick
                _check_message(m, limits, frozenset())
            event = ScheduleCreated(
                id=new_id,
                version=version,
                occurred_at=now,
                data=ScheduleCreatedData(schedule_id=command.schedule_id, schedule=b),
            )
        case UpdateSchedule(patch=p):
            old = _found_schedule(state, command.schedule_id)
            cron = old.spec.cron if isinstance(p.cron, UnsetType) else p.cron
            timezone = old.spec.timezone if isinstance(p.timezone, UnsetType) else p.timezone
            if cron != old.spec.cron or timezone != old.spec.timezone:
                schedules.check(cron, timezone, stamp.now, limits.min_schedule_interval_s)
            elif isinstance(p.paused, UnsetType) or p.paused == old.spec.paused:
                return []  # it changes nothing: no event, and the ticks already due stay due
            data = ScheduleUpdatedData(schedule_id=old.id, cron=p.cron, timezone=p.timezone, paused=p.paused)
            event = ScheduleUpdated(id=new_id, version=version, occurred_at=now, data=data)
        case DeleteSchedule():
            _found_schedule(state, command.schedule_id)
            event = ScheduleDeleted(
                id=new_id, version=version, occurred_at=now, data=ScheduleDeletedData(schedule_id=command.schedule_id)
            )
        case SkipTicks(tick=t):
            _check_tick(state, t)
            fired = ScheduleFiredData(
                schedule_id=t.schedule_id, tick=t.at, skipped=command.reason, missed_from=command.missed_from
            )
            event = ScheduleFired(id=new_id, version=version, occurred_at=now, data=fired)
    return [event]


def _found_schedule(state: SessionState, schedule_id: str) -> ScheduleState:
    found = state.schedule(schedule_id)
    if found is None:
        raise NotFound(f"schedule {schedule_id} not found")
    return found


def _check_tick(state: SessionState, tick: Tick) -> None:
    """A schedule's tick may be taken once, while the schedule runs: `TickTaken` otherwise (the scheduler that
    lost the race, or a schedule paused or deleted meanwhile, does nothing)."""
    s = state.schedule(tick.schedule_id)
    if s is None or s.spec.paused or tick.at <= s.since:
        raise TickTaken(f"tick {tick.at.isoformat()} of schedule {tick.schedule_id} is taken or no longer due")


_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:([Zz])|([+-])(\d{2}):(\d{2}))")


def parse_time(text: str) -> datetime:
    """An RFC 3339 time, in UTC. A leap second (:60) counts as the second before it; a time before the first moment
    Python knows (the year 0, or 0001-01-01T00:30:00+01:00) as that first moment (in the past for a schedule), and
    one past the last (9999-12-31T23:59:59-23:59) as that last moment, so a stored time always encodes. Anything
    else is `Invalid`."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise Invalid("not an RFC 3339 time with a zone (e.g. 2027-01-31T09:00:00Z)", {"value": text})
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    micro = int((m.group(7) or ".0")[1:7].ljust(6, "0"))
    offset = timedelta(0)
    if m.group(9):
        offset = timedelta(hours=int(m.group(10)), minutes=int(m.group(11))) * (1 if m.group(9) == "+" else -1)
    try:
        if second > 60:
            raise ValueError("second must be in 0..60")
        # the year 0 is checked as a leap year (it is one, proleptically), then read as the first moment
        local = datetime(year or 4, month, day, hour, minute, min(second, 59), micro, timezone(offset))
    except ValueError as e:
        raise Invalid(f"not a time: {e}", {"value": text}) from e
    if year == 0:
        return datetime.min.replace(tzinfo=UTC)
    try:
        return local.astimezone(UTC)
    except OverflowError:  # past either end of what Python knows, in UTC
        return (datetime.min if local.year == 1 else datetime.max).replace(tzinfo=UTC)


def _run_at(run_at: str | None, delay_s: float | None, now: datetime) -> datetime | None:
    """When a scheduled chat runs: `run_at` (else now), plus `delay_s`; None: at once (a past time is now)."""
    start = parse_time(run_at) if run_at is not None else now
    try:
        at = start + timedelta(seconds=delay_s or 0)
    except OverflowError:  # beyond year 9999: as late as a time can be
        return datetime.max.replace(tzinfo=UTC)
    return at if at > now else None


def _complete_chat(state: SessionState, command: CompleteChat, stamp: Stamp) -> list[Event]:
    answer = command.response.choices[0].message
    events: list[Event] = []
    version = state.version
    message_id = None
    if command.save:
        version += 1
        added = _answer_message(state, command.job_id, answer.content, answer.tool_calls, stamp)
        message_id = added.data.id
        events.append(added)
    data = ChatCompletedData(job_id=command.job_id, message_id=message_id, response=command.response)
    events.append(
        ChatCompleted(id=derived_id(command.job_id, "completed"), version=version + 1, occurred_at=stamp.now, data=data)
    )
    return events


def _answer_message(
    state: SessionState, job_id: str, content: str | None, tool_calls: list[ToolCall] | None, stamp: Stamp
) -> MessageAdded:
    """A chat's answer as the session's next message; its ids derive from the job's, so a job answers once."""
    message = Message(
        id=derived_id(job_id, "answer"),
        session_id=state.id,
        role="assistant",
        content=content,
        name=None,
        tool_call_id=None,
        tool_calls=tool_calls,
        seq=state.message_count + 1,
        created_at=stamp.now,
    )
    return MessageAdded(
        id=derived_id(job_id, "answer-event"), version=state.version + 1, occurred_at=stamp.now, data=message
    )


def _running(state: SessionState, job_id: str) -> bool:
    return state.exists and state.active(job_id) is not None


def _check_live(state: SessionState, expected_version: int | None) -> None:
    if not state.exists:
        raise NotFound(f"session {state.id} not found")
    if expected_version is not None and expected_version != state.version:
        raise VersionConflict(
            f"session {state.id} is at version {state.version}, not {expected_version}",
            {"expected_version": expected_version, "version": state.version},
        )


def _check_tools(tools: list[Tool]) -> None:
    names = [t.function.name for t in tools]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise Invalid(
            f"tool names must be unique in a session: {', '.join(dupes)}", {"field": "tools", "duplicates": dupes}
        )
    for t in tools:
        params = t.function.parameters
        if params is not None and params.get("type", "object") != "object":
            raise Invalid(f"tool {t.function.name}: parameters must be a JSON Schema object", {"field": "tools"})


def _check_text(field: str, text: object, limits: Limits) -> None:
    if isinstance(text, str) and len(text) > limits.max_content_chars:
        raise Invalid(
            f"{field} is longer than {limits.max_content_chars} characters",
            {"field": field, "max": limits.max_content_chars},
        )


def _check_content(content: Content, limits: Limits) -> None:
    if isinstance(content, str):
        size = len(content)
    else:
        size = sum(
            len(getattr(p, "text", "")) + len(getattr(getattr(p, "image_url", None), "url", "")) for p in content
        )
    if size > limits.max_content_chars:
        raise Invalid(
            f"content is longer than {limits.max_content_chars} characters",
            {"field": "content", "max": limits.max_content_chars},
        )
