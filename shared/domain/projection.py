"""The projection: what a run of events changes in the read models, decided purely.

The projector folds a session's unprojected events with `evolve` and asks
`project` which read-model writes follow; the Redis adapter then applies the
whole `ReadModelUpdate` atomically together with the read model's version, so a
crash can neither lose nor double an event.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from msgspec import Struct

from shared.domain.events import Event, MessageAdded, SessionCreated, SessionDeleted, ToolsChanged
from shared.domain.model import Session
from shared.domain.state import SessionState, fold


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
    index: Literal["add", "remove"] | None
    """How the tenant's newest-first session index changes."""

    @property
    def to_version(self) -> int:
        return self.state.version

    @property
    def event_count(self) -> int:
        return self.state.version - self.from_version


def project(state: SessionState, events: Sequence[Event]) -> ReadModelUpdate:
    after = fold(state, events)
    index: Literal["add", "remove"] | None = None
    tools_changed = False
    versions: list[int] = []
    for e in events:
        match e:
            case SessionCreated():
                index, tools_changed = "add", True
            case ToolsChanged():
                tools_changed = True
            case MessageAdded():
                versions.append(e.version)
            case SessionDeleted():
                index = "remove"
    return ReadModelUpdate(
        session_id=state.id,
        from_version=state.version,
        state=after,
        session=after.session if after.exists else None,
        tools_changed=tools_changed,
        message_versions=versions,
        index=index,
    )
