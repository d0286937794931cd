"""Property: any sequence of valid commands gives the same state folded at once or projected in any batching."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.domain.commands import AddMessage, CreateSession, DeleteSession, Stamp, UpdateSession, decide
from shared.domain.errors import DomainError
from shared.domain.events import Event
from shared.domain.projection import project
from shared.domain.state import SessionState, fold
from shared.domain.wire import FunctionDef, MessageCreate, SessionCreate, SessionPatch, Tool

text = st.text(max_size=20)
maybe = lambda s: st.none() | s  # noqa: E731
tools = st.lists(st.sampled_from(["a", "b", "c"]), unique=True, max_size=3).map(
    lambda names: [Tool(type="function", function=FunctionDef(name=n)) for n in names]
)
patch = st.builds(
    SessionPatch,
    agent_id=maybe(text),
    situation=maybe(text),
    token_budget=maybe(st.integers(1, 10_000)),
    context_overflow=st.sampled_from([None, "truncate", "adaptive"]),
    tools=maybe(tools),
    metadata=maybe(st.dictionaries(st.sampled_from(["k", "j"]), st.integers())),
)
message = st.builds(MessageCreate, role=st.sampled_from(["system", "user", "assistant"]), content=text)
command = st.one_of(
    patch.map(lambda p: UpdateSession(patch=p)),
    message.map(lambda m: AddMessage(body=m)),
    message.map(lambda m: AddMessage(body=m)),
    st.just(DeleteSession()),
)


def history(commands) -> list[Event]:
    """The events the valid prefix of `commands` produces (invalid ones are refused, as the API would)."""
    ids = count()
    state = SessionState(id="s")
    events: list[Event] = []
    t = datetime(2026, 1, 1, tzinfo=UTC)
    for i, c in enumerate([CreateSession(body=SessionCreate(tools=[]))] + commands):
        try:
            new = decide(state, c, Stamp(now=t + timedelta(seconds=i), new_id=lambda: f"e{next(ids)}"))
        except DomainError:
            continue
        state = fold(state, new)
        events += new
    return events


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(command, max_size=30), st.lists(st.integers(1, 7), min_size=1, max_size=30))
def test_projecting_in_any_batching_equals_folding_at_once(commands, batch_sizes):
    events = history(commands)
    at_once = fold(SessionState(id="s"), events)

    state, message_versions, index, i, sizes = SessionState(id="s"), [], None, 0, iter(batch_sizes * 30)
    while i < len(events):
        n = next(sizes)
        update = project(state, events[i : i + n])
        assert update.from_version == state.version
        state = update.state
        message_versions += update.message_versions
        index = update.index or index
        i += n

    assert state == at_once
    assert message_versions == [e.version for e in events if type(e).__name__ == "MessageAdded"]
    assert index == ("remove" if at_once.deleted else "add")
    assert len(message_versions) == at_once.message_count
