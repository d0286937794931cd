"""History as an API, end to end: real `parley api` and `parley worker` processes on a private redis-server.

The events page and its pagination, the OpenAPI document, the SSE tail (backlog, live events, keep-alives,
the end after `SessionDeleted`, resuming with `Last-Event-ID` exactly once), time travel at every version
(against what GET answered right after each write, across snapshots), and purge: the tombstone in `/audit`,
its pagination, tenancy, and a scan of every key of the stack's redis-server for the purged content.

Tests that read a tenant's whole audit stream use a tenant of their own (`HIST`), so they can assert it exactly.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest
import redis as redis_sync

from shared.adapters.redis.keys import Keys, partition_of
from tests.e2e.helpers import (
    ACME,
    GLOBEX,
    UUID7,
    Stack,
    add_message,
    assert_error,
    create,
    running_stack,
    tool,
    ts,
    unknown_id,
)
from tests.support import API_KEYS

HIST = {f"hist{i}": f"hist{i}-key" for i in range(12)}
"""Tenants handed out one per use by `tenant()`: their audit streams and session lists start empty."""
ALL_KEYS = ",".join([API_KEYS, *(f"{t}:{k}" for t, k in HIST.items())])
_unused = iter(HIST)

SSE_ACCEPT = {"Accept": "text/event-stream"}
KEEPALIVE_S = 0.3
EVENT_KEYS = {"id", "type", "version", "occurred_at", "data"}
EVENT_TYPES = [
    "SessionCreated",
    "SessionUpdated",
    "ToolsChanged",
    "MessageAdded",
    "SessionDeleted",
    "ChatRequested",
    "ContextBuilt",
    "SummaryAdded",
    "ChatCompleted",
    "ChatFailed",
    "ChatCancelled",
]
SESSION_ONLY = {"id", "version", "created_at", "updated_at", "expires_at", "forked_from"}
"""Session resource fields that are not in `SessionCreated.data`."""


# -- the processes ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"PARLEY_API_KEYS": ALL_KEYS, "PARLEY_SSE_KEEPALIVE_S": str(KEEPALIVE_S)}
    with running_stack(tmp_path_factory.mktemp("e2e-history"), env) as stack:
        yield stack


@pytest.fixture(scope="module")
def c(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api.url, timeout=15) as client:
        yield client


@pytest.fixture(scope="module")
def r(stack: Stack) -> Iterator[redis_sync.Redis]:
    client = redis_sync.Redis.from_url(stack.redis.url)
    yield client
    client.close()


def tenant() -> dict[str, str]:
    """Auth headers of a tenant no other test uses."""
    name = next(_unused)
    return {"Authorization": f"Bearer {HIST[name]}"}


def tenant_name(headers: dict[str, str]) -> str:
    return next(t for t, key in HIST.items() if headers["Authorization"] == f"Bearer {key}")


# -- helpers -------------------------------------------------------------------------------------------


def patch(c: httpx.Client, sid: str, body: dict[str, Any], headers: dict[str, str] = ACME) -> dict[str, Any]:
    resp = c.patch(f"/sessions/{sid}", json=body, headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()


def delete(c: httpx.Client, sid: str, headers: dict[str, str] = ACME, **params: Any) -> dict[str, Any]:
    resp = c.delete(f"/sessions/{sid}", params=params, headers=headers)
    assert resp.status_code == 202, resp.text
    return resp.json()


def events(c: httpx.Client, sid: str, headers: dict[str, str] = ACME, **params: Any) -> dict[str, Any]:
    resp = c.get(f"/sessions/{sid}/events", params=params, headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    page = resp.json()
    assert set(page) == {"items", "next"}, page
    return page


def all_events(c: httpx.Client, sid: str, headers: dict[str, str] = ACME) -> list[dict[str, Any]]:
    page = events(c, sid, headers, limit=1000)
    assert page["next"] is None
    return page["items"]


def observe(c: httpx.Client, sid: str, headers: dict[str, str] = ACME) -> tuple[int, tuple[Any, ...]]:
    """(version, everything a reader sees now): the session, its ETag, its messages and its tools."""
    resp = c.get(f"/sessions/{sid}", headers=headers)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert resp.headers["ETag"] == f'"{body["version"]}"'
    msgs = c.get(f"/sessions/{sid}/messages", params={"limit": 1000}, headers=headers)
    tls = c.get(f"/sessions/{sid}/tools", headers=headers)
    assert msgs.status_code == 200 and tls.status_code == 200, (msgs.text, tls.text)
    return body["version"], (body, resp.headers["ETag"], msgs.json()["items"], tls.json()["items"])


def at_version(c: httpx.Client, sid: str, version: int, headers: dict[str, str] = ACME) -> tuple[Any, ...]:
    """What time travel answers for `version`: the same shape as `observe`."""
    resp = c.get(f"/sessions/{sid}", params={"version": version}, headers=headers)
    assert resp.status_code == 200, f"version {version}: {resp.text}"
    msgs = c.get(f"/sessions/{sid}/messages", params={"version": version, "limit": 1000}, headers=headers)
    tls = c.get(f"/sessions/{sid}/tools", params={"version": version}, headers=headers)
    assert msgs.status_code == 200 and tls.status_code == 200, (version, msgs.text, tls.text)
    assert set(msgs.json()) == {"items"} and set(tls.json()) == {"items"}
    return resp.json(), resp.headers["ETag"], msgs.json()["items"], tls.json()["items"]


def marker(what: str) -> str:
    """A string no other test, key or value contains (letters and digits only: JSON and msgpack keep it as is)."""
    return f"mk{what}{secrets.token_hex(10)}"


def grow(c: httpx.Client, sid: str, n: int, headers: dict[str, str] = ACME) -> None:
    for i in range(n):
        add_message(c, sid, {"role": "user", "content": f"m{i}"}, headers)


# -- SSE ---------------------------------------------------------------------------------------------
@dataclass
class Frame:
    id: int
    event: str
    data: dict[str, Any]


class SSEReader:
    """Reads a text/event-stream body block by block (blocks end with a blank line), checking the frame format."""

    MAX_QUIET = 40
    """Keep-alive comments tolerated while waiting for one event (~12 s at 0.3 s): a bound, not a timing."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._chunks = response.iter_bytes()
        self._buf = b""
        self.ended = False
        self.comments = 0
        self.saw_retry = False

    def block(self) -> bytes | None:
        """The next block, or None when the server ended the stream."""
        while b"\n\n" not in self._buf:
            try:
                self._buf += next(self._chunks)
            except StopIteration:
                self.ended = True
                assert self._buf == b"", f"the stream ended inside a frame: {self._buf!r}"
                return None
        block, self._buf = self._buf.split(b"\n\n", 1)
        if block.startswith(b"retry: "):  # the stream's first frame carries the reconnection delay
            retry, _, block = block.partition(b"\n")
            assert retry == b"retry: 3000" and not self.saw_retry, retry
            self.saw_retry = True
        return block

    def next(self) -> Frame | None:
        """The next event (skipping keep-alive comments, at most MAX_QUIET in a row), or None at the stream's end."""
        quiet = 0
        while True:
            block = self.block()
            if block is None:
                return None
            if block.startswith(b":"):
                assert block == b": keep-alive", block
                self.comments += 1
                quiet += 1
                if quiet > self.MAX_QUIET:
                    pytest.fail(f"no event after {quiet} keep-alive comments")
                continue
            return parse_frame(block)


