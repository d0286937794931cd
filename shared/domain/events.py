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

from shared.domain.model import ContextOverflow, Message, Tool

SCHEMA_VERSION = 1
"""Bumped when a payload's shape changes; readers upcast older payloads."""


class SessionCreatedData(Struct, kw_only=True):
    agent_id: str | None = None
    user_id: str | None = None
    situation: str | None = None
    token_budget: int | None = None
    context_overflow: ContextOverflow | None = None
    tools: list[Tool] = msgspec.field(default_factory=list)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class SessionUpdatedData(Struct, kw_only=True):
    """Only the fields that changed; a field set to null was cleared."""

    agent_id: str | None | UnsetType = UNSET
    user_id: str | None | UnsetType = UNSET
    situation: str | None | UnsetType = UNSET
    token_budget: int | None | UnsetType = UNSET
    context_overflow: ContextOverflow | None | UnsetType = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET


class ToolsChangedData(Struct, kw_only=True):
    tools: list[Tool]


class SessionDeletedData(Struct, kw_only=True):
    pass


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


class SessionDeleted(EventBase, tag=True, frozen=True):
    data: SessionDeletedData


Event = SessionCreated | SessionUpdated | ToolsChanged | MessageAdded | SessionDeleted

EVENT_TYPES: dict[str, type[EventBase]] = {
    cls.__name__: cls for cls in (SessionCreated, SessionUpdated, ToolsChanged, MessageAdded, SessionDeleted)
}


class EventPage(Struct):
    items: list[Event]
    next: int | None
