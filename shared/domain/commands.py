"""Commands and their handlers: `decide(state, command) -> events`, pure.

A handler checks the command against the current state and answers the events
that record it. Persisting them (with the expected-version check) is the
caller's job, so a handler can be re-run on fresher state after a conflict.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from msgspec import UNSET, Struct

from shared.domain.errors import Invalid, NotFound, VersionConflict
from shared.domain.events import (
    Event,
    MessageAdded,
    SessionCreated,
    SessionCreatedData,
    SessionDeleted,
    SessionDeletedData,
    SessionUpdated,
    SessionUpdatedData,
    ToolsChanged,
    ToolsChangedData,
)
from shared.domain.model import Content, Message, MessageCreate, SessionCreate, SessionPatch, Tool
from shared.domain.state import SessionState


class Limits(Struct, kw_only=True, frozen=True):
    max_content_chars: int = 100_000


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


class AddMessage(Struct, kw_only=True, frozen=True):
    body: MessageCreate


Command = CreateSession | UpdateSession | DeleteSession | AddMessage


def decide(state: SessionState, command: Command, stamp: Stamp, limits: Limits = Limits()) -> list[Event]:
    match command:
        case CreateSession():
            return _create(state, command, stamp, limits)
        case UpdateSession():
            return _update(state, command, stamp, limits)
        case DeleteSession():
            _check_live(state, command.expected_version)
            return [SessionDeleted(id=stamp.new_id(), version=state.version + 1, occurred_at=stamp.now, data=SessionDeletedData())]
        case AddMessage():
            return _add_message(state, command, stamp, limits)
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
        tools=b.tools,
        metadata=b.metadata,
    )
    return [SessionCreated(id=stamp.new_id(), version=1, occurred_at=stamp.now, data=data)]


def _update(state: SessionState, command: UpdateSession, stamp: Stamp, limits: Limits) -> list[Event]:
    _check_live(state, command.expected_version)
    p = command.patch
    _check_text("situation", p.situation, limits)
    changes = {
        f: getattr(p, f)
        for f in ("agent_id", "user_id", "situation", "token_budget", "context_overflow")
        if getattr(p, f) is not UNSET
    }
    if p.metadata is not UNSET:
        changes["metadata"] = p.metadata or {}
    events: list[Event] = []
    version = state.version
    if changes:
        version += 1
        events.append(SessionUpdated(id=stamp.new_id(), version=version, occurred_at=stamp.now, data=SessionUpdatedData(**changes)))
    if p.tools is not UNSET:
        tools = p.tools or []
        _check_tools(tools)
        version += 1
        events.append(ToolsChanged(id=stamp.new_id(), version=version, occurred_at=stamp.now, data=ToolsChangedData(tools=tools)))
    return events


def _add_message(state: SessionState, command: AddMessage, stamp: Stamp, limits: Limits) -> list[Event]:
    _check_live(state, None)
    b = command.body
    _check_content(b.content, limits)
    if b.role == "tool" and b.tool_call_id is None:
        raise Invalid("a message with role 'tool' needs a tool_call_id", {"field": "tool_call_id"})
    if b.role != "tool" and b.tool_call_id is not None:
        raise Invalid("only a message with role 'tool' may have a tool_call_id", {"field": "tool_call_id"})
    message = Message(
        id=stamp.new_id(),
        session_id=state.id,
        role=b.role,
        content=b.content,
        name=b.name,
        tool_call_id=b.tool_call_id,
        seq=state.message_count + 1,
        created_at=stamp.now,
    )
    return [MessageAdded(id=stamp.new_id(), version=state.version + 1, occurred_at=stamp.now, data=message)]


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
        raise Invalid(f"tool names must be unique in a session: {', '.join(dupes)}", {"field": "tools", "duplicates": dupes})
    for t in tools:
        params = t.function.parameters
        if params is not None and params.get("type", "object") != "object":
            raise Invalid(f"tool {t.function.name}: parameters must be a JSON Schema object", {"field": "tools"})


def _check_text(field: str, text: object, limits: Limits) -> None:
    if isinstance(text, str) and len(text) > limits.max_content_chars:
        raise Invalid(f"{field} is longer than {limits.max_content_chars} characters", {"field": field, "max": limits.max_content_chars})


def _check_content(content: Content, limits: Limits) -> None:
    if isinstance(content, str):
        size = len(content)
    else:
        size = sum(len(getattr(p, "text", "")) + len(getattr(getattr(p, "image_url", None), "url", "")) for p in content)
    if size > limits.max_content_chars:
        raise Invalid(f"content is longer than {limits.max_content_chars} characters", {"field": "content", "max": limits.max_content_chars})