def parse_frame(block: bytes) -> Frame:
    lines = block.split(b"\n")
    assert len(lines) == 3, f"a frame is exactly id, event and data lines: {block!r}"
    assert lines[0].startswith(b"id: ") and lines[1].startswith(b"event: ") and lines[2].startswith(b"data: "), block
    version = lines[0][4:].decode()
    assert version.isdigit(), block
    frame = Frame(int(version), lines[1][7:].decode(), httpx.Response(200, content=lines[2][6:]).json())
    assert set(frame.data) == EVENT_KEYS, frame.data
    assert frame.data["version"] == frame.id and frame.data["type"] == frame.event, block
    return frame


@contextmanager
def tail(
    c: httpx.Client, sid: str, headers: dict[str, str] = ACME, last_event_id: str | None = None, **params: Any
) -> Iterator[SSEReader]:
    h = {**headers, **SSE_ACCEPT}
    if last_event_id is not None:
        h["Last-Event-ID"] = last_event_id
    with c.stream(
        "GET", f"/sessions/{sid}/events", params=params, headers=h, timeout=httpx.Timeout(15, read=10)
    ) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream"), resp.headers
        yield SSEReader(resp)


def read_to_end(reader: SSEReader) -> list[Frame]:
    frames = []
    while (frame := reader.next()) is not None:
        frames.append(frame)
    return frames


# =====================================================================================================
# 1. the events page
# =====================================================================================================
def test_events_page_lists_every_write_oldest_first_with_typed_data(c):
    body = {
        "agent_id": "agent-h",
        "user_id": "user-h",
        "situation": "the first situation",
        "token_budget": 9000,
        "context_overflow": "truncate",
        "tools": [tool("lookup"), tool("notify", "sends a note")],
        "metadata": {"channel": "web", "nested": {"a": [1, 2, {"b": None}]}},
    }
    s = create(c, body)
    sid = s["id"]
    m1 = add_message(c, sid, {"role": "user", "content": "hello there", "name": "alice"})
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
    m2 = add_message(c, sid, {"role": "assistant", "content": None, "tool_calls": [call]})
    m3 = add_message(
        c, sid, {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "found it"}]}
    )
    assert patch(c, sid, {"situation": "a second situation", "token_budget": None})["version"] == 5
    new_tools = [tool("only_tool", "replaces both")]
    assert patch(c, sid, {"tools": new_tools})["version"] == 6
    assert patch(c, sid, {"agent_id": "agent-2", "tools": []})["version"] == 8

    items = all_events(c, sid)
    assert [e["version"] for e in items] == list(range(1, 9))
    assert [e["type"] for e in items] == [
        "SessionCreated",
        "MessageAdded",
        "MessageAdded",
        "MessageAdded",
        "SessionUpdated",
        "ToolsChanged",
        "SessionUpdated",
        "ToolsChanged",
    ]
    for e in items:
        assert set(e) == EVENT_KEYS, e
        assert UUID7.match(e["id"]) and uuid.UUID(e["id"]).version == 7, e["id"]
        ts(e["occurred_at"])
    assert len({e["id"] for e in items}) == len(items), "event ids are unique"
    assert [ts(e["occurred_at"]) for e in items] == sorted(ts(e["occurred_at"]) for e in items)

    # SessionCreated holds the session's fields, as created
    assert items[0]["data"] == {k: v for k, v in s.items() if k not in SESSION_ONLY}
    assert items[0]["occurred_at"] == s["created_at"]
    # MessageAdded holds the message as POST answered it (id, role, content, name, tool_call_id, seq, ...)
    for e, m in zip(items[1:4], (m1, m2, m3)):
        assert {"id", "role", "content", "name", "tool_call_id", "seq"} <= set(e["data"])
        assert e["data"] == m
        assert e["occurred_at"] == m["created_at"]
    assert [e["data"]["seq"] for e in items[1:4]] == [1, 2, 3]
    # SessionUpdated holds only the changed fields (null: cleared); ToolsChanged the new list
    assert items[4]["data"] == {"situation": "a second situation", "token_budget": None}
    assert items[5]["data"] == {"tools": new_tools}
    assert items[6]["data"] == {"agent_id": "agent-2"}
    assert items[7]["data"] == {"tools": []}
    assert items[6]["occurred_at"] == items[7]["occurred_at"], "one write, one time"

    # the session resource's version and ETag are the last event's version
    resp = c.get(f"/sessions/{sid}", headers=ACME)
    assert resp.json()["version"] == items[-1]["version"] == 8 and resp.headers["ETag"] == '"8"'
    assert resp.json()["updated_at"] == items[-1]["occurred_at"]

    # deleted, not purged: the log stays readable, with SessionDeleted last
    deleted = delete(c, sid)
    assert_error(c.get(f"/sessions/{sid}", headers=ACME), 404, "not_found")
    after = all_events(c, sid)
    assert after[:-1] == items
    assert after[-1]["type"] == "SessionDeleted" and after[-1]["version"] == 9 and after[-1]["data"] == {}
    assert after[-1]["occurred_at"] == deleted["deleted_at"]
    assert UUID7.match(after[-1]["id"]) and after[-1]["id"] not in {e["id"] for e in items}


def test_events_defaults_to_100_events_after_version_0(c):
    sid = create(c)["id"]
    grow(c, sid, 104)  # versions 1..105
    page = events(c, sid)
    assert [e["version"] for e in page["items"]] == list(range(1, 101))
    assert page["next"] == 100
    rest = events(c, sid, after=page["next"])
    assert [e["version"] for e in rest["items"]] == list(range(101, 106))
    assert rest["next"] is None
    whole = events(c, sid, limit=1000)
    assert whole["items"] == page["items"] + rest["items"] and whole["next"] is None


