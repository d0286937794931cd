"""The pure part of finding sessions: a session's index entries, merging partitions' pages, the cursor and the
request's validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.domain.errors import Invalid
from shared.domain.search import (
    MAX_INDEXED_METADATA,
    PartitionPage,
    Position,
    Query,
    decode_cursor,
    encode_cursor,
    entries,
    matches,
    merge,
    parse_fields,
    query_of,
    term,
)
from shared.domain.state import ActiveChat, SessionState
from shared.domain.wire import Session, SessionFields

AT = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def state(sid: str = "s1", deleted: bool = False, busy: bool = False, **fields: object) -> SessionState:
    base: dict[str, object] = {
        "id": sid,
        "agent_id": "a",
        "user_id": "u",
        "situation": None,
        "token_budget": None,
        "context_overflow": None,
        "tools": [],
        "metadata": {},
        "version": 1,
        "created_at": AT,
        "updated_at": AT + timedelta(seconds=1),
    }
    session = Session(**{**base, **fields})  # type: ignore[arg-type]
    chats = (ActiveChat(job_id="j", requested_at=1),) if busy else ()
    return SessionState(id=sid, version=1, session=session, deleted=deleted, active_chats=chats)


def test_a_session_has_one_member_per_order_and_term_and_a_record():
    members = entries(state(metadata={"tier": 3, "vip": True, "nested": {"x": 1}, "note": None}))
    terms = {m.rsplit("\x00", 3)[0] for m in members if not m.startswith("#")}
    assert terms == {
        "*",
        term("a", "a"),
        term("u", "u"),
        term("m", "tier", "3"),
        term("m", "vip", "true"),
        term("m", "note", "null"),
        term("s", "idle"),
    }
    assert len(members) == 1 + 2 * len(terms)  # nested values are not indexed
    assert sum(m.startswith("#\x00s1\x00") for m in members) == 1
    assert entries(state(deleted=True)) == []
    assert term("s", "busy") + "\x00c\x00" in "".join(entries(state(busy=True)))


def test_metadata_indexing_is_bounded_and_values_cannot_forge_a_separator():
    many = {f"k{i:02d}": i for i in range(40)}
    members = entries(state(metadata=many))
    assert sum(m.startswith("m\x00") for m in members) == 2 * MAX_INDEXED_METADATA
    sneaky = entries(state(agent_id="x\x00c\x00999"))
    assert all(m.count("\x00") in (3, 4) for m in sneaky if m.startswith("a"))
    assert matches(sneaky, "s1", query_of(agent_id="x\x00c\x00999"))
    assert not matches(sneaky, "s1", query_of(agent_id="x"))


def test_matches_checks_every_filter_and_both_ranges():
    members = entries(state(metadata={"tier": 3}))
    assert matches(members, "s1", query_of(agent_id="a", user_id="u", metadata={"tier": "3"}, status="idle"))
    assert not matches(members, "s1", query_of(agent_id="a", status="busy"))
    assert matches(members, "s1", query_of(created_after=AT, updated_before=AT + timedelta(seconds=1)))
    assert not matches(members, "s1", query_of(updated_before=AT))
    assert matches(members, "s1", query_of(created_before=AT.replace(tzinfo=None)))  # naive: UTC


def P(ms: int, sid: str = "x") -> Position:
    return Position(ms, sid)


def test_merge_stops_at_the_least_advanced_partition():
    done = PartitionPage([P(9), P(5), P(1)], None)
    stopped = PartitionPage([P(8)], P(6))  # walked down to 6 only: below it is unknown
    page = merge([done, stopped], 10, descending=True)
    assert page.positions == [P(9), P(8)] and page.next == P(6)
    page = merge([done, PartitionPage([], None)], 2, descending=True)
    assert page.positions == [P(9), P(5)] and page.next == P(5)
    page = merge([done, PartitionPage([], None)], 3, descending=True)
    assert page.positions == [P(9), P(5), P(1)] and page.next is None
    page = merge([PartitionPage([P(1), P(4)], P(4)), PartitionPage([P(2)], None)], 2, descending=False)
    assert page.positions == [P(1), P(2)] and page.next == P(2)


@given(
    st.lists(st.lists(st.integers(0, 50), unique=True), min_size=1, max_size=4), st.integers(1, 5), st.integers(1, 4)
)
def test_a_walk_over_budgeted_partitions_answers_every_match_once(parts, limit, budget):
    """A model of FIND: each partition walks at most `budget` of its sorted entries after the cursor."""
    everything = sorted(P(ms, str(i)) for i, ms_list in enumerate(parts) for ms in ms_list)
    seen: list[Position] = []
    after: Position | None = None
    for _ in range(1000):
        pages = []
        for i, ms_list in enumerate(parts):
            rest = sorted(p for p in (P(ms, str(i)) for ms in ms_list) if after is None or p > after)
            walked = rest[:budget]
            found = walked[:limit]
            stopped = found[-1] if len(found) == limit else (walked[-1] if len(rest) > budget else None)
            pages.append(PartitionPage(found, stopped))
        page = merge(pages, limit, descending=False)
        seen += page.positions
        if page.next is None:
            break
        after = page.next
    assert seen == everything


def test_a_cursor_belongs_to_its_query():
    q = query_of(agent_id="a", sort="updated_at")
    text = encode_cursor(q, P(123, "s9"))
    assert decode_cursor(q, text) == P(123, "s9")
    for other in (query_of(agent_id="b", sort="updated_at"), query_of(agent_id="a")):
        with pytest.raises(ValueError):
            decode_cursor(other, text)
    for junk in ("", "abc", "!!!!", encode_cursor(Query(), P(1, "x"))[:-3]):
        with pytest.raises(ValueError):
            decode_cursor(q, junk)


def test_bad_requests_are_invalid():
    with pytest.raises(Invalid):
        query_of(sort="name")
    with pytest.raises(Invalid):
        query_of(metadata={f"k{i}": "v" for i in range(9)})
    with pytest.raises(Invalid):
        query_of(metadata={"k": "v" * 257})
    with pytest.raises(Invalid) as e:
        parse_fields("id,secret")
    assert e.value.details == {"query": "fields"}
    assert parse_fields("metadata,id,metadata") == ("id", "metadata")
    assert parse_fields(None) is None


def test_a_list_item_has_every_field_of_the_session():
    """`SessionFields` (what a list answers, with or without `fields=`) keeps up with `Session`."""
    assert SessionFields.__struct_fields__ == Session.__struct_fields__
