"""`shared.adapters.forks.complete`: a read of a log that lacks a copy-on-write fork's inherited versions gets them
from the parent's, made the fork's own; a read of a log purged while it was read answers what it read up to the
gap, never a run with a hole in it."""

from __future__ import annotations

from datetime import UTC, datetime

from shared.adapters.codec import decode_event, log_fields
from shared.adapters.forks import Entry, complete
from shared.domain.events import Event, MessageAdded, SessionForked, SessionForkedData
from shared.domain.ids import uuid7
from shared.domain.wire import Message

PARENT, CHILD = uuid7(), uuid7()
NOW = datetime(2026, 12, 4, tzinfo=UTC)


def message(session_id: str, version: int) -> Event:
    body = Message(
        id=f"m{version}", session_id=session_id, role="user", content=f"c{version}", name=None, tool_call_id=None,
        seq=version, created_at=NOW,
    )  # fmt: skip
    return MessageAdded(id=uuid7(), version=version, occurred_at=NOW, data=body)


PARENT_LOG: list[Entry] = [(v, log_fields(message(PARENT, v))) for v in range(1, 11)]
FORKED = SessionForked(id=uuid7(), version=1, occurred_at=NOW, data=SessionForkedData(parent_id=PARENT, version=8))
CHILD_LOG: list[Entry] = [(1, log_fields(FORKED)), (10, log_fields(message(CHILD, 10)))]  # 2..9: the parent's 1..8


async def origin() -> tuple[str, int] | None:
    return PARENT, 9


async def read_parent(parent: str, after: int, count: int) -> list[Entry]:
    assert parent == PARENT
    return [e for e in PARENT_LOG if after < e[0] <= after + count]


def stored(after: int) -> list[Entry]:
    return [e for e in CHILD_LOG if e[0] > after]


async def test_the_inherited_versions_come_from_the_parent_made_the_forks_own() -> None:
    got = await complete(CHILD, stored(0), 0, 10, origin, read_parent)
    assert [v for v, _ in got] == list(range(1, 11))
    inherited = [decode_event(v, f) for v, f in got[1:9]]
    assert [e.data.content for e in inherited] == [f"c{v}" for v in range(1, 9)]  # type: ignore[union-attr]
    assert {e.data.session_id for e in inherited} == {CHILD}  # type: ignore[union-attr]
    page = await complete(CHILD, stored(3), 3, 5, origin, read_parent)
    assert [v for v, _ in page] == [4, 5]
    assert await complete(CHILD, stored(9), 9, 10, origin, read_parent) == CHILD_LOG[1:]  # its own: no parent read


async def test_a_log_purged_while_it_was_read_answers_up_to_the_gap() -> None:
    async def purged(parent: str, after: int, count: int) -> list[Entry]:
        return [e for e in await read_parent(parent, after, count) if e[0] <= 3]  # the parent went after version 3

    async def gone() -> tuple[str, int] | None:
        return None  # the fork's head went too

    assert [v for v, _ in await complete(CHILD, stored(0), 0, 10, origin, purged)] == [1, 2, 3, 4]
    assert [v for v, _ in await complete(CHILD, stored(0), 0, 10, gone, read_parent)] == [1]