def test_pagination_with_limit_walks_the_whole_log_and_next_is_null_exactly_at_the_end(c):
    s = create(c, {"situation": "paged"})
    sid = s["id"]
    grow(c, sid, 11)
    patch(c, sid, {"situation": "paged again"})  # 13 events
    full = all_events(c, sid)
    n = len(full)
    assert n == 13 and [e["version"] for e in full] == list(range(1, n + 1))

    for limit in (1, 2, 3, 4, 5, 12, 13, 14, 1000):
        walked: list[dict[str, Any]] = []
        after, pages = 0, 0
        while True:
            page = events(c, sid, after=after, limit=limit)
            pages += 1
            assert 1 <= len(page["items"]) <= limit, (limit, after, page)
            walked += page["items"]
            last = page["items"][-1]["version"]
            if last < n:
                assert page["next"] == last, (limit, after, page["next"])
                assert len(page["items"]) == limit
                after = page["next"]
            else:
                assert page["next"] is None, f"limit {limit}: the page ends at the last event, yet next={page['next']}"
                break
        assert walked == full, limit
        assert pages == -(-n // limit), limit

    # a page ending exactly at the last event
    exact = events(c, sid, after=n - 3, limit=3)
    assert [e["version"] for e in exact["items"]] == [n - 2, n - 1, n] and exact["next"] is None
    one_before = events(c, sid, after=n - 4, limit=3)
    assert [e["version"] for e in one_before["items"]] == [n - 3, n - 2, n - 1] and one_before["next"] == n - 1
    # after the last version and past the end: an empty page, next null
    for after in (n, n + 1, n + 1000, 2**63 - 1):
        assert events(c, sid, after=after) == {"items": [], "next": None}, after
    # any `after` inside the log starts right after it
    for after in range(n):
        assert events(c, sid, after=after, limit=1000)["items"] == full[after:], after


BAD_EVENT_QUERIES = [
    {"after": -1},
    {"after": "abc"},
    {"after": "1.5"},
    {"after": ""},
    {"after": 2**63},
    {"limit": 0},
    {"limit": -1},
    {"limit": 1001},
    {"limit": "ten"},
    {"limit": "1.5"},
    {"limit": ""},
]


@pytest.mark.parametrize("params", BAD_EVENT_QUERIES, ids=[str(p) for p in BAD_EVENT_QUERIES])
def test_out_of_range_or_non_integer_after_or_limit_answers_422(c, params):
    sid = create(c)["id"]
    assert_error(c.get(f"/sessions/{sid}/events", params=params, headers=ACME), 422, "validation_failed")


def test_limit_bounds_are_inclusive(c):
    sid = create(c)["id"]
    assert len(events(c, sid, limit=1)["items"]) == 1
    assert len(events(c, sid, limit=1000)["items"]) == 1
    assert events(c, sid, after=0)["items"][0]["version"] == 1


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "12345", unknown_id()])
def test_an_unknown_session_answers_404_on_events_sse_and_time_travel(c, bad_id):
    assert_error(c.get(f"/sessions/{bad_id}/events", headers=ACME), 404, "not_found")
    assert_error(c.get(f"/sessions/{bad_id}/events", headers={**ACME, **SSE_ACCEPT}), 404, "not_found")
    for suffix in ("", "/messages", "/tools"):
        assert_error(c.get(f"/sessions/{bad_id}{suffix}", params={"version": 1}, headers=ACME), 404, "not_found")


def test_another_tenants_session_answers_404_on_events_sse_and_every_version_endpoint(c):
    s = create(c, {"situation": "acme only", "tools": [tool("t")]})
    sid = s["id"]
    add_message(c, sid, {"role": "user", "content": "private"})
    for headers in (GLOBEX, tenant()):
        assert_error(c.get(f"/sessions/{sid}/events", headers=headers), 404, "not_found")
        assert_error(
            c.get(f"/sessions/{sid}/events", params={"after": 1, "limit": 5}, headers=headers), 404, "not_found"
        )
        assert_error(c.get(f"/sessions/{sid}/events", headers={**headers, **SSE_ACCEPT}), 404, "not_found")
        assert_error(
            c.get(f"/sessions/{sid}/events", headers={**headers, **SSE_ACCEPT, "Last-Event-ID": "1"}), 404, "not_found"
        )
        for version in (1, 2, 3):
            for suffix in ("", "/messages", "/tools"):
                assert_error(
                    c.get(f"/sessions/{sid}{suffix}", params={"version": version}, headers=headers), 404, "not_found"
                )
    # a deleted session stays invisible to the other tenant too
    delete(c, sid)
    assert_error(c.get(f"/sessions/{sid}/events", headers=GLOBEX), 404, "not_found")
    assert_error(c.get(f"/sessions/{sid}", params={"version": 1}, headers=GLOBEX), 404, "not_found")
    assert [e["version"] for e in all_events(c, sid)] == [1, 2, 3]


# =====================================================================================================
# 2. the OpenAPI document
# =====================================================================================================
def test_openapi_documents_every_event_type_and_the_history_paths(c):
    resp = c.get("/schema/openapi.json")
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    schemas = doc["components"]["schemas"]
    for name in [*EVENT_TYPES, "SessionPurged"]:
        assert name in schemas, f"{name} is not in the OpenAPI components"
        props = schemas[name].get("properties", {})
        assert {"id", "occurred_at", "data", "type"} <= set(props), (name, sorted(props))
        if name != "SessionPurged":
            assert "version" in props, name
    # the page's items are the tagged union of every event type
    text = resp.text
    page = schemas["EventPage"]
    refs = re.findall(r"#/components/schemas/(\w+)", str(page))
    assert set(EVENT_TYPES) <= set(refs), refs

    paths = doc["paths"]
    assert "/sessions/{session_id}/events" in paths and "/audit" in paths, sorted(paths)
    ev = paths["/sessions/{session_id}/events"]["get"]
    params = {p["name"] for p in ev["parameters"]}
    assert {"session_id", "after", "limit", "Last-Event-ID"} <= params, params
    assert "#/components/schemas/EventPage" in str(ev["responses"]["200"])
    audit = paths["/audit"]["get"]
    assert {"after", "limit"} <= {p["name"] for p in audit["parameters"]}
    assert "#/components/schemas/AuditPage" in str(audit["responses"]["200"])
    for time_travel in ("/sessions/{session_id}", "/sessions/{session_id}/messages", "/sessions/{session_id}/tools"):
        assert "version" in {p["name"] for p in paths[time_travel]["get"]["parameters"]}, time_travel
    assert "purge" in {p["name"] for p in paths["/sessions/{session_id}"]["delete"]["parameters"]}
    assert "SessionPurgedData" in text


