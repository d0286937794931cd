"""Session events: the source of truth. Every change to a session is one of these.

Each event has the session's next `version` (1 for `SessionCreated`), a UUIDv7
`id`, an `occurred_at` time, and a `data` payload typed per event type. The
events form a msgspec tagged union on `type`, so the log, the `/events` API and
the OpenAPI document share one definition.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from msgspec import UNSET, Struct, UnsetType

from shared.domain.wire import (
    ChatError,
    ChatParams,
    ChatResponse,
    Compaction,
    ContextOverflow,
    ContextReport,
    Message,
    MessageCreate,
    Multitask,
    Retention,
    ScheduleCreate,
    Tool,
)

SCHEMA_VERSION = 2
"""Bumped when a payload's shape changes; readers upcast older payloads (`shared.domain.upcast`).

2: `ChatRequested` lost the unused `up_to_seq`; `ChatFailed` holds its `error` as the job resource does."""


class SessionCreatedData(Struct, kw_only=True):
    agent_id: str | None = None
    user_id: str | None = None
    situation: str | None = None
    token_budget: int | None = None
    context_overflow: ContextOverflow | None = None
    multitask: Multitask = "enqueue"
    tools: list[Tool] = msgspec.field(default_factory=list)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    compaction: Compaction | None = None
    retention: Retention | None = None


class SessionUpdatedData(Struct, kw_only=True):
    """Only the fields that changed; a field set to null was cleared."""

    agent_id: str | None | UnsetType = UNSET
    user_id: str | None | UnsetType = UNSET
    situation: str | None | UnsetType = UNSET
    token_budget: int | None | UnsetType = UNSET
    context_overflow: ContextOverflow | None | UnsetType = UNSET
    multitask: Multitask | UnsetType = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET
    compaction: Compaction | None | UnsetType = UNSET
    retention: Retention | None | UnsetType = UNSET


class ToolsChangedData(Struct, kw_only=True):
    tools: list[Tool]


class SessionDeletedData(Struct, kw_only=True):
    pass


class MessageRemovedData(Struct, kw_only=True):
    message_id: str
    seq: int
    tool_call_ids: list[str] = msgspec.field(default_factory=list)
    """The tool calls the removed message made: they are no longer open."""


class ChatRequestedData(Struct, kw_only=True):
    job_id: str
    params: ChatParams
    message_ids: list[str]
    """The request's messages, stored by the `MessageAdded` events just before this one."""
    unsaved: list[MessageCreate] = msgspec.field(default_factory=list)
    """The request's messages when `save` is false: in the prompt, not in the conversation."""


class ContextBuiltData(ContextReport, kw_only=True):
    job_id: str


class SummaryAddedData(Struct, kw_only=True):
    """An `adaptive` summary of the conversation from its first message up to `up_to_seq` (it folds in the summary
    before it); later chats send it instead of those messages, which the log keeps."""

    job_id: str
    content: str
    up_to_seq: int
    summarized: list[str]
    """The messages this summary newly covers (the earlier ones are in the summary it folds in)."""
    model: str | None = None
    """The model that wrote it."""


class ChatCompletedData(Struct, kw_only=True):
    job_id: str
    message_id: str | None
    """The stored assistant message (None when the request had `save: false`)."""
    response: ChatResponse


class ChatFailedData(Struct, kw_only=True):
    job_id: str
    error: ChatError


class ChatCancelledData(Struct, kw_only=True):
    job_id: str
    reason: str
    message_id: str | None = None
    """The answer as far as the model got when it was stopped, stored as an assistant message (None: nothing
    streamed yet, or `save: false`)."""


class SessionForkedData(Struct, kw_only=True):
    """The first event of a fork's log: the parent's events 1..`version` follow it, one version later each (ids
    of the session, its events and its chat jobs made the fork's own; message ids kept), then the fork's own. The
    log reads those inherited events from the parent's (copy-on-write, `shared.domain.fork`); an imported fork
    stores them. Later in a log (a fork of a fork's inherited history) it changes nothing."""

    parent_id: str
    version: int


class ScheduleCreatedData(Struct, kw_only=True):
    schedule_id: str
    schedule: ScheduleCreate


class ScheduleUpdatedData(Struct, kw_only=True):
    """Only the fields that changed."""

    schedule_id: str
    cron: str | UnsetType = UNSET
    timezone: str | UnsetType = UNSET
    paused: bool | UnsetType = UNSET


