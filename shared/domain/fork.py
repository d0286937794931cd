"""Forking a session, purely: the fork's log from its parent's events.

A fork's log starts with `SessionForked {parent_id, version}`, then holds the parent's events 1..`version`, each
one version later and made the fork's own: the session's id, the events' ids and the chat jobs' ids are derived
from the fork's id (so the fork's jobs never share a job record, a chat slot or a chunk stream with the parent's);
message ids are kept (a message is the same message in both). Chats queued or running at that version are
cancelled in the fork, and its schedules deleted: the fork inherits the conversation, not the parent's work. So
the fork stands alone: time travel, export, rebuild and a purge of its parent all leave it whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import msgspec

from shared.domain.errors import DeletedAtVersion, NotFound
from shared.domain.events import (
    ChatCancelled,
    ChatCancelledData,
    ChatRequested,
    Event,
    ScheduleDeleted,
    ScheduleDeletedData,
    SessionForked,
    SessionForkedData,
    SessionUpdated,
    SessionUpdatedData,
)
from shared.domain.ids import derived_id
from shared.domain.state import SessionState, fold

__all__ = ["fork_events"]


def fork_events(
    parent_id: str,
    events: Sequence[Event],
    child_id: str,
    now: datetime,
    new_id: Callable[[], str],
    metadata: dict[str, Any] | None,
) -> list[Event]:
    """The fork's first events, from the parent's events 1..n (n ≥ 1, in order)."""
    parent = fold(SessionState(id=parent_id), events)
    if not parent.exists:
        raise (
            NotFound(f"session {parent_id} not found")
            if parent.session is None
            else DeletedAtVersion(
                f"session {parent_id} was deleted at version {parent.version}: fork an earlier version",
                {"version": parent.version},
            )
        )
    ids = {parent_id: child_id}
    for e in events:
        if isinstance(e, ChatRequested):
            ids[e.data.job_id] = derived_id(child_id, f"job/{e.data.job_id}")
    out: list[Event] = [
        SessionForked(
            id=new_id(),
            version=1,
            occurred_at=now,
            data=SessionForkedData(parent_id=parent_id, version=parent.version),
        )
    ]
    for e in events:
        raw = _renamed(msgspec.to_builtins(e), ids)
        raw.update(id=derived_id(child_id, f"event/{e.id}"), version=e.version + 1)
        out.append(msgspec.convert(raw, Event))

    def then(event_type: type, data: Any) -> None:
        out.append(event_type(id=new_id(), version=len(out) + 1, occurred_at=now, data=data))

    for chat in parent.active_chats:
        then(ChatCancelled, ChatCancelledData(job_id=ids[chat.job_id], reason="not carried into the fork"))
    for s in parent.schedules:
        then(ScheduleDeleted, ScheduleDeletedData(schedule_id=s.id))
    if metadata is not None:
        then(SessionUpdated, SessionUpdatedData(metadata=metadata))
    return out


def _renamed(node: Any, ids: dict[str, str]) -> Any:
    """`node` with every string that is a key of `ids` replaced by its value."""
    if isinstance(node, str):
        return ids.get(node, node)
    if isinstance(node, list):
        return [_renamed(v, ids) for v in node]
    if isinstance(node, dict):
        return {k: _renamed(v, ids) for k, v in node.items()}
    return node