# =====================================================================================================
# 3. the SSE tail
# =====================================================================================================
def test_sse_sends_the_backlog_then_live_events_and_ends_after_session_deleted(stack, c):
    sid = create(c, {"situation": "tailed"})["id"]
    add_message(c, sid, {"role": "user", "content": "before the tail"})
    with httpx.Client(base_url=stack.api.url, timeout=15) as writer:
        with tail(c, sid) as sse:
            assert sse.response.headers.get("cache-control") == "no-cache"
            backlog = [sse.next(), sse.next()]
            assert [f.id for f in backlog] == [1, 2] and [f.event for f in backlog] == [
                "SessionCreated",
                "MessageAdded",
            ]
            assert [f.data for f in backlog] == all_events(c, sid)

            live = add_message(writer, sid, {"role": "user", "content": "while tailing"})
            frame = sse.next()
            assert frame.id == 3 and frame.event == "MessageAdded" and frame.data["data"] == live

            patch(writer, sid, {"situation": "changed", "tools": [tool("x")]})
            f4, f5 = sse.next(), sse.next()
            assert (f4.id, f4.event, f5.id, f5.event) == (4, "SessionUpdated", 5, "ToolsChanged")

            deleted = delete(writer, sid)
            last = sse.next()
            assert last.id == 6 and last.event == "SessionDeleted" and last.data["occurred_at"] == deleted["deleted_at"]
            assert sse.next() is None and sse.ended, "the stream ends after SessionDeleted"
        assert [f.data for f in [*backlog, frame, f4, f5, last]] == all_events(c, sid)


def test_sse_frames_are_id_event_data_exactly(c):
    sid = create(c, {"situation": "raw frames", "metadata": {"text": "line one\nline two"}})["id"]
    add_message(c, sid, {"role": "user", "content": "multi\nline\n\ncontent"})
    delete(c, sid)
    with c.stream(
        "GET", f"/sessions/{sid}/events", headers={**ACME, **SSE_ACCEPT}, timeout=httpx.Timeout(15, read=10)
    ) as resp:
        assert resp.status_code == 200
        raw = resp.read()
    log = all_events(c, sid)
    assert raw.startswith(b"retry: 3000\n"), raw  # the reconnection delay, with the first frame
    blocks = raw.removeprefix(b"retry: 3000\n").split(b"\n\n")
    assert blocks[-1] == b"" and len(blocks) == len(log) + 1, raw
    datas = []
    for block, e in zip(blocks, log):
        id_line, event_line, data_line = block.split(b"\n")
        assert id_line == b"id: %d" % e["version"]
        assert event_line == b"event: " + e["type"].encode()
        assert data_line.startswith(b"data: ")
        datas.append(data_line[len(b"data: ") :])
    # each data line is the event exactly as the page serves it, byte for byte
    page = c.get(f"/sessions/{sid}/events", params={"limit": 1000}, headers=ACME).content
    assert page == b'{"items":[' + b",".join(datas) + b'],"next":null}'


def test_sse_sends_keep_alive_comments_on_a_quiet_stream_and_stays_open(c):
    sid = create(c)["id"]
    with tail(c, sid) as sse:
        assert sse.next().id == 1
        # nothing is written: the next blocks are keep-alive comments
        for _ in range(3):
            assert sse.block() == b": keep-alive"
        add_message(c, sid, {"role": "user", "content": "after a quiet while"})
        frame = sse.next()
        assert frame.id == 2 and frame.event == "MessageAdded"
        assert sse.block() == b": keep-alive"
    delete(c, sid)


def test_sse_after_and_last_event_id_choose_where_the_stream_starts(c):
    sid = create(c)["id"]
    grow(c, sid, 3)
    delete(c, sid)  # 5 events; the stream ends after the last one
    with tail(c, sid, after=3) as sse:
        assert [f.id for f in read_to_end(sse)] == [4, 5]
    with tail(c, sid, last_event_id="2") as sse:
        assert [f.id for f in read_to_end(sse)] == [3, 4, 5]
    # Last-Event-ID wins over `after`, lower or higher
    with tail(c, sid, last_event_id="3", after=1) as sse:
        assert [f.id for f in read_to_end(sse)] == [4, 5]
    with tail(c, sid, last_event_id="1", after=3) as sse:
        assert [f.id for f in read_to_end(sse)] == [2, 3, 4, 5]
    with tail(c, sid, last_event_id="0", after=4) as sse:
        assert [f.id for f in read_to_end(sse)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "bad", ["abc", "-1", "1.5", "3a", "0x10", "99999999999999999999", "²".encode("latin-1"), "١٢".encode()]
)
def test_an_invalid_last_event_id_answers_422(c, bad):
    """Non-ASCII digits too ('²' is a digit to str.isdigit, not to int)."""
    sid = create(c)["id"]
    resp = c.get(f"/sessions/{sid}/events", headers={**ACME, **SSE_ACCEPT, "Last-Event-ID": bad})
    assert_error(resp, 422, "validation_failed")


def test_sse_resumed_after_the_session_deleted_event_ends_instead_of_idling(c):
    """The stream ends after SessionDeleted; a client that reconnects with that event's id (EventSource does
    after any end) must not be held open forever on a log that can never grow again."""
    sid = create(c)["id"]
    add_message(c, sid, {"role": "user", "content": "x"})
    delete(c, sid)  # version 3
    for params, extra in (({}, {"Last-Event-ID": "3"}), ({"after": 3}, {}), ({"after": 1}, {"Last-Event-ID": "3"})):
        how = f"params {params}, headers {extra}"
        headers = {**ACME, **SSE_ACCEPT, **extra}
        with c.stream(
            "GET", f"/sessions/{sid}/events", params=params, headers=headers, timeout=httpx.Timeout(15, read=10)
        ) as resp:
            assert resp.status_code in (200, 204), (how, resp.read())
            if resp.status_code == 204:  # "stop reconnecting", in EventSource's terms: fine too
                continue
            sse = SSEReader(resp)
            blocks = []
            while len(blocks) < 5 and (block := sse.block()) is not None:
                blocks.append(block)
            assert sse.ended, (
                f"{how}: the stream of a deleted session, resumed after SessionDeleted, stays open sending {blocks}"
            )
            assert blocks == [], how


