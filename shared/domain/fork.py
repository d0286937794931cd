"""Forking a session, purely: the fork's log and state from its parent's state at the fork's version.

A fork's log starts with `SessionForked {parent_id, version}`, then shows the parent's events 1..`version`, each
one version later and made the fork's own (`inherited`): the session's id, the events' ids and the chat jobs' ids
are derived from the fork's id (so the fork's jobs never share a job record, a chat slot or a chunk stream with the
parent's); message ids are kept (a message is the same message in both). Chats queued or running at that version
are cancelled in the fork, and its schedules deleted: the fork inherits the conversation, not the parent's work.

The inherited events are not stored twice (copy-on-write): the fork's first append stores its `SessionForked` and
its own events, and a log read of versions 2..`version + 1` reads the parent's 1..`version` and makes them the
fork's own as it goes (`shared.adapters.forks`). Only the fork's own events are its storage; its parent's history
cannot change below `version`, and a purge of the parent is refused while a fork reads it. Deciding a fork reads
none of that history either: the fork's state after it is its parent's at `version`, renamed (`forked_state`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import msgspec

from shared.domain.errors import DeletedAtVersion, NotFound
from shared.domain.events import (
    ChatCancelled,
    ChatCancelledData,
    Event,
    MessageAdded,
    MessageEdited,
    MessageRemoved,
    ScheduleDeleted,
    ScheduleDeletedData,
    SessionForked,
    SessionForkedData,
    SessionUpdated,
    SessionUpdatedData,
)
from shared.domain.ids import derived_id
from shared.domain.state import SessionState, fold
from shared.domain.wire import ForkedFrom

__all__ = ["MAX_CHAIN", "fork_events", "forked_state", "inherited"]

T = TypeVar("T")

MAX_CHAIN = 8
"""A fork of a session whose reads already walk this many copy-on-write parents stores its inherited events
(`ForkSession.events`; `EventLog.fork_depth`): every read of a copy-on-write fork's inherited history walks its
chain of parents, a step per fork, and a fork that stores its history starts the chain again."""


def fork_events(
    parent: SessionState,
    events: Sequence[Event],
    child_id: str,
    now: datetime,
    new_id: Callable[[], str],
    metadata: dict[str, Any] | None,
) -> list[Event]:
    """The fork's first events, decided on its parent's state at the fork's version (`parent.version`, ≥ 1).

    Copy-on-write (`events` empty): its `SessionForked` and its own events, which follow the inherited versions
    2..`parent.version + 1` its log reads from the parent's. Given the parent's events 1..`parent.version`, the
    inherited ones made the fork's own are among them, to be stored (`ForkSession.events`)."""
    if not parent.exists:
        raise (
            NotFound(f"session {parent.id} not found")
            if parent.session is None
            else DeletedAtVersion(
                f"session {parent.id} was deleted at version {parent.version}: fork an earlier version",
                {"version": parent.version},
            )
        )
    if events and (len(events) != parent.version or events[-1].version != parent.version):
        raise ValueError(f"a copied fork needs its parent's events 1..{parent.version}")
    out: list[Event] = [
        SessionForked(
            id=new_id(),
            version=1,
            occurred_at=now,
            data=SessionForkedData(parent_id=parent.id, version=parent.version),
        )
    ]
    out += inherited(parent.id, child_id, events)

    def then(event_type: type, data: Any) -> None:
        own = len(out) - len(events)  # its SessionForked and the own events before this one
        out.append(event_type(id=new_id(), version=parent.version + own + 1, occurred_at=now, data=data))

    for chat in parent.active_chats:
        then(ChatCancelled, ChatCancelledData(job_id=_job(child_id, chat.job_id), reason="not carried into the fork"))
    for s in parent.schedules:
        then(ScheduleDeleted, ScheduleDeletedData(schedule_id=s.id))
    if metadata is not None:
        then(SessionUpdated, SessionUpdatedData(metadata=metadata))
    return out


def forked_state(parent: SessionState, events: Sequence[Event], child_id: str) -> SessionState:
    """The fork's state after its copy-on-write first events (`fork_events` without the parent's events), from its
    parent's state at the fork's version: what folding its `SessionForked`, the `inherited` events and its own
    gives, without reading the inherited ones, so deciding a fork costs the same on any length of history.
    Everything `inherited` renames is renamed here: the parent's id wherever the resource shows it, the chat
    jobs' ids; every version one later."""
    forked, own = events[0], events[1:]
    if not isinstance(forked, SessionForked) or forked.data.version != parent.version:
        raise ValueError("a fork's first event is its SessionForked at its parent's version")
    ids = {parent.id: child_id}
    origin = ForkedFrom(session_id=forked.data.parent_id, version=forked.data.version)
    session = parent.session
    if session is not None:
        session = msgspec.structs.replace(
            _convert(session, ids), id=child_id, forked_from=origin, version=session.version + 1
        )
    summary = _convert(parent.summary, ids) if parent.summary is not None else None
    schedules = []
    for s in parent.schedules:
        s = _convert(s, ids)
        if s.last_job_id is not None:
            s = msgspec.structs.replace(s, last_job_id=_job(child_id, s.last_job_id))
        schedules.append(s)
    inherited_state = msgspec.structs.replace(
        parent,
        id=child_id,
        version=parent.version + 1,
        session=session,
        active_chats=tuple(
            msgspec.structs.replace(c, job_id=_job(child_id, c.job_id), requested_at=c.requested_at + 1)
            for c in parent.active_chats
        ),
        summary=summary,
        amended=parent.amended + 1 if parent.amended else 0,
        schedules=tuple(schedules),
        forked_from=origin,
    )
    return fold(inherited_state, own)


def inherited(parent_id: str, child_id: str, events: Sequence[Event]) -> list[Event]:
    """The parent's events as the fork shows them: one version later, the event's id derived from the fork's, and
    the ids it names made the fork's: the parent's id and the event's chat job's, wherever they appear (a
    `ChatCompleted`'s response names both); in a message, its `session_id` alone (its content is the user's); in
    a removal, nothing.
    Per event, so any range of the parent's log can be made the fork's on its own."""
    out: list[Event] = []
    for e in events:
        data: Any = e.data
        if isinstance(e, (MessageAdded, MessageEdited)):
            if data.session_id == parent_id:
                data = msgspec.structs.replace(data, session_id=child_id)
        elif isinstance(e, MessageRemoved):
            pass  # it names its message and the tool calls it made (the client's ids): nothing of the session's
        else:
            ids = {parent_id: child_id}
            if (job_id := getattr(data, "job_id", None)) is not None:
                ids[job_id] = _job(child_id, job_id)
            data = _convert(data, ids)
        out.append(
            msgspec.structs.replace(e, id=derived_id(child_id, f"event/{e.id}"), version=e.version + 1, data=data)
        )
    return out


def _job(child_id: str, job_id: str) -> str:
    return derived_id(child_id, f"job/{job_id}")


def _convert(obj: T, ids: dict[str, str]) -> T:
    """`obj` with `_renamed` applied to its fields (an event's data, a part of a state)."""
    return msgspec.convert(_renamed(msgspec.to_builtins(obj), ids), type(obj))


def _renamed(node: Any, ids: dict[str, str]) -> Any:
    """`node` with every string that is a key of `ids` replaced by its value."""
    if isinstance(node, str):
        return ids.get(node, node)
    if isinstance(node, list):
        return [_renamed(v, ids) for v in node]
    if isinstance(node, dict):
        return {k: _renamed(v, ids) for k, v in node.items()}
    return node
