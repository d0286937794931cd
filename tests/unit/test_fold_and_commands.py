"""The pure domain: commands decide events, `evolve` folds them, `project` plans read-model writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count

import pytest
from msgspec import UNSET

from shared.domain.commands import AddMessage, CreateSession, DeleteSession, Limits, Stamp, UpdateSession, decide
from shared.domain.errors import Invalid, NotFound, VersionConflict
from shared.domain.events import MessageAdded, SessionCreated, SessionDeleted, SessionUpdated, ToolsChanged
from shared.domain.projection import project
from shared.domain.state import ActiveChat, SessionState, evolve, fold, queued
from shared.domain.wire import FunctionDef, MessageCreate, SessionCreate, SessionPatch, Tool

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def stamp() -> Stamp:
    ids = count(1)
    return Stamp(now=T0, new_id=lambda: f"id-{next(ids)}")


def tool(name: str) -> Tool:
    return Tool(type="function", function=FunctionDef(name=name, parameters={"type": "object"}))


def run(state: SessionState, *commands) -> SessionState:
    for c in commands:
        state = fold(state, decide(state, c, stamp()))
    return state


def created(**fields) -> SessionState:
    return run(SessionState(id="s1"), CreateSession(body=SessionCreate(**fields)))


def test_create_gives_version_1_and_the_session_fields():
    state = created(agent_id="a", situation="be brief", tools=[tool("f")])
    assert state.version == 1 and state.exists
    assert state.session.agent_id == "a" and state.session.situation == "be brief"
    assert [t.function.name for t in state.session.tools] == ["f"]
    assert state.session.created_at == state.session.updated_at == T0


def test_create_twice_is_refused():
    with pytest.raises(Invalid):
        decide(created(), CreateSession(body=SessionCreate()), stamp())


def test_patch_changes_only_present_fields_and_null_clears():
    state = run(created(agent_id="a", user_id="u"), UpdateSession(patch=SessionPatch(agent_id=None)))
    assert state.session.agent_id is None and state.session.user_id == "u" and state.version == 2


def test_patch_with_tools_is_two_events_one_version_each():
    events = decide(created(), UpdateSession(patch=SessionPatch(situation="x", tools=[tool("g")])), stamp())
    assert [type(e) for e in events] == [SessionUpdated, ToolsChanged]
    assert [e.version for e in events] == [2, 3]
    assert events[0].data.agent_id is UNSET


def test_empty_patch_appends_nothing():
    assert decide(created(), UpdateSession(patch=SessionPatch()), stamp()) == []


def test_stale_expected_version_is_a_conflict():
    with pytest.raises(VersionConflict):
        decide(created(), UpdateSession(patch=SessionPatch(agent_id="b"), expected_version=7), stamp())


def test_duplicate_tool_names_are_refused():
    with pytest.raises(Invalid):
        decide(SessionState(id="s"), CreateSession(body=SessionCreate(tools=[tool("f"), tool("f")])), stamp())


def test_messages_get_consecutive_seq():
    state = created()
    for i in range(3):
        state = run(state, AddMessage(body=MessageCreate(role="user", content=f"m{i}")))
    assert state.message_count == 3 and state.version == 4


@pytest.mark.parametrize(
    "body",
    [MessageCreate(role="tool", content="x"), MessageCreate(role="user", content="x", tool_call_id="c1")],
)
def test_tool_call_id_goes_with_role_tool_only(body):
    with pytest.raises(Invalid):
        decide(created(), AddMessage(body=body), stamp())


def test_content_over_the_limit_is_refused():
    with pytest.raises(Invalid):
        decide(
            created(),
            AddMessage(body=MessageCreate(role="user", content="x" * 11)),
            stamp(),
            Limits(max_content_chars=10),
        )


def test_deleted_session_refuses_everything():
    state = run(created(), DeleteSession())
    assert state.deleted and not state.exists
    for command in (
        DeleteSession(),
        UpdateSession(patch=SessionPatch(agent_id="x")),
        AddMessage(body=MessageCreate(role="user", content="x")),
    ):
        with pytest.raises(NotFound):
            decide(state, command, stamp())


def test_evolve_refuses_a_gap_in_versions():
    event = decide(created(), AddMessage(body=MessageCreate(role="user", content="x")), stamp())[0]
    with pytest.raises(ValueError):
        evolve(SessionState(id="s1"), event)


def test_project_plans_index_messages_and_removal():
    start = SessionState(id="s1")
    events = decide(start, CreateSession(body=SessionCreate()), stamp())
    after_create = fold(start, events)
    events += decide(after_create, AddMessage(body=MessageCreate(role="user", content="hi")), stamp())
    update = project(start, events)
    assert update.index == "add" and update.message_versions == [2] and update.tools_changed
    assert update.from_version == 0 and update.to_version == 2 and update.event_count == 2
    deleted = project(update.state, decide(update.state, DeleteSession(), stamp()))
    assert deleted.index == "remove" and deleted.session is None
    assert [type(e) for e in events] == [SessionCreated, MessageAdded]
    assert isinstance(decide(update.state, DeleteSession(), stamp())[0], SessionDeleted)


def test_uuid7_ids_are_version_7_and_sort_by_creation():
    import uuid

    from shared.domain.ids import parse_uuid, uuid7

    ids = [uuid7() for _ in range(5000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    parsed = uuid.UUID(ids[0])
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122 and str(parsed) == ids[0]
    assert parse_uuid(ids[0].upper()) == ids[0] and parse_uuid("not-a-uuid") is None


def test_a_tool_result_answers_an_open_call_once_and_the_state_keeps_only_open_calls():
    from shared.domain.wire import FunctionCall, ToolCall

    call = lambda i: ToolCall(id=f"call_{i}", function=FunctionCall(name="lookup", arguments="{}"))  # noqa: E731
    s = run(created(), AddMessage(body=MessageCreate(role="assistant", content=None, tool_calls=[call(1), call(2)])))
    assert s.open_tool_calls == {"call_1", "call_2"}
    s = run(s, AddMessage(body=MessageCreate(role="tool", content="42", tool_call_id="call_1")))
    assert s.open_tool_calls == {"call_2"}
    with pytest.raises(Invalid, match="answers no open tool call"):
        decide(s, AddMessage(body=MessageCreate(role="tool", content="again", tool_call_id="call_1")), stamp())
    s = run(s, AddMessage(body=MessageCreate(role="tool", content="7", tool_call_id="call_2")))
    assert s.open_tool_calls == frozenset()  # however many calls a session made, its state holds none of them now


def test_chats_queue_in_the_order_they_are_due_and_only_waiting_scheduled_ones_are_overtaken() -> None:
    t = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)

    def chat(job: str, version: int, in_s: float | None = None) -> ActiveChat:
        return ActiveChat(job, version, None if in_s is None else t + timedelta(seconds=in_s))

    running, hour, minute = chat("running", 1), chat("hour", 2, 3_600), chat("minute", 3, 60)
    chats = queued(queued((running,), hour, t), minute, t)
    assert [c.job_id for c in chats] == ["running", "minute", "hour"]  # scheduled ones by their time
    now = queued(chats, chat("now", 4), t)
    assert [c.job_id for c in now] == ["running", "now", "minute", "hour"]  # ahead of those waiting, after the rest
    again = queued(now, chat("again", 5), t)
    assert [c.job_id for c in again] == ["running", "now", "again", "minute", "hour"]  # request order among equals
    # a scheduled chat due within OVERTAKE_MARGIN may be running already (and clocks differ): it keeps its place
    close = queued((chat("close", 1, 0.9),), chat("late", 2), t)
    assert [c.job_id for c in close] == ["close", "late"]
    past = queued((chat("due", 1, 30),), chat("overdue", 2, -60), t)  # a past time is now
    assert [c.job_id for c in past] == ["overdue", "due"]