def test_sse_reconnecting_with_last_event_id_sees_every_event_exactly_once(stack, c):
    sid = create(c, {"situation": "resumed"})["id"]
    grow(c, sid, 4)  # a backlog: versions 1..5
    written: list[int] = []
    errors: list[BaseException] = []
    total = 60

    def writer() -> None:
        try:
            with httpx.Client(base_url=stack.api.url, timeout=15) as w:
                for i in range(total):
                    written.append(add_message(w, sid, {"role": "user", "content": f"live {i}"})["seq"])
                    time.sleep(0.003)
                delete(w, sid)
        except BaseException as e:
            errors.append(e)

    def wait_written(n: int) -> None:
        deadline = time.monotonic() + 15
        while len(written) < min(n, total) and not errors:
            if time.monotonic() > deadline:
                pytest.fail(f"the writer did not reach {n} messages")
            time.sleep(0.005)

    seen: list[Frame] = []
    connections = 0
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        last_id: str | None = None
        for take in (12, 15, 9, None):  # three disconnects mid-stream, then read to the end
            connections += 1
            with tail(c, sid, last_event_id=last_id) as sse:
                got = 0
                while take is None or got < take:
                    frame = sse.next()
                    if frame is None:
                        break
                    seen.append(frame)
                    got += 1
                ended = sse.ended
            last_id = str(seen[-1].id)
            if ended:
                break
            wait_written(len(written) + 3)  # events appended while disconnected
    finally:
        thread.join(timeout=30)
    assert not errors, errors
    assert not thread.is_alive()

    log = all_events(c, sid)
    n = len(log)
    assert n == 1 + 4 + total + 1
    versions = [f.id for f in seen]
    assert len(versions) == len(set(versions)), f"duplicates: {sorted(v for v in versions if versions.count(v) > 1)}"
    assert versions == list(range(1, n + 1))
    assert [f.data for f in seen] == log
    assert seen[-1].event == "SessionDeleted"
    assert connections >= 2


def test_sse_ends_when_the_session_is_purged(stack, c):
    headers = tenant()
    sid = create(c, {"situation": "purged while tailed"}, headers)["id"]
    with tail(c, sid, headers) as sse:
        assert sse.next().id == 1
        with httpx.Client(base_url=stack.api.url, timeout=15) as other:
            delete(other, sid, headers, purge="true")
        rest = read_to_end(sse)
        assert sse.ended
        assert [f.event for f in rest] in ([], ["SessionDeleted"]), rest
    assert_error(c.get(f"/sessions/{sid}/events", headers={**headers, **SSE_ACCEPT}), 404, "not_found")


