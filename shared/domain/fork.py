"""Forking a session, purely: the fork's log from its parent's events.

A fork's log starts with `SessionForked {parent_id, version}`, then shows the parent's events 1..`version`, each
one version later and made the fork's own (`inherited`): the session's id, the events' ids and the chat jobs' ids
are derived from the fork's id (so the fork's jobs never share a job record, a chat slot or a chunk stream with the
parent's); message ids are kept (a message is the same message in both). Chats queued or running at that version
are cancelled in the fork, and its schedules deleted: the fork inherits the conversation, not the parent's work.

The inherited events are not stored twice (copy-on-write): the fork's first append stores its `SessionForked` and
its own events (`stored`), and a log read of versions 2..`version + 1` reads the parent's 1..`version` and makes
them the fork's own as it goes (`shared.adapters.forks`). Only the fork's own events are its storage; its parent's
history cannot change below `version`, and a purge of the parent is refused while a fork reads it.
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

__all__ = ["fork_events", "inherited", "shares", "stored"]


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
    out: list[Event] = [
        SessionForked(
            id=new_id(),
            version=1,
            occurred_at=now,
            data=SessionForkedData(parent_id=parent_id, version=parent.version),
        )
    ]
    out += inherited(parent_id, child_id, events)

    def then(event_type: type, data: Any) -> None:
        out.append(event_type(id=new_id(), version=len(out) + 1, occurred_at=now, data=data))

    for chat in parent.active_chats:
        then(ChatCancelled, ChatCancelledData(job_id=_job(child_id, chat.job_id), reason="not carried into the fork"))
    for s in parent.schedules:
        then(ScheduleDeleted, ScheduleDeletedData(schedule_id=s.id))
    if metadata is not None:
        then(SessionUpdated, SessionUpdatedData(metadata=metadata))
    return out


def inherited(parent_id: str, child_id: str, events: Sequence[Event]) -> list[Event]:
    """The parent's events as the fork shows them: one version later, the event's id derived from the fork's, and
    the ids the data names made the fork's (`session_id`: a message's session; `job_id`: the chat job's). Per
    event, so any range of the parent's log can be made the fork's on its own."""
    out: list[Event] = []
    for e in events:
        data: Any = e.data
        ids: dict[str, str] = {}
        if getattr(data, "session_id", None) == parent_id:
            ids["session_id"] = child_id
        if (job_id := getattr(data, "job_id", None)) is not None:
            ids["job_id"] = _job(child_id, job_id)
        made = msgspec.structs.replace(e, id=derived_id(child_id, f"event/{e.id}"), version=e.version + 1)
        out.append(msgspec.structs.replace(made, data=msgspec.structs.replace(data, **ids)) if ids else made)
    return out


def stored(events: Sequence[Event]) -> list[Event]:
    """What a fork's first append stores: its `SessionForked` and its own events, not the inherited ones."""
    match events[0] if events else None:
        case SessionForked(data=d):
            return [e for e in events if not 1 < e.version <= d.version + 1]
    return list(events)


def shares(events: Sequence[Event]) -> tuple[str, int] | None:
    """(parent id, the last inherited version) if these are a copy-on-write fork's first events (`stored`: its
    `SessionForked`, then only events after the inherited range); None for any other append, an imported fork's
    (whose inherited events are stored) included."""
    match events[0] if events else None:
        case SessionForked(data=d) if all(e.version > d.version + 1 for e in events[1:]):
            return d.parent_id, d.version + 1
    return None


def _job(child_id: str, job_id: str) -> str:
    return derived_id(child_id, f"job/{job_id}")
