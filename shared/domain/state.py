"""Session state and the pure fold from events to state.

`evolve` is the only place that knows how an event changes a session. The API
folds with it to validate commands, the projector to build read models, and
time travel to answer past versions, so all three agree by construction.
"""

from __future__ import annotations

from collections.abc import Iterable

from msgspec import UNSET, Struct, structs

from shared.domain.events import (
    Event,
    MessageAdded,
    SessionCreated,
    SessionDeleted,
    SessionUpdated,
    ToolsChanged,
)
from shared.domain.model import Session


class SessionState(Struct, kw_only=True):
    id: str
    version: int = 0
    """Version of the last event folded in; 0 before `SessionCreated`."""
    session: Session | None = None
    deleted: bool = False
    message_count: int = 0

    @property
    def exists(self) -> bool:
        return self.session is not None and not self.deleted


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
                tools=d.tools,
                metadata=d.metadata,
                version=event.version,
                created_at=at,
                updated_at=at,
            )
            return structs.replace(state, version=event.version, session=session)
        case SessionUpdated(data=d):
            changes = {f: v for f in d.__struct_fields__ if (v := getattr(d, f)) is not UNSET}
            session = structs.replace(_live(state), **changes, version=event.version, updated_at=at)
            return structs.replace(state, version=event.version, session=session)
        case ToolsChanged(data=d):
            session = structs.replace(_live(state), tools=d.tools, version=event.version, updated_at=at)
            return structs.replace(state, version=event.version, session=session)
        case MessageAdded(data=m):
            session = structs.replace(_live(state), version=event.version, updated_at=at)
            return structs.replace(state, version=event.version, session=session, message_count=m.seq)
        case SessionDeleted():
            _live(state)
            return structs.replace(state, version=event.version, deleted=True)
    raise TypeError(f"unknown event {type(event).__name__}")


def fold(state: SessionState, events: Iterable[Event]) -> SessionState:
    for event in events:
        state = evolve(state, event)
    return state


def _live(state: SessionState) -> Session:
    if state.session is None or state.deleted:
        raise ValueError(f"event applied to a session that does not exist: {state.id}")
    return state.session