class ScheduleDeletedData(Struct, kw_only=True):
    schedule_id: str


class ScheduleFiredData(Struct, kw_only=True):
    """A tick of a schedule was taken: it requested chat `job_id` (its `ChatRequested` just before, in the same append),
    or it was skipped (`skipped` says why; `missed_from`: the first of the ticks missed up to `tick`). A tick is
    taken once: later ones only."""

    schedule_id: str
    tick: datetime
    job_id: str | None = None
    skipped: str | None = None
    missed_from: datetime | None = None


class EventBase(Struct, kw_only=True, frozen=True, tag_field="type"):
    id: str
    version: int
    occurred_at: datetime


class SessionCreated(EventBase, tag=True, frozen=True):
    data: SessionCreatedData


class SessionUpdated(EventBase, tag=True, frozen=True):
    data: SessionUpdatedData


class ToolsChanged(EventBase, tag=True, frozen=True):
    data: ToolsChangedData


class MessageAdded(EventBase, tag=True, frozen=True):
    data: Message


class MessageEdited(EventBase, tag=True, frozen=True):
    """A message's content (or name) changed: `data` is the whole message as it is now (same id and seq)."""

    data: Message


class MessageRemoved(EventBase, tag=True, frozen=True):
    """A message left the conversation (its text stays in the log: time travel shows it)."""

    data: MessageRemovedData


class SessionDeleted(EventBase, tag=True, frozen=True):
    data: SessionDeletedData


class ChatRequested(EventBase, tag=True, frozen=True):
    data: ChatRequestedData


class ContextBuilt(EventBase, tag=True, frozen=True):
    data: ContextBuiltData


class SummaryAdded(EventBase, tag=True, frozen=True):
    data: SummaryAddedData


class ChatCompleted(EventBase, tag=True, frozen=True):
    data: ChatCompletedData


class ChatFailed(EventBase, tag=True, frozen=True):
    data: ChatFailedData


class ChatCancelled(EventBase, tag=True, frozen=True):
    data: ChatCancelledData


class SessionForked(EventBase, tag=True, frozen=True):
    data: SessionForkedData


class ScheduleCreated(EventBase, tag=True, frozen=True):
    data: ScheduleCreatedData


class ScheduleUpdated(EventBase, tag=True, frozen=True):
    data: ScheduleUpdatedData


class ScheduleDeleted(EventBase, tag=True, frozen=True):
    data: ScheduleDeletedData


class ScheduleFired(EventBase, tag=True, frozen=True):
    data: ScheduleFiredData


Event = (
    SessionCreated
    | SessionUpdated
    | ToolsChanged
    | MessageAdded
    | MessageEdited
    | MessageRemoved
    | SessionDeleted
    | ChatRequested
    | ContextBuilt
    | SummaryAdded
    | ChatCompleted
    | ChatFailed
    | ChatCancelled
    | ScheduleCreated
    | ScheduleUpdated
    | ScheduleDeleted
    | ScheduleFired
    | SessionForked
)

SCHEDULE_EVENTS = (ScheduleCreated, ScheduleUpdated, ScheduleDeleted, ScheduleFired)

CHAT_ENDED = (ChatCompleted, ChatFailed, ChatCancelled)

_DATA_DECODERS = {
    cls: msgspec.json.Decoder(next(f.type for f in msgspec.structs.fields(cls) if f.name == "data"))
    for cls in Event.__args__
}
_encode = msgspec.json.Encoder().encode


def check_readable(event: Event) -> None:
    """Raise `msgspec.ValidationError` if the log could not read this event back (a constraint of the wire types
    that code building the event skipped): such an entry would stop its session's projection for good."""
    _DATA_DECODERS[type(event)].decode(_encode(event.data))


class EventPage(Struct):
    """A page of a session's log, oldest first. `next` is the `after` of the next page; null on the last."""

    items: list[Event]
    next: int | None


class SessionPurgedData(Struct, kw_only=True):
    session_id: str
    user_id: str | None
    event_count: int


class SessionPurged(Struct, kw_only=True, frozen=True, tag_field="type", tag=True):
    """The tombstone a purge leaves in the tenant's audit stream: who and how much, never what."""

    id: str
    occurred_at: datetime
    data: SessionPurgedData


class AuditPage(Struct):
    """`next` is an opaque cursor to pass as `after`; null on the last page."""

    items: list[SessionPurged]
    next: str | None