# =====================================================================================================
# 4. time travel
# =====================================================================================================
def test_time_travel_at_every_version_equals_what_get_answered_right_after_that_write(c):
    seen: dict[int, tuple[Any, ...]] = {}

    def record() -> int:
        version, view = observe(c, sid)
        assert version not in seen
        seen[version] = view
        return version

    s = create(
        c, {"agent_id": "tt", "situation": "first", "tools": [tool("alpha"), tool("beta")], "metadata": {"k": 1}}
    )
    sid = s["id"]
    assert record() == 1
    add_message(c, sid, {"role": "user", "content": "one"})
    record()
    add_message(c, sid, {"role": "assistant", "content": "two", "name": "bot"})
    record()
    patch(c, sid, {"situation": "second", "token_budget": 5000, "metadata": {"k": 2, "extra": [1]}})
    record()
    patch(c, sid, {"tools": [tool("gamma", "the only one now")]})  # ToolsChanged alone
    record()
    call = {"id": "call_tt", "type": "function", "function": {"name": "gamma", "arguments": "{}"}}
    add_message(c, sid, {"role": "assistant", "content": None, "tool_calls": [call]})
    record()
    add_message(c, sid, {"role": "tool", "tool_call_id": "call_tt", "content": "gamma says hi"})
    tools_before = seen[record()][3]
    combined = patch(c, sid, {"agent_id": "tt2", "metadata": None, "tools": [tool("delta"), tool("alpha", "back")]})
    both = record()  # SessionUpdated (both - 1) and ToolsChanged (both), one write
    assert combined["version"] == both
    chat = c.post(
        f"/sessions/{sid}/chat", json={"messages": [{"role": "user", "content": "time travel chat"}]}, headers=ACME
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == "You said: time travel chat"
    after_chat = record()  # MessageAdded + ChatRequested, ContextBuilt, MessageAdded + ChatCompleted
    add_message(c, sid, {"role": "user", "content": "after the chat"})
    record()
    patch(c, sid, {"tools": None})
    last_live = record()
    assert after_chat > both + 1

    def check_all() -> None:
        for version, view in seen.items():
            got = at_version(c, sid, version)
            assert got == view, f"version {version}"
            assert got[1] == f'"{version}"'
        # the SessionUpdated half of the combined write: fields changed, tools not yet
        body, etag, msgs, tls = at_version(c, sid, both - 1)
        after = seen[both][0]
        assert body == {**after, "tools": tools_before, "version": both - 1}
        assert etag == f'"{both - 1}"' and tls == tools_before and msgs == seen[both][2]
        # the versions inside the chat: the messages grow as the log says, the version is the one asked for
        for version in range(both + 1, after_chat):
            body, etag, msgs, _ = at_version(c, sid, version)
            assert body["version"] == version and etag == f'"{version}"'
            assert seen[both][2] == msgs[: len(seen[both][2])]
            assert msgs == seen[after_chat][2][: len(msgs)]
        # paging a past message list
        msgs = seen[after_chat][2]
        for limit, offset in ((2, 0), (2, 1), (3, len(msgs) - 2), (5, len(msgs)), (1000, 0)):
            resp = c.get(
                f"/sessions/{sid}/messages",
                params={"version": after_chat, "limit": limit, "offset": offset},
                headers=ACME,
            )
            assert resp.status_code == 200 and resp.json()["items"] == msgs[offset : offset + limit], (limit, offset)

    check_all()
    # deleted: the current state is gone, every past version stays readable
    delete(c, sid)
    deleted_version = last_live + 1
    last_event = all_events(c, sid)[-1]
    assert last_event["type"] == "SessionDeleted" and last_event["version"] == deleted_version
    for suffix in ("", "/messages", "/tools"):
        assert_error(c.get(f"/sessions/{sid}{suffix}", headers=ACME), 404, "not_found")
    check_all()
    for suffix in ("", "/messages", "/tools"):
        path = f"/sessions/{sid}{suffix}"
        # the SessionDeleted version: the session does not exist in it
        assert_error(c.get(path, params={"version": deleted_version}, headers=ACME), 404, "not_found")
        for missing in (deleted_version + 1, deleted_version + 1000, 2**63 - 1):
            err = assert_error(c.get(path, params={"version": missing}, headers=ACME), 404, "version_not_found")
            assert err["message"]
        # versions start at 1 (the parameter's schema says so): 0 is invalid, like a negative one
        for bad in ("0", "abc", "1.5", "-1", "", str(2**63), "1e3", "1.0", "²", "٣", "+1", " 1"):
            assert_error(c.get(path, params={"version": bad}, headers=ACME), 422, "validation_failed")


def test_time_travel_on_a_live_session_beyond_its_head_is_version_not_found(c):
    sid = create(c, {"tools": [tool("one")]})["id"]
    add_message(c, sid, {"role": "user", "content": "hi"})
    for suffix in ("", "/messages", "/tools"):
        path = f"/sessions/{sid}{suffix}"
        assert c.get(path, params={"version": 2}, headers=ACME).status_code == 200
        assert_error(c.get(path, params={"version": 3}, headers=ACME), 404, "version_not_found")
        # versions start at 1: 0 is refused by the parameter's schema (version >= 1), as the OpenAPI document says
        assert_error(c.get(path, params={"version": 0}, headers=ACME), 422, "validation_failed")
    resp = c.get(f"/sessions/{sid}", params={"version": 1}, headers=ACME)
    assert resp.headers["ETag"] == '"1"' and resp.json()["version"] == 1
    assert c.get(f"/sessions/{sid}/messages", params={"version": 1}, headers=ACME).json() == {"items": []}
    assert c.get(f"/sessions/{sid}/tools", params={"version": 1}, headers=ACME).json() == {"items": [tool("one")]}


def test_time_travel_across_snapshots_at_100_and_200(c, r):
    sid = create(c, {"situation": "long", "tools": [tool("t0")], "metadata": {"i": 0}})["id"]
    checked = {1, 2, 50, 98, 99, 100, 101, 102, 150, 199, 200, 201, 202, 250}
    seen: dict[int, tuple[Any, ...]] = {1: observe(c, sid)[1]}
    version = 1
    while version < 263:
        version += 1
        if version % 7 == 0:
            patch(c, sid, {"metadata": {"i": version}, "situation": f"at {version}"})
        elif version % 45 == 0:
            patch(c, sid, {"tools": [tool(f"t{version}"), tool("fixed")]})
        else:
            add_message(c, sid, {"role": "user" if version % 2 else "assistant", "content": f"message at {version}"})
        if version in checked:
            got, view = observe(c, sid)
            assert got == version
            seen[version] = view
    last, view = observe(c, sid)
    assert last == 263
    seen[last] = view

    # the projector took snapshots at 100 and 200 (what time travel folds from)
    snaps = r.hkeys(keys(r).snapshots(sid))
    assert {b"100", b"200"} <= set(snaps), snaps

    for v, expected in seen.items():
        assert at_version(c, sid, v) == expected, f"version {v}"
    # a past page deep in the list
    msgs = seen[201][2]
    resp = c.get(f"/sessions/{sid}/messages", params={"version": 201, "limit": 10, "offset": 150}, headers=ACME)
    assert resp.json()["items"] == msgs[150:160]
    assert_error(c.get(f"/sessions/{sid}", params={"version": last + 1}, headers=ACME), 404, "version_not_found")


# =====================================================================================================
# 5. purge and the audit stream
# =====================================================================================================
TOMBSTONE_KEYS = {"type", "id", "occurred_at", "data"}


def keys(r: redis_sync.Redis) -> Keys:
    return Keys(int(r.hget(Keys.config, "partitions")))


def audit(c: httpx.Client, headers: dict[str, str], **params: Any) -> dict[str, Any]:
    resp = c.get("/audit", params=params, headers=headers)
    assert resp.status_code == 200, resp.text
    page = resp.json()
    assert set(page) == {"items", "next"}, page
    for item in page["items"]:
        assert set(item) == TOMBSTONE_KEYS, item
        assert item["type"] == "SessionPurged"
        assert UUID7.match(item["id"]), item
        ts(item["occurred_at"])
        assert set(item["data"]) == {"session_id", "user_id", "event_count"}, item
    return page


def assert_gone(c: httpx.Client, sid: str, headers: dict[str, str], versions: range) -> None:
    """After a purge the session answers 404 everywhere, as an unknown id does."""
    for suffix in ("", "/messages", "/tools", "/events", "/chats"):
        assert_error(c.get(f"/sessions/{sid}{suffix}", headers=headers), 404, "not_found")
    assert_error(c.get(f"/sessions/{sid}/events", params={"after": 1}, headers=headers), 404, "not_found")
    assert_error(c.get(f"/sessions/{sid}/events", headers={**headers, **SSE_ACCEPT}), 404, "not_found")
    for v in versions:
        for suffix in ("", "/messages", "/tools"):
            assert_error(c.get(f"/sessions/{sid}{suffix}", params={"version": v}, headers=headers), 404, "not_found")
    assert_error(
        c.post(f"/sessions/{sid}/messages", json={"role": "user", "content": "x"}, headers=headers), 404, "not_found"
    )
    assert_error(c.patch(f"/sessions/{sid}", json={"situation": "x"}, headers=headers), 404, "not_found")
    assert_error(c.delete(f"/sessions/{sid}", headers=headers), 404, "not_found")
    assert_error(c.delete(f"/sessions/{sid}", params={"purge": "true"}, headers=headers), 404, "not_found")


def test_purge_of_a_live_session_answers_202_erases_it_and_leaves_a_tombstone(c):
    headers = tenant()
    keep = create(c, {"situation": "kept"}, headers)
    s = create(c, {"user_id": "purged-user", "situation": "to be erased", "tools": [tool("t")]}, headers)
    sid = s["id"]
    grow(c, sid, 3, headers)
    before = all_events(c, sid, headers)
    assert len(before) == 4
    t0 = datetime.now().astimezone()

    resp = c.delete(f"/sessions/{sid}", params={"purge": "true"}, headers=headers)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert set(body) == {"id", "deleted_at", "purged"}, body
    assert body["id"] == sid and body["purged"] is True
    assert ts(body["deleted_at"]) >= ts(before[-1]["occurred_at"])

    assert_gone(c, sid, headers, range(1, 7))
    page = audit(c, headers)
    assert page["next"] is None
    assert len(page["items"]) == 1
    tomb = page["items"][0]
    # the purge appended SessionDeleted (version 5) before erasing: five events
    assert tomb["data"] == {"session_id": sid, "user_id": "purged-user", "event_count": 5}
    assert ts(tomb["occurred_at"]) >= ts(body["deleted_at"]) and ts(tomb["occurred_at"]) >= t0
    assert tomb["id"] not in {e["id"] for e in before}

    # the tenant's other sessions are untouched, and the list no longer names the purged one
    assert c.get(f"/sessions/{keep['id']}", headers=headers).json() == keep
    listed = c.get("/sessions", headers=headers).json()["items"]
    assert [x["id"] for x in listed] == [keep["id"]]


def test_purge_of_an_already_deleted_session_works_and_counts_its_events(c):
    headers = tenant()
    s = create(c, {"situation": "deleted first"}, headers)
    sid = s["id"]
    grow(c, sid, 2, headers)
    deleted = delete(c, sid, headers)
    assert deleted["purged"] is False
    assert len(all_events(c, sid, headers)) == 4  # still readable until purged

    body = delete(c, sid, headers, purge="true")
    assert body == {"id": sid, "deleted_at": deleted["deleted_at"], "purged": True}
    assert_gone(c, sid, headers, range(1, 5))
    items = audit(c, headers)["items"]
    assert [t["data"] for t in items] == [{"session_id": sid, "user_id": None, "event_count": 4}]


def test_purge_with_a_stale_if_match_answers_412_and_erases_nothing(c):
    headers = tenant()
    live = create(c, {"situation": "live"}, headers)["id"]
    add_message(c, live, {"role": "user", "content": "hi"}, headers)  # version 2
    gone = create(c, {"situation": "deleted"}, headers)["id"]
    delete(c, gone, headers)  # version 2: SessionDeleted
    for sid in (live, gone):
        before = all_events(c, sid, headers)
        for stale in ('"1"', '"3"'):
            resp = c.delete(f"/sessions/{sid}", params={"purge": "true"}, headers={**headers, "If-Match": stale})
            assert_error(resp, 412, "version_conflict")
            assert all_events(c, sid, headers) == before
        assert audit(c, headers) == {"items": [], "next": None}
    for sid in (live, gone):
        resp = c.delete(f"/sessions/{sid}", params={"purge": "true"}, headers={**headers, "If-Match": '"2"'})
        assert resp.status_code == 202 and resp.json()["purged"] is True, resp.text
    assert [t["data"] for t in audit(c, headers)["items"]] == [
        {"session_id": live, "user_id": None, "event_count": 3},
        {"session_id": gone, "user_id": None, "event_count": 2},
    ]


def test_another_tenant_cannot_purge_and_sees_nothing_in_its_audit(c):
    owner, other = tenant(), tenant()
    s = create(c, {"user_id": "owner-user", "situation": "mine"}, owner)
    sid = s["id"]
    add_message(c, sid, {"role": "user", "content": "hello"}, owner)
    before = all_events(c, sid, owner)

    for headers in (other, GLOBEX):
        assert_error(c.delete(f"/sessions/{sid}", params={"purge": "true"}, headers=headers), 404, "not_found")
    assert all_events(c, sid, owner) == before, "a refused purge changes nothing"
    assert c.get(f"/sessions/{sid}", headers=owner).json() == {
        **s,
        "version": 2,
        "updated_at": before[-1]["occurred_at"],
    }
    assert audit(c, owner) == {"items": [], "next": None}

    delete(c, sid, owner, purge="true")
    assert audit(c, other) == {"items": [], "next": None}, "another tenant sees no tombstone"
    assert [t["data"]["session_id"] for t in audit(c, owner)["items"]] == [sid]
    # and the owner's purge does not show up in globex's audit either
    assert sid not in {t["data"]["session_id"] for t in audit(c, GLOBEX, limit=1000)["items"]}


def test_audit_pages_with_limit_and_an_opaque_cursor_each_tombstone_once_in_order(c):
    headers = tenant()
    sids = []
    for i in range(5):
        sid = create(c, {"user_id": f"user-{i}"}, headers)["id"]
        grow(c, sid, i, headers)
        if i % 2:
            delete(c, sid, headers)
        sids.append(sid)
    for sid in sids:
        delete(c, sid, headers, purge="true")
        time.sleep(0.002)  # tombstones in separate milliseconds: the stream's order is the purge order

    full = audit(c, headers)
    assert full["next"] is None
    assert [t["data"]["session_id"] for t in full["items"]] == sids
    assert [t["data"]["user_id"] for t in full["items"]] == [f"user-{i}" for i in range(5)]
    # events: SessionCreated + i messages + SessionDeleted
    assert [t["data"]["event_count"] for t in full["items"]] == [i + 2 for i in range(5)]
    assert len({t["id"] for t in full["items"]}) == 5

    for limit in (1, 2, 3, 5):
        walked, cursor, pages = [], None, 0
        while True:
            page = audit(c, headers, limit=limit, **({"after": cursor} if cursor else {}))
            pages += 1
            assert 1 <= len(page["items"]) <= limit, page
            walked += page["items"]
            if page["next"] is None:
                break
            assert isinstance(page["next"], str) and page["next"]
            assert len(page["items"]) == limit
            cursor = page["next"]
            assert pages <= 5
        assert walked == full["items"], limit
    # a page that ends exactly at the last tombstone has no next
    assert audit(c, headers, limit=5)["next"] is None

    for bad in ("garbage!!", "not-a-cursor", "%%%", "MTIz", "YS1iLWM", "-1", ""):
        assert_error(c.get("/audit", params={"after": bad}, headers=headers), 422, "validation_failed")
    for params in ({"limit": 0}, {"limit": 1001}, {"limit": "x"}, {"after": "x" * 201}):
        assert_error(c.get("/audit", params=params, headers=headers), 422, "validation_failed")
    assert_error(c.get("/audit"), 401, "unauthorized")


# -- the scan --------------------------------------------------------------------------------------
def dump(r: redis_sync.Redis) -> dict[bytes, tuple[bytes, list[bytes]]]:
    """Every key of the server with its type and every byte string it holds (names, members, fields, values)."""
    out: dict[bytes, tuple[bytes, list[bytes]]] = {}
    for key in r.scan_iter(count=1000):
        kind = r.type(key)
        values: list[bytes]
        if kind == b"none":
            continue  # expired between SCAN and TYPE
        if kind == b"string":
            values = [r.get(key) or b""]
        elif kind == b"hash":
            values = [x for kv in r.hgetall(key).items() for x in kv]
        elif kind == b"list":
            values = r.lrange(key, 0, -1)
        elif kind == b"set":
            values = list(r.smembers(key))
        elif kind == b"zset":
            values = [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            values = []
            for eid, fields in r.xrange(key, "-", "+"):
                values.append(eid)
                values += [x for kv in fields.items() for x in kv]
            for group in r.xinfo_groups(key):
                values.append(group["name"] if isinstance(group["name"], bytes) else str(group["name"]).encode())
        else:
            pytest.fail(f"key {key!r} has a type the scan does not read: {kind!r}")
        out[key] = (kind, values)
    return out


def holders(db: dict[bytes, tuple[bytes, list[bytes]]], needle: str) -> list[bytes]:
    """The keys whose name or any value contains `needle`."""
    n = needle.encode()
    return [k for k, (_, values) in db.items() if n in k or any(n in v for v in values)]


def test_after_a_purge_no_redis_key_holds_any_of_the_sessions_content(stack, c, r):
    headers = tenant()
    mk = {
        w: marker(w)
        for w in (
            "agent",
            "situation",
            "situation2",
            "metakey",
            "metaval",
            "toolname",
            "tooldesc",
            "paramdesc",
            "user1",
            "assistant",
            "name",
            "toolcall",
            "toolresult",
            "chat",
            "idem",
            "patchmeta",
        )
    }
    user_id = marker("userid")
    toolname = f"tool_{mk['toolname']}"
    tools = [
        {
            "type": "function",
            "function": {
                "name": toolname,
                "description": mk["tooldesc"],
                "parameters": {
                    "type": "object",
                    "properties": {"q": {"type": "string", "description": mk["paramdesc"]}},
                },
            },
        }
    ]
    body = {
        "agent_id": mk["agent"],
        "user_id": user_id,
        "situation": mk["situation"],
        "token_budget": 100000,
        "context_overflow": "truncate",
        "tools": tools,
        "metadata": {mk["metakey"]: mk["metaval"]},
    }
    # every kind of write, with Idempotency-Keys so idempotency records exist too
    resp = c.post("/sessions", json=body, headers={**headers, "Idempotency-Key": "create-" + mk["idem"]})
    assert resp.status_code == 201, resp.text
    sid = resp.json()["id"]
    resp = c.post(
        f"/sessions/{sid}/messages",
        json={"role": "user", "content": mk["user1"], "name": mk["name"]},
        headers={**headers, "Idempotency-Key": "msg-" + mk["idem"]},
    )
    assert resp.status_code == 201, resp.text
    call = {"id": f"call_{mk['toolcall']}", "type": "function", "function": {"name": toolname, "arguments": "{}"}}
    add_message(c, sid, {"role": "assistant", "content": mk["assistant"], "tool_calls": [call]}, headers)
    add_message(c, sid, {"role": "tool", "tool_call_id": call["id"], "content": mk["toolresult"]}, headers)
    resp = c.patch(
        f"/sessions/{sid}",
        json={"situation": mk["situation2"], "metadata": {"p": mk["patchmeta"]}},
        headers={**headers, "Idempotency-Key": "patch-" + mk["idem"]},
    )
    assert resp.status_code == 200, resp.text
    # a chat: its job record and chunk stream hold the answer "You said: <marker>"
    resp = c.post(
        f"/sessions/{sid}/chat",
        json={"messages": [{"role": "user", "content": mk["chat"]}]},
        headers={**headers, "Idempotency-Key": "chat-" + mk["idem"]},
    )
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["choices"][0]["message"]["content"] == f"You said: {mk['chat']}"
    got = c.get(f"/sessions/{sid}/chats/{job['id']}", headers=headers)
    assert got.status_code == 200 and got.json()["status"] == "succeeded", got.text
    assert got.json()["response"]["choices"][0]["message"]["content"] == f"You said: {mk['chat']}"
    # a second chat, queued, so a streamed-then-finished job is covered as well
    resp = c.post(
        f"/sessions/{sid}/chat",
        json={"messages": [{"role": "user", "content": mk["chat"] + "x"}], "stream": True},
        headers=headers,
    )
    assert resp.status_code == 200 and mk["chat"] in resp.text, resp.text
    # a control session of the same tenant with content of its own: it must survive the purge
    control_marker = marker("control")
    control = create(c, {"situation": control_marker, "user_id": "another-user"}, headers)["id"]
    add_message(c, control, {"role": "user", "content": control_marker}, headers)
    n_events = len(all_events(c, sid, headers))

    # before: the scan finds the content where we expect it (so the scan below can fail)
    k = keys(r)
    db = dump(r)
    for name, m in mk.items():
        if name != "idem":  # an Idempotency-Key is stored hashed
            assert holders(db, m), f"{name}: the scan does not find {m} before the purge"
    found = holders(db, mk["chat"])
    assert k.chunks(sid, job["id"]).encode() in found, found
    assert k.chat(sid, job["id"]).encode() in found, found
    assert any(b":idem:" in key for key in holders(db, mk["situation"])), "an idempotency record holds the create"
    assert k.log(sid).encode() in found and k.view(sid).encode() in holders(db, mk["situation2"])

    purged = delete(c, sid, headers, purge="true")
    assert purged["purged"] is True
    tombs = audit(c, headers)["items"]
    assert [t["data"] for t in tombs] == [{"session_id": sid, "user_id": user_id, "event_count": n_events + 1}]

    # after: nothing anywhere holds the purged session's content
    db = dump(r)
    leaks = {name: [key.decode(errors="replace") for key in holders(db, m)] for name, m in mk.items()}
    leaks = {name: where for name, where in leaks.items() if where}
    assert leaks == {}, f"content of the purged session is still in Redis: {leaks}"
    # its user id only inside the tombstone
    audit_key = k.audit(partition_of(sid, k.partitions), tenant_name(headers))
    assert holders(db, user_id) == [audit_key.encode()]
    # no key is named after the purged session any more
    assert [key for key in db if sid.encode() in key] == [], "keys named after the purged session remain"
    assert k.chat(sid, job["id"]).encode() not in db and k.chunks(sid, job["id"]).encode() not in db
    # the control session is intact
    assert holders(db, control_marker)
    assert c.get(f"/sessions/{control}/messages", headers=headers).json()["items"][0]["content"] == control_marker
    assert_gone(c, sid, headers, range(1, n_events + 2))
