"""`shared.domain.fork.forked_state`: a copy-on-write fork is decided on its parent's state at the fork's version,
renamed, and that state must be exactly what folding the fork's whole history gives (its `SessionForked`, the
parent's events made the fork's own, its own events), at every version of a history that touches every field the
renaming changes: the parent's id in the resource, chat jobs queued, running and done, a summary, an edit and a
removal, schedules fired and skipped, a fork of a fork."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from shared.domain.commands import (
    AddMessage,
    AddSummary,
    Command,
    CompleteChat,
    CreateSchedule,
    CreateSession,
    DeleteSession,
    EditMessage,
    ForkSession,
    RemoveMessage,
    RequestChat,
    SkipTicks,
    Stamp,
    Tick,
    UpdateSession,
    decide,
)
from shared.domain.errors import DeletedAtVersion, NotFound
from shared.domain.events import Event, MessageAdded
from shared.domain.fork import fork_events, forked_state
from shared.domain.ids import uuid7
from shared.domain.state import SessionState, fold
from shared.domain.wire import (
    AssistantMessage,
    ChatChoice,
    ChatRequest,
    ChatResponse,
    FunctionCall,
    MessageCreate,
    ScheduleCreate,
    SessionCreate,
    SessionPatch,
    ToolCall,
    Usage,
)

NOW = datetime(2026, 12, 4, 12, tzinfo=UTC)


def ids(prefix: str) -> Callable[[], str]:
    """The same ids in the same order for every call of a decision made twice."""
    counter = itertools.count()
    return lambda: f"{prefix}-{next(counter)}"


def history(sid: str) -> list[Event]:
    """A session that uses every part of its state a fork renames or carries over."""
    state, events = SessionState(id=sid), []
    done, running, queued = uuid7(), uuid7(), uuid7()
    schedule = uuid7()

    def run(command: Command) -> None:
        nonlocal state
        new = decide(state, command, Stamp(now=NOW + timedelta(seconds=len(events)), new_id=uuid7))
        state = fold(state, new)
        events.extend(new)

    def message(seq: int) -> MessageAdded:
        return next(e for e in events if isinstance(e, MessageAdded) and e.data.seq == seq)

    run(CreateSession(body=SessionCreate(situation=sid, metadata={"origin": sid, "both": [sid, "x"]})))
    run(AddMessage(body=MessageCreate(role="system", content="Be brief.")))
    run(AddMessage(body=MessageCreate(role="user", content=sid)))
    calls = [ToolCall(id=f"call-{i}", function=FunctionCall(name="f", arguments="{}")) for i in (1, 2)]
    run(AddMessage(body=MessageCreate(role="assistant", tool_calls=calls)))
    run(AddMessage(body=MessageCreate(role="tool", content="ok", tool_call_id="call-1")))
    run(
        RequestChat(
            job_id=done, request=ChatRequest(messages=[MessageCreate(role="user", content="hi")]), default_model="m"
        )
    )
    run(AddSummary(job_id=done, content=sid, up_to_seq=2, summarized=[message(2).data.id]))
    answer = ChatResponse(
        id=done,
        session_id=sid,
        created_at=NOW,
        model="m",
        choices=[ChatChoice(finish_reason="stop", message=AssistantMessage(content=sid))],
        usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2),
    )
    run(CompleteChat(job_id=done, response=answer, save=True))
    run(EditMessage(message=message(3).data, content="edited"))
    run(RemoveMessage(message=message(5).data))
    named = [ToolCall(id=sid, function=FunctionCall(name="f", arguments="{}"))]  # a client's id, whatever it is
    run(AddMessage(body=MessageCreate(role="assistant", tool_calls=named)))
    run(RemoveMessage(message=message(state.message_count).data))
    body = ScheduleCreate(cron="*/5 * * * *", messages=[MessageCreate(role="user", content=sid)])
    run(CreateSchedule(schedule_id=schedule, body=body))
    run(SkipTicks(tick=Tick(schedule_id=schedule, at=NOW + timedelta(minutes=5)), reason="missed"))
    tick = Tick(schedule_id=schedule, at=NOW + timedelta(minutes=10))
    run(RequestChat(job_id=running, request=ChatRequest(), default_model="m", tick=tick))
    run(RequestChat(job_id=queued, request=ChatRequest(run_at="2027-01-01T00:00:00Z"), default_model="m"))
    run(UpdateSession(patch=SessionPatch(metadata={"again": sid})))
    return events


def both_ways(parent: SessionState, events: list[Event], child: str) -> tuple[SessionState, SessionState]:
    """(the fork's state decided copy-on-write, the fold of the history its log shows), with the same own ids."""
    own = fork_events(parent, (), child, NOW, ids("own"), {"fork": parent.id})
    copied = fork_events(parent, events, child, NOW, ids("own"), {"fork": parent.id})
    inherited_only = copied[: len(events) + 1]  # before its own events cancel the chats and delete the schedules
    assert forked_state(parent, own[:1], child) == fold(SessionState(id=child), inherited_only)
    return forked_state(parent, own, child), fold(SessionState(id=child), copied)


def test_a_forks_state_at_every_version_is_its_parents_renamed() -> None:
    parent_id, child = uuid7(), uuid7()
    events = history(parent_id)
    for n in range(1, len(events) + 1):
        at = fold(SessionState(id=parent_id), events[:n])
        decided, folded = both_ways(at, events[:n], child)
        assert decided == folded, f"at version {n}"
    assert folded.session is not None and folded.session.metadata == {"fork": parent_id}
    assert folded.active_chats == () and folded.schedules == ()  # cancelled and deleted in the fork


def test_a_fork_of_a_fork_is_renamed_from_its_parent_not_its_origin() -> None:
    root, parent_id, child = uuid7(), uuid7(), uuid7()
    events = history(root)
    at = fold(SessionState(id=root), events)
    parent_log = fork_events(at, events, parent_id, NOW, uuid7, None)
    parent = fold(SessionState(id=parent_id), parent_log)
    decided, folded = both_ways(parent, parent_log, child)
    assert decided == folded
    assert decided.forked_from is not None and decided.forked_from.session_id == parent_id


def test_a_fork_is_decided_only_on_a_live_parent_and_copies_only_a_whole_history() -> None:
    parent_id = uuid7()
    with pytest.raises(NotFound):
        decide(SessionState(id=uuid7()), ForkSession(parent=SessionState(id=parent_id)), Stamp(now=NOW, new_id=uuid7))
    events = history(parent_id)
    parent = fold(SessionState(id=parent_id), events)
    deleted = fold(parent, decide(parent, DeleteSession(), Stamp(now=NOW, new_id=uuid7)))
    with pytest.raises(DeletedAtVersion):
        decide(SessionState(id=uuid7()), ForkSession(parent=deleted), Stamp(now=NOW, new_id=uuid7))
    with pytest.raises(ValueError):
        fork_events(parent, events[:3], uuid7(), NOW, uuid7, None)
