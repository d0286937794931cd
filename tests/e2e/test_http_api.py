"""The HTTP contract, end to end: real `parley api` and `parley worker` processes on a real redis-server.

One API + worker pair on a redis-server of this module's own serves the tests (other
modules flush the session-wide server, so it is not used here). Tests that need an
empty session list use a tenant no other test touches (`fresh_tenant`). Two tests start
a second API process on the same Redis: one with small configured limits, one to check
that writes through one process are read and conditioned correctly through another.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.e2e.helpers import (
    ACME,
    GLOBEX,
    JSON,
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
from tests.support import API_KEYS, TENANTS

ISOLATED = {f"iso{i}": f"iso{i}-key" for i in range(64)}
"""Tenants handed out one per test by `fresh_tenant`, so a test can assert its whole session list."""
ALL_KEYS = ",".join([API_KEYS, *(f"{t}:{k}" for t, k in ISOLATED.items())])
_unused_tenants = iter(ISOLATED)

MAX_BODY = 1 << 20
MAX_CHARS = 100_000
SESSION_FIELDS = {
    "id",
    "agent_id",
    "user_id",
    "situation",
    "token_budget",
    "context_overflow",
    "multitask",
    "tools",
    "metadata",
    "version",
    "created_at",
    "updated_at",
    "compaction",
    "forked_from",
    "retention",
    "expires_at",
}
MESSAGE_FIELDS = {"id", "session_id", "role", "content", "name", "tool_call_id", "tool_calls", "seq", "created_at"}


# -- the processes ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("e2e-http"), {"PARLEY_API_KEYS": ALL_KEYS}) as stack:
        yield stack


@pytest.fixture(scope="module")
def c(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api.url, timeout=15) as client:
        yield client


@pytest.fixture
def fresh_tenant() -> dict[str, str]:
    """Auth headers of a tenant no other test uses: its session list starts empty."""
    tenant = next(_unused_tenants)
    return {"Authorization": f"Bearer {ISOLATED[tenant]}"}


# -- helpers -----------------------------------------------------------------------------------


def get_session(c: httpx.Client, sid: str, headers: dict[str, str] = ACME) -> dict[str, Any]:
    r = c.get(f"/sessions/{sid}", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["ETag"] == f'"{r.json()["version"]}"'
    return r.json()


def messages(c: httpx.Client, sid: str, headers: dict[str, str] = ACME, **params: Any) -> list[dict[str, Any]]:
    r = c.get(f"/sessions/{sid}/messages", params={"limit": 1000, **params}, headers=headers)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"items"}
    return r.json()["items"]


def tools(c: httpx.Client, sid: str, headers: dict[str, str] = ACME) -> list[dict[str, Any]]:
    r = c.get(f"/sessions/{sid}/tools", headers=headers)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"items"}
    return r.json()["items"]


def listed(c: httpx.Client, headers: dict[str, str] = ACME, **params: Any) -> list[dict[str, Any]]:
    r = c.get("/sessions", params=params, headers=headers)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"items", "next"}
    return r.json()["items"]


def listed_ids(c: httpx.Client, headers: dict[str, str] = ACME) -> list[str]:
    return [s["id"] for s in listed(c, headers, limit=1000)]


def snapshot(c: httpx.Client, sid: str, headers: dict[str, str] = ACME) -> tuple[Any, ...]:
    """Everything a reader can see of a session."""
    r = c.get(f"/sessions/{sid}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json(), r.headers["ETag"], messages(c, sid, headers), tools(c, sid, headers)


FULL_BODY = {
    "agent_id": "agent-7",
    "user_id": "user-42",
    "situation": "a customer asks about invoices",
    "token_budget": 8000,
    "context_overflow": "truncate",
    "tools": [tool("lookup_invoice"), tool("send_email", "sends an email")],
    "metadata": {"channel": "web", "nested": {"a": [1, 2, {"b": None}]}, "n": 1.5, "ok": True},
}


# -- create and read one session ---------------------------------------------------------------
def test_create_answers_201_with_the_whole_session_location_and_etag(c):
    r = c.post("/sessions", json=FULL_BODY, headers=ACME)
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == SESSION_FIELDS
    assert UUID7.match(body["id"]) and uuid.UUID(body["id"]).version == 7
    assert {k: body[k] for k in FULL_BODY} == FULL_BODY
    assert body["version"] == 1
    assert ts(body["created_at"]) == ts(body["updated_at"])
    assert r.headers["Location"] == f"/sessions/{body['id']}"
    assert r.headers["ETag"] == '"1"'

    got = c.get(f"/sessions/{body['id']}", headers=ACME)
    assert got.status_code == 200
    assert got.json() == body
    assert got.headers["ETag"] == '"1"'
    assert tools(c, body["id"]) == FULL_BODY["tools"]
    assert messages(c, body["id"]) == []


def test_create_with_an_empty_body_or_explicit_nulls_answers_the_defaults(c):
    for payload in (
        {},
        {"agent_id": None, "user_id": None, "situation": None, "token_budget": None, "context_overflow": None},
    ):
        body = create(c, payload)
        assert {k: v for k, v in body.items() if k not in ("id", "created_at", "updated_at")} == {
            "agent_id": None,
            "user_id": None,
            "situation": None,
            "token_budget": None,
            "context_overflow": None,
            "multitask": "enqueue",
            "tools": [],
            "metadata": {},
            "version": 1,
            "compaction": None,
            "forked_from": None,
            "retention": None,
            "expires_at": None,
        }
        assert get_session(c, body["id"]) == body


def test_create_accepts_adaptive_overflow_and_a_tool_without_optional_fields(c):
    body = create(
        c,
        {
            "context_overflow": "adaptive",
            "token_budget": 1,
            "tools": [{"type": "function", "function": {"name": "t_1"}}],
        },
    )
    assert body["context_overflow"] == "adaptive" and body["token_budget"] == 1
    assert [t["function"]["name"] for t in body["tools"]] == ["t_1"]
    assert tools(c, body["id"]) == body["tools"]


BAD_CREATES = {
    "unknown field": {"situation": "s", "colour": "red"},
    "token_budget zero": {"token_budget": 0},
    "token_budget negative": {"token_budget": -5},
    "token_budget string": {"token_budget": "100"},
    "metadata integer beyond 64 bits": {"metadata": {"n": 123456789012345678901234567890}},
    "tool parameters integer beyond 64 bits": {
        "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "maximum": -(2**70)}}}
        ]
    },
    "token_budget float": {"token_budget": 1.5},
    "context_overflow unknown": {"context_overflow": "drop"},
    "tools not a list": {"tools": {"type": "function"}},
    "tool type not function": {"tools": [{"type": "retrieval", "function": {"name": "a"}}]},
    "tool without name": {"tools": [{"type": "function", "function": {"description": "x"}}]},
    "tool unknown field": {"tools": [{"type": "function", "function": {"name": "a"}, "extra": 1}]},
    "tool names not unique": {"tools": [tool("dup"), tool("dup", "again")]},
    "tool parameters not an object schema": {
        "tools": [{"type": "function", "function": {"name": "a", "parameters": {"type": "string"}}}]
    },
    "metadata not an object": {"metadata": ["a"]},
    "agent_id not a string": {"agent_id": 7},
    "body not an object": [],
}


@pytest.mark.parametrize("payload", list(BAD_CREATES.values()), ids=list(BAD_CREATES))
def test_create_rejects_an_invalid_body_with_422_and_creates_nothing(c, fresh_tenant, payload):
    r = c.post("/sessions", json=payload, headers=fresh_tenant)
    assert_error(r, 422, "validation_failed")
    assert listed(c, fresh_tenant) == []


ENDPOINTS = [
    ("GET", "", None),
    ("PUT", "", {"situation": "x"}),
    ("PATCH", "", {"situation": "x"}),
    ("DELETE", "", None),
    ("GET", "/messages", None),
    ("POST", "/messages", {"role": "user", "content": "hi"}),
    ("GET", "/tools", None),
]
ENDPOINT_IDS = [f"{m} {s or '/'}" for m, s, _ in ENDPOINTS]


@pytest.mark.parametrize(("method", "suffix", "body"), ENDPOINTS, ids=ENDPOINT_IDS)
@pytest.mark.parametrize("bad_id", ["not-a-uuid", "12345", "0190a0e0-0000-7000-8000-00000000000g", unknown_id()])
def test_an_unknown_or_malformed_session_id_answers_404_on_every_endpoint(c, method, suffix, body, bad_id):
    r = c.request(method, f"/sessions/{bad_id}{suffix}", json=body, headers=ACME)
    assert_error(r, 404, "not_found")


# -- listing -------------------------------------------------------------------------------------
def test_list_is_newest_first_and_pages_with_limit_and_offset(c, fresh_tenant):
    made = [create(c, {"situation": f"s{i}"}, fresh_tenant) for i in range(4)]
    newest_first = list(reversed(made))
    assert listed(c, fresh_tenant) == newest_first
    assert listed(c, fresh_tenant, limit=2) == newest_first[:2]
    assert listed(c, fresh_tenant, limit=2, offset=1) == newest_first[1:3]
    assert listed(c, fresh_tenant, offset=3) == newest_first[3:]
    assert listed(c, fresh_tenant, offset=4) == []
    assert listed(c, fresh_tenant, limit=1000, offset=0) == newest_first


def test_list_defaults_to_100_items_from_offset_0(c, fresh_tenant):
    ids = [create(c, {}, fresh_tenant)["id"] for _ in range(101)]
    page = listed(c, fresh_tenant)
    assert [s["id"] for s in page] == list(reversed(ids))[:100]
    assert [s["id"] for s in listed(c, fresh_tenant, offset=100)] == [ids[0]]


BAD_PAGING = [
    {"limit": 0},
    {"limit": 1001},
    {"limit": -1},
    {"limit": "ten"},
    {"limit": "1.5"},
    {"offset": -1},
    {"offset": "x"},
    {"limit": ""},
    {"offset": 9223372036854775807},
]


@pytest.mark.parametrize("params", BAD_PAGING, ids=[str(p) for p in BAD_PAGING])
def test_out_of_range_or_non_integer_paging_answers_422(c, params):
    sid = create(c)["id"]
    assert_error(c.get("/sessions", params=params, headers=ACME), 422, "validation_failed")
    assert_error(c.get(f"/sessions/{sid}/messages", params=params, headers=ACME), 422, "validation_failed")


def test_paging_bounds_are_inclusive(c):
    sid = create(c)["id"]
    for params in ({"limit": 1}, {"limit": 1000}, {"offset": 0}):
        assert c.get("/sessions", params=params, headers=ACME).status_code == 200
        assert c.get(f"/sessions/{sid}/messages", params=params, headers=ACME).status_code == 200


# -- updates ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_update_changes_only_the_fields_present(c, method):
    before = create(c, FULL_BODY)
    r = c.request(method, f"/sessions/{before['id']}", json={"situation": "changed", "token_budget": 500}, headers=ACME)
    assert r.status_code == 200, r.text
    after = r.json()
    assert r.headers["ETag"] == '"2"'
    expected = {**before, "situation": "changed", "token_budget": 500, "version": 2, "updated_at": after["updated_at"]}
    assert after == expected
    assert ts(after["updated_at"]) >= ts(before["updated_at"])
    assert get_session(c, before["id"]) == after
    assert tools(c, before["id"]) == FULL_BODY["tools"]


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_null_clears_nullable_fields(c, method):
    before = create(c, FULL_BODY)
    clear = {
        "agent_id": None,
        "user_id": None,
        "situation": None,
        "token_budget": None,
        "context_overflow": None,
        "metadata": None,
    }
    r = c.request(method, f"/sessions/{before['id']}", json=clear, headers=ACME)
    assert r.status_code == 200, r.text
    after = r.json()
    assert after == {
        **before,
        "agent_id": None,
        "user_id": None,
        "situation": None,
        "token_budget": None,
        "context_overflow": None,
        "metadata": {},
        "version": 2,
        "updated_at": after["updated_at"],
    }
    assert get_session(c, before["id"]) == after


def test_tools_in_a_patch_replace_the_tools_with_one_event(c):
    s = create(c, FULL_BODY)
    new_tools = [tool("only_one", "replaces both")]
    r = c.patch(f"/sessions/{s['id']}", json={"tools": new_tools}, headers=ACME)
    assert r.status_code == 200, r.text
    assert r.json() == {**s, "tools": new_tools, "version": 2, "updated_at": r.json()["updated_at"]}
    assert r.headers["ETag"] == '"2"'
    assert tools(c, s["id"]) == new_tools
    assert get_session(c, s["id"]) == r.json()

    # tools and another field: SessionUpdated + ToolsChanged, so the version moves by 2
    r = c.put(f"/sessions/{s['id']}", json={"tools": [], "agent_id": "other"}, headers=ACME)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 4 and r.headers["ETag"] == '"4"'
    assert r.json()["tools"] == [] and r.json()["agent_id"] == "other"
    assert tools(c, s["id"]) == []

    # tools: null clears them too (one event)
    c.patch(f"/sessions/{s['id']}", json={"tools": new_tools}, headers=ACME).raise_for_status()
    r = c.patch(f"/sessions/{s['id']}", json={"tools": None}, headers=ACME)
    assert r.status_code == 200 and r.json()["version"] == 6 and r.json()["tools"] == []
    assert tools(c, s["id"]) == []


def test_an_empty_patch_changes_nothing(c):
    s = create(c, FULL_BODY)
    r = c.patch(f"/sessions/{s['id']}", json={}, headers=ACME)
    assert r.status_code == 200, r.text
    assert r.json() == s and r.headers["ETag"] == '"1"'
    assert get_session(c, s["id"]) == s


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_if_match_with_the_current_etag_succeeds(c, method):
    s = create(c)
    r = c.request(method, f"/sessions/{s['id']}", json={"user_id": "u"}, headers={**ACME, "If-Match": '"1"'})
    assert r.status_code == 200, r.text
    assert r.json()["user_id"] == "u" and r.headers["ETag"] == '"2"'
    r = c.request(
        method, f"/sessions/{s['id']}", json={"user_id": "v"}, headers={**ACME, "If-Match": r.headers["ETag"]}
    )
    assert r.status_code == 200 and r.json()["version"] == 3


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
def test_a_stale_if_match_answers_412_and_changes_nothing(c, method):
    s = create(c, FULL_BODY)
    add_message(c, s["id"], {"role": "user", "content": "hi"})
    before = snapshot(c, s["id"])
    assert before[1] == '"2"'
    for stale in ('"1"', '"3"', '"0"', 'W/"1"', '"abc"'):
        body = None if method == "DELETE" else {"situation": "never", "tools": []}
        r = c.request(method, f"/sessions/{s['id']}", json=body, headers={**ACME, "If-Match": stale})
        assert_error(r, 412, "version_conflict")
        assert snapshot(c, s["id"]) == before


def test_delete_with_the_current_if_match_succeeds(c):
    s = create(c)
    r = c.delete(f"/sessions/{s['id']}", headers={**ACME, "If-Match": '"1"'})
    assert r.status_code == 202, r.text
    assert_error(c.get(f"/sessions/{s['id']}", headers=ACME), 404, "not_found")


# -- delete ----------------------------------------------------------------------------------------
def test_delete_answers_202_and_the_session_is_gone_everywhere(c, fresh_tenant):
    keep = create(c, {"situation": "keep"}, fresh_tenant)
    s = create(c, FULL_BODY, fresh_tenant)
    add_message(c, s["id"], {"role": "user", "content": "hello"}, fresh_tenant)
    r = c.delete(f"/sessions/{s['id']}", headers=fresh_tenant)
    assert r.status_code == 202, r.text
    assert set(r.json()) == {"id", "deleted_at", "purged"} and r.json()["purged"] is False
    assert r.json()["id"] == s["id"]
    assert ts(r.json()["deleted_at"]) >= ts(s["created_at"])

    sid = s["id"]
    assert_error(c.get(f"/sessions/{sid}", headers=fresh_tenant), 404, "not_found")
    assert_error(c.get(f"/sessions/{sid}/messages", headers=fresh_tenant), 404, "not_found")
    assert_error(c.get(f"/sessions/{sid}/tools", headers=fresh_tenant), 404, "not_found")
    assert_error(
        c.post(f"/sessions/{sid}/messages", json={"role": "user", "content": "x"}, headers=fresh_tenant),
        404,
        "not_found",
    )
    assert_error(c.patch(f"/sessions/{sid}", json={"situation": "x"}, headers=fresh_tenant), 404, "not_found")
    assert_error(c.put(f"/sessions/{sid}", json={"situation": "x"}, headers=fresh_tenant), 404, "not_found")
    assert_error(c.delete(f"/sessions/{sid}", headers=fresh_tenant), 404, "not_found")
    assert listed(c, fresh_tenant) == [keep]


# -- messages --------------------------------------------------------------------------------------
def test_post_message_answers_201_with_the_message_and_its_1_based_seq(c):
    s = create(c)
    sent = [
        {"role": "system", "content": "you are helpful"},
        {"role": "user", "content": "hi", "name": "alice"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "look:"},
                {"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "high"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "answer", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        {"role": "user", "content": ""},
    ]
    answers = []
    for i, body in enumerate(sent, start=1):
        r = c.post(f"/sessions/{s['id']}/messages", json=body, headers=ACME)
        assert r.status_code == 201, r.text
        m = r.json()
        assert set(m) == MESSAGE_FIELDS
        assert UUID7.match(m["id"])
        ts(m["created_at"])
        assert m == {
            "id": m["id"],
            "session_id": s["id"],
            "role": body["role"],
            "content": body["content"],
            "name": body.get("name"),
            "tool_call_id": body.get("tool_call_id"),
            "tool_calls": body.get("tool_calls"),
            "seq": i,
            "created_at": m["created_at"],
        }
        answers.append(m)
    assert len({m["id"] for m in answers}) == len(sent)
    assert messages(c, s["id"]) == answers
    assert get_session(c, s["id"])["version"] == 1 + len(sent)


def test_an_image_part_without_detail_keeps_its_url(c):
    s = create(c)
    m = add_message(
        c,
        s["id"],
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
    )
    [part] = m["content"]
    assert part["type"] == "image_url"
    assert {k: v for k, v in part["image_url"].items() if v is not None} == {"url": "data:image/png;base64,AAAA"}
    assert messages(c, s["id"]) == [m]


BAD_MESSAGES = {
    "tool without tool_call_id": {"role": "tool", "content": "42"},
    "tool result for no earlier call": {"role": "tool", "content": "42", "tool_call_id": "call_unknown"},
    "tool_calls on a user message": {
        "role": "user",
        "content": "x",
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    },
    "null content without tool_calls": {"role": "assistant", "content": None},
    "tool_call_id on user": {"role": "user", "content": "x", "tool_call_id": "call_1"},
    "tool_call_id on assistant": {"role": "assistant", "content": "x", "tool_call_id": "call_1"},
    "tool_call_id on system": {"role": "system", "content": "x", "tool_call_id": "call_1"},
    "unknown role": {"role": "developer", "content": "x"},
    "missing role": {"content": "x"},
    "missing content": {"role": "user"},
    "content a number": {"role": "user", "content": 5},
    "content an object": {"role": "user", "content": {"type": "text", "text": "x"}},
    "unknown part type": {"role": "user", "content": [{"type": "audio", "audio": "x"}]},
    "text part without text": {"role": "user", "content": [{"type": "text"}]},
    "image part without url": {"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
    "unknown field": {"role": "user", "content": "x", "mood": "happy"},
    "content too long": {"role": "user", "content": "a" * (MAX_CHARS + 1)},
    "parts too long together": {
        "role": "user",
        "content": [{"type": "text", "text": "a" * 60_000}, {"type": "text", "text": "b" * 40_001}],
    },
}


@pytest.mark.parametrize("body", list(BAD_MESSAGES.values()), ids=list(BAD_MESSAGES))
def test_an_invalid_message_answers_422_and_writes_nothing(c, body):
    s = create(c)
    first = add_message(c, s["id"], {"role": "user", "content": "first"})
    before = snapshot(c, s["id"])
    assert_error(c.post(f"/sessions/{s['id']}/messages", json=body, headers=ACME), 422, "validation_failed")
    assert snapshot(c, s["id"]) == before
    # and the next message still gets the next position
    assert add_message(c, s["id"], {"role": "user", "content": "second"})["seq"] == first["seq"] + 1


def test_content_of_exactly_the_limit_is_accepted(c):
    s = create(c)
    m = add_message(c, s["id"], {"role": "user", "content": "x" * MAX_CHARS})
    assert len(m["content"]) == MAX_CHARS and m["seq"] == 1
    parts = [{"type": "text", "text": "y" * (MAX_CHARS // 2)}, {"type": "text", "text": "z" * (MAX_CHARS // 2)}]
    assert add_message(c, s["id"], {"role": "user", "content": parts})["content"] == parts
    assert [m["seq"] for m in messages(c, s["id"])] == [1, 2]


def test_messages_are_listed_oldest_first_with_limit_and_offset(c):
    s = create(c)
    sent = [add_message(c, s["id"], {"role": "user" if i % 2 else "assistant", "content": f"m{i}"}) for i in range(7)]
    assert messages(c, s["id"]) == sent
    assert [m["seq"] for m in sent] == list(range(1, 8))
    assert messages(c, s["id"], limit=3) == sent[:3]
    assert messages(c, s["id"], limit=2, offset=3) == sent[3:5]
    assert messages(c, s["id"], offset=5) == sent[5:]
    assert messages(c, s["id"], offset=7) == []
    r = c.get(f"/sessions/{s['id']}/messages", headers=ACME)  # the defaults
    assert r.status_code == 200 and r.json() == {"items": sent}


def test_tools_endpoint_lists_the_sessions_tools(c):
    s = create(c, {"tools": FULL_BODY["tools"]})
    r = c.get(f"/sessions/{s['id']}/tools", headers=ACME)
    assert r.status_code == 200
    assert r.json() == {"items": FULL_BODY["tools"]}
    empty = create(c)
    assert c.get(f"/sessions/{empty['id']}/tools", headers=ACME).json() == {"items": []}


# -- operations and the OpenAPI document -------------------------------------------------------------
def test_health_and_ready_need_no_key(c):
    r = c.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = c.get("/ready")
    assert r.status_code == 200
    assert r.json()["status"] == "ready"
    assert r.json() == {"status": "ready", "redis": True, "projector": True}


def test_the_openapi_document_has_every_schema_and_path(c):
    r = c.get("/schema/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    schemas = set(doc["components"]["schemas"])
    assert {"Session", "SessionCreate", "SessionPatch", "Message", "MessageCreate", "ErrorBody"} <= schemas
    paths = {re.sub(r"\{[^}]+\}", "{id}", p): {m.lower() for m in ops} for p, ops in doc["paths"].items()}
    assert {"get", "post"} <= paths["/sessions"]
    assert {"get", "put", "patch", "delete"} <= paths["/sessions/{id}"]
    assert {"get", "post"} <= paths["/sessions/{id}/messages"]
    assert "get" in paths["/sessions/{id}/tools"]
    assert "get" in paths["/health"] and "get" in paths["/ready"]
    no_content = [
        ops[m]["responses"]["204"] for ops in doc["paths"].values() for m in ops if "204" in ops[m]["responses"]
    ]
    assert len(no_content) >= 4 and all("content" not in r for r in no_content)  # a 204 has no body, by definition


def test_an_openai_message_names_on_every_role_the_fields_only_some_roles_take(c):
    """An OpenAI message ignores unknown fields, so the document names `tool_call_id` and `tool_calls` on every
    role: null (or no calls) where the role does not take them, as a request with anything else is refused."""
    doc = c.get("/schema/openapi.json").json()
    roles = {v["properties"]["role"]["const"]: v for v in doc["components"]["schemas"]["OpenAIMessage"]["oneOf"]}
    assert set(roles) == {"system", "developer", "user", "assistant", "tool"}
    for role, variant in roles.items():
        props = variant["properties"]
        assert (props["tool_call_id"] == {"type": "null"}) is (role != "tool")
        assert (props["tool_calls"] == {"anyOf": [{"type": "null"}, {"type": "array", "maxItems": 0}]}) is (
            role != "assistant"
        )
    sid = create(c)["id"]
    for value in (5, "call-1"):
        body = {"messages": [{"role": "developer", "content": "Be brief.", "tool_call_id": value}]}
        r = c.post(f"/sessions/{sid}/chat/completions", json=body, headers=ACME)
        assert r.status_code == 422, r.text
    assert messages(c, sid) == []


# -- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw",
    [b"{bad", b'{"situation": "x"', b"not json at all", b'{"a":1}}'],
    ids=["brace", "unterminated", "text", "trailing"],
)
def test_malformed_json_answers_400_invalid_json_and_changes_nothing(c, fresh_tenant, raw):
    s = create(c, FULL_BODY, fresh_tenant)
    add_message(c, s["id"], {"role": "user", "content": "hi"}, fresh_tenant)
    before = snapshot(c, s["id"], fresh_tenant)
    sid = s["id"]
    for method, path in [
        ("POST", "/sessions"),
        ("PUT", f"/sessions/{sid}"),
        ("PATCH", f"/sessions/{sid}"),
        ("POST", f"/sessions/{sid}/messages"),
    ]:
        r = c.request(method, path, content=raw, headers={**fresh_tenant, **JSON})
        assert_error(r, 400, "invalid_json")
        assert snapshot(c, sid, fresh_tenant) == before
    assert listed_ids(c, fresh_tenant) == [sid]


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [("GET", "", None), ("POST", "", {})] + [(m, "/{sid}" + s, b) for m, s, b in ENDPOINTS],
    ids=["GET /sessions", "POST /sessions"] + ENDPOINT_IDS,
)
def test_every_session_endpoint_answers_401_without_a_valid_key(c, method, suffix, body):
    s = create(c)
    path = "/sessions" + suffix.replace("{sid}", s["id"])
    before = snapshot(c, s["id"])
    for headers in (
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": "Bearer"},
        {"Authorization": "acme-key"},
        {"Authorization": "Basic YWNtZTphY21lLWtleQ=="},
        {"X-Auth-Key": "wrong-key"},
        {"X-Auth-Key": ""},
    ):
        r = c.request(method, path, json=body, headers=headers)
        assert_error(r, 401, "unauthorized")
    assert snapshot(c, s["id"]) == before


def test_x_auth_key_works_like_a_bearer_token(c):
    x = {"X-Auth-Key": TENANTS["acme"]}
    r = c.post("/sessions", json={"situation": "via x-auth-key"}, headers=x)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    assert c.get(f"/sessions/{sid}", headers=ACME).json() == r.json()
    assert c.get(f"/sessions/{sid}", headers=x).json() == r.json()
    assert c.post(f"/sessions/{sid}/messages", json={"role": "user", "content": "x"}, headers=x).status_code == 201
    assert [m["content"] for m in messages(c, sid, x)] == ["x"]
    assert sid in [s["id"] for s in listed(c, x, limit=1000)]
    assert_error(c.get(f"/sessions/{sid}", headers={"X-Auth-Key": TENANTS["globex"]}), 404, "not_found")


def test_a_body_over_1_mib_answers_413_and_changes_nothing(c, fresh_tenant):
    s = create(c, FULL_BODY, fresh_tenant)
    add_message(c, s["id"], {"role": "user", "content": "hi"}, fresh_tenant)
    before = snapshot(c, s["id"], fresh_tenant)
    sid = s["id"]
    big = "a" * MAX_BODY
    for method, path, body in [
        ("POST", "/sessions", {"situation": big}),
        ("PUT", f"/sessions/{sid}", {"situation": big}),
        ("PATCH", f"/sessions/{sid}", {"metadata": {"blob": big}}),
        ("POST", f"/sessions/{sid}/messages", {"role": "user", "content": big}),
    ]:
        r = c.request(method, path, json=body, headers=fresh_tenant)
        assert_error(r, 413, "payload_too_large")
        assert snapshot(c, sid, fresh_tenant) == before

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds for a streamed body too
        yield b'{"role": "user", "content": "'
        for _ in range(MAX_BODY // 4096 + 1):
            yield b"b" * 4096
        yield b'"}'

    r = c.post(f"/sessions/{sid}/messages", content=chunked(), headers={**fresh_tenant, **JSON})
    assert_error(r, 413, "payload_too_large")
    assert snapshot(c, sid, fresh_tenant) == before
    assert listed_ids(c, fresh_tenant) == [sid]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/sessions"),
        ("PUT", "/sessions"),
        ("PATCH", "/sessions"),
        ("POST", "/sessions/{sid}"),
        ("PUT", "/sessions/{sid}/messages"),
        ("DELETE", "/sessions/{sid}/messages"),
        ("POST", "/sessions/{sid}/tools"),
        ("DELETE", "/sessions/{sid}/tools"),
        ("POST", "/health"),
    ],
)
def test_a_method_a_path_does_not_have_answers_405(c, method, path):
    s = create(c)
    before = snapshot(c, s["id"])
    r = c.request(method, path.replace("{sid}", s["id"]), json={"role": "user", "content": "x"}, headers=ACME)
    assert_error(r, 405, "method_not_allowed")
    assert snapshot(c, s["id"]) == before


def test_an_unknown_path_answers_404_in_the_error_shape(c):
    assert_error(c.get("/nowhere", headers=ACME), 404, "not_found")


# -- rejected writes change nothing ----------------------------------------------------------------
TOO_LONG = "a" * (MAX_CHARS + 1)
REJECTED_WRITES = {
    # name: (method, suffix, json body or raw bytes, extra headers, status, code)
    "patch malformed json": ("PATCH", "", b'{"situation": ', {}, 400, "invalid_json"),
    "message malformed json": ("POST", "/messages", b'{"role": "user", "content": "x"', {}, 400, "invalid_json"),
    "patch wrong type": ("PATCH", "", {"token_budget": "many"}, {}, 422, "validation_failed"),
    "patch zero budget": ("PATCH", "", {"token_budget": 0}, {}, 422, "validation_failed"),
    "patch numeric string budget": ("PATCH", "", {"token_budget": "9"}, {}, 422, "validation_failed"),
    "patch unknown overflow": ("PATCH", "", {"context_overflow": "spill"}, {}, 422, "validation_failed"),
    "put unknown field": ("PUT", "", {"situation": "new", "colour": "red"}, {}, 422, "validation_failed"),
    "patch unknown field with a valid one": (
        "PATCH",
        "",
        {"agent_id": "new", "nope": None},
        {},
        422,
        "validation_failed",
    ),
    "patch duplicate tool names": (
        "PATCH",
        "",
        {"situation": "new", "tools": [tool("x"), tool("x")]},
        {},
        422,
        "validation_failed",
    ),
    "patch non-object tool parameters": (
        "PATCH",
        "",
        {
            "agent_id": "new",
            "tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "array"}}}],
        },
        {},
        422,
        "validation_failed",
    ),
    "patch situation too long": ("PATCH", "", {"situation": TOO_LONG, "agent_id": "new"}, {}, 422, "validation_failed"),
    "patch oversized body": ("PATCH", "", {"situation": "a" * MAX_BODY}, {}, 413, "payload_too_large"),
    "message oversized body": (
        "POST",
        "/messages",
        {"role": "user", "content": "a" * MAX_BODY},
        {},
        413,
        "payload_too_large",
    ),
    "message too long": ("POST", "/messages", {"role": "user", "content": TOO_LONG}, {}, 422, "validation_failed"),
    "message wrong type": ("POST", "/messages", {"role": "user", "content": None}, {}, 422, "validation_failed"),
    "message unknown field": (
        "POST",
        "/messages",
        {"role": "user", "content": "x", "extra": 1},
        {},
        422,
        "validation_failed",
    ),
    "message tool without tool_call_id": (
        "POST",
        "/messages",
        {"role": "tool", "content": "x"},
        {},
        422,
        "validation_failed",
    ),
    "patch stale if-match": ("PATCH", "", {"situation": "new"}, {"If-Match": '"1"'}, 412, "version_conflict"),
    "put stale if-match": ("PUT", "", {"tools": []}, {"If-Match": '"5"'}, 412, "version_conflict"),
    "delete stale if-match": ("DELETE", "", None, {"If-Match": '"1"'}, 412, "version_conflict"),
}


@pytest.mark.parametrize(
    ("method", "suffix", "payload", "extra", "status", "code"),
    list(REJECTED_WRITES.values()),
    ids=list(REJECTED_WRITES),
)
def test_a_rejected_write_changes_nothing(c, method, suffix, payload, extra, status, code):
    s = create(c, FULL_BODY)
    add_message(c, s["id"], {"role": "user", "content": "hi"})
    before = snapshot(c, s["id"])
    assert before[0]["version"] == 2
    kw: dict[str, Any] = (
        {"content": payload, "headers": {**ACME, **JSON, **extra}}
        if isinstance(payload, bytes)
        else {"json": payload, "headers": {**ACME, **extra}}
    )
    assert_error(c.request(method, f"/sessions/{s['id']}{suffix}", **kw), status, code)
    assert snapshot(c, s["id"]) == before
    # the session still takes writes at the version it had
    r = c.patch(f"/sessions/{s['id']}", json={"user_id": "after"}, headers={**ACME, "If-Match": '"2"'})
    assert r.status_code == 200 and r.json()["version"] == 3


# -- tenancy -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "suffix", "body"), ENDPOINTS, ids=ENDPOINT_IDS)
@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "if-match-and-idempotency-key"])
def test_another_tenants_session_answers_404_exactly_like_an_unknown_id(c, method, suffix, body, conditional):
    s = create(c, FULL_BODY)
    add_message(c, s["id"], {"role": "user", "content": "secret"})
    before = snapshot(c, s["id"])
    headers = {**GLOBEX}
    if conditional:
        headers.update({"If-Match": before[1], "Idempotency-Key": f"tenancy-{uuid.uuid4()}"})
    nobody = unknown_id()
    foreign = c.request(method, f"/sessions/{s['id']}{suffix}", json=body, headers=headers)
    missing = c.request(method, f"/sessions/{nobody}{suffix}", json=body, headers=headers)
    assert_error(foreign, 404, "not_found")
    assert_error(missing, 404, "not_found")
    assert foreign.text == missing.text.replace(nobody, s["id"])
    assert snapshot(c, s["id"]) == before
    assert s["id"] not in listed_ids(c, GLOBEX)


def test_another_tenant_cannot_replay_a_tenants_idempotent_writes(c):
    s = create(c)
    body = {"role": "user", "content": "mine"}
    first = c.post(f"/sessions/{s['id']}/messages", json=body, headers={**ACME, "Idempotency-Key": "shared-key-1"})
    assert first.status_code == 201
    again = c.post(f"/sessions/{s['id']}/messages", json=body, headers={**GLOBEX, "Idempotency-Key": "shared-key-1"})
    assert_error(again, 404, "not_found")
    assert c.delete(f"/sessions/{s['id']}", headers={**ACME, "Idempotency-Key": "shared-key-2"}).status_code == 202
    assert_error(
        c.delete(f"/sessions/{s['id']}", headers={**GLOBEX, "Idempotency-Key": "shared-key-2"}), 404, "not_found"
    )


def test_sessions_never_appear_in_another_tenants_list(c, fresh_tenant):
    acme_ids = {create(c, {"situation": f"a{i}"})["id"] for i in range(3)}
    mine = create(c, {}, fresh_tenant)
    globex = create(c, {}, GLOBEX)
    assert listed(c, fresh_tenant) == [mine]
    globex_ids = set(listed_ids(c, GLOBEX))
    assert globex["id"] in globex_ids
    assert not globex_ids & acme_ids and mine["id"] not in globex_ids
    acme_list = set(listed_ids(c, ACME))
    assert acme_ids <= acme_list and globex["id"] not in acme_list and mine["id"] not in acme_list


# -- idempotency -------------------------------------------------------------------------------------
def test_a_retried_create_answers_the_first_answer_and_creates_one_session(c, fresh_tenant):
    headers = {**fresh_tenant, "Idempotency-Key": "create-1"}
    body = {"situation": "once", "tools": [tool("a")]}
    first = c.post("/sessions", json=body, headers=headers)
    assert first.status_code == 201
    for _ in range(3):
        again = c.post("/sessions", json=body, headers=headers)
        assert again.status_code == 201
        assert again.content == first.content
        assert again.headers["Location"] == first.headers["Location"]
        assert again.headers["ETag"] == first.headers["ETag"]
    assert listed(c, fresh_tenant) == [first.json()]

    other = c.post("/sessions", json={"situation": "twice"}, headers=headers)
    assert_error(other, 422, "idempotency_key_reused")
    assert listed(c, fresh_tenant) == [first.json()]

    # another key is another create
    fresh = c.post("/sessions", json=body, headers={**fresh_tenant, "Idempotency-Key": "create-2"})
    assert fresh.status_code == 201 and fresh.json()["id"] != first.json()["id"]
    assert [s["id"] for s in listed(c, fresh_tenant)] == [fresh.json()["id"], first.json()["id"]]


def test_a_retried_message_answers_the_first_answer_and_appends_nothing(c):
    s = create(c)
    headers = {**ACME, "Idempotency-Key": "msg-1"}
    body = {"role": "user", "content": "only once"}
    first = c.post(f"/sessions/{s['id']}/messages", json=body, headers=headers)
    assert first.status_code == 201 and first.json()["seq"] == 1
    later = add_message(c, s["id"], {"role": "assistant", "content": "reply"})
    for _ in range(3):
        again = c.post(f"/sessions/{s['id']}/messages", json=body, headers=headers)
        assert again.status_code == 201
        assert again.content == first.content
    assert messages(c, s["id"]) == [first.json(), later]
    assert get_session(c, s["id"])["version"] == 3

    assert_error(
        c.post(f"/sessions/{s['id']}/messages", json={"role": "user", "content": "different"}, headers=headers),
        422,
        "idempotency_key_reused",
    )
    assert messages(c, s["id"]) == [first.json(), later]
    assert get_session(c, s["id"])["version"] == 3


def test_a_retried_put_answers_the_first_answer_and_changes_nothing(c):
    s = create(c)
    headers = {**ACME, "Idempotency-Key": "put-1"}
    first = c.put(f"/sessions/{s['id']}", json={"situation": "first", "tools": [tool("t")]}, headers=headers)
    assert first.status_code == 200 and first.json()["version"] == 3
    c.patch(f"/sessions/{s['id']}", json={"agent_id": "later"}, headers=ACME).raise_for_status()
    current = get_session(c, s["id"])
    assert current["version"] == 4
    for _ in range(3):
        again = c.put(f"/sessions/{s['id']}", json={"situation": "first", "tools": [tool("t")]}, headers=headers)
        assert again.status_code == 200
        assert again.content == first.content
        assert again.headers["ETag"] == first.headers["ETag"] == '"3"'
    assert get_session(c, s["id"]) == current

    assert_error(
        c.put(f"/sessions/{s['id']}", json={"situation": "second"}, headers=headers), 422, "idempotency_key_reused"
    )
    assert get_session(c, s["id"]) == current


def test_a_retried_put_with_its_if_match_answers_the_first_answer(c):
    s = create(c)
    headers = {**ACME, "Idempotency-Key": "put-if-match", "If-Match": '"1"'}
    first = c.put(f"/sessions/{s['id']}", json={"situation": "x"}, headers=headers)
    assert first.status_code == 200
    again = c.put(f"/sessions/{s['id']}", json={"situation": "x"}, headers=headers)
    assert again.status_code == 200 and again.content == first.content
    assert get_session(c, s["id"])["version"] == 2


def test_a_retried_delete_answers_the_first_202(c, fresh_tenant):
    s = create(c, {}, fresh_tenant)
    headers = {**fresh_tenant, "Idempotency-Key": "delete-1"}
    first = c.delete(f"/sessions/{s['id']}", headers=headers)
    assert first.status_code == 202
    for _ in range(3):
        again = c.delete(f"/sessions/{s['id']}", headers=headers)
        assert again.status_code == 202
        assert again.content == first.content
    assert listed(c, fresh_tenant) == []
    assert_error(c.get(f"/sessions/{s['id']}", headers=fresh_tenant), 404, "not_found")
    assert_error(c.delete(f"/sessions/{s['id']}", headers=fresh_tenant), 404, "not_found")


def test_the_same_key_in_another_tenant_is_independent(c, fresh_tenant):
    body = {"situation": "same body"}
    key = {"Idempotency-Key": "cross-tenant-key"}
    a = c.post("/sessions", json=body, headers={**fresh_tenant, **key})
    b = c.post("/sessions", json=body, headers={**GLOBEX, **key})
    assert a.status_code == b.status_code == 201
    assert a.json()["id"] != b.json()["id"]
    assert listed(c, fresh_tenant) == [a.json()]
    assert get_session(c, b.json()["id"], GLOBEX) == b.json()
    # a different body under one key in two tenants is not a reuse either
    key2 = {"Idempotency-Key": "cross-tenant-key-2"}
    b2 = c.post(
        f"/sessions/{b.json()['id']}/messages", json={"role": "user", "content": "g"}, headers={**GLOBEX, **key2}
    )
    a2 = c.post(
        f"/sessions/{a.json()['id']}/messages", json={"role": "user", "content": "f"}, headers={**fresh_tenant, **key2}
    )
    assert a2.status_code == b2.status_code == 201
    assert [m["content"] for m in messages(c, a.json()["id"], fresh_tenant)] == ["f"]
    assert [m["content"] for m in messages(c, b.json()["id"], GLOBEX)] == ["g"]


def test_an_empty_idempotency_key_is_rejected(c, fresh_tenant):
    assert_error(
        c.post("/sessions", json={}, headers={**fresh_tenant, "Idempotency-Key": ""}), 422, "validation_failed"
    )
    assert listed(c, fresh_tenant) == []


# -- read-your-writes --------------------------------------------------------------------------------
def test_read_your_writes_messages(c):
    s = create(c)
    for i in range(50):
        m = add_message(c, s["id"], {"role": "user", "content": f"n{i}"})
        assert m["seq"] == i + 1
        items = messages(c, s["id"])
        assert len(items) == i + 1 and items[-1] == m
        assert get_session(c, s["id"])["version"] == i + 2


def test_read_your_writes_create_then_get_and_list(c, fresh_tenant):
    for i in range(30):
        s = create(c, {"situation": f"rw{i}"}, fresh_tenant)
        assert get_session(c, s["id"], fresh_tenant) == s
        assert listed(c, fresh_tenant, limit=1) == [s]
    assert len(listed(c, fresh_tenant)) == 30


def test_read_your_writes_updates_tools_and_deletes(c, fresh_tenant):
    s = create(c, {}, fresh_tenant)
    for i in range(20):
        r = c.patch(f"/sessions/{s['id']}", json={"situation": f"v{i}", "tools": [tool(f"t{i}")]}, headers=fresh_tenant)
        assert r.status_code == 200
        assert get_session(c, s["id"], fresh_tenant) == r.json()
        assert tools(c, s["id"], fresh_tenant) == [tool(f"t{i}")]
        assert listed(c, fresh_tenant) == [r.json()]
    for _ in range(10):
        d = create(c, {}, fresh_tenant)
        assert c.delete(f"/sessions/{d['id']}", headers=fresh_tenant).status_code == 202
        assert [x["id"] for x in listed(c, fresh_tenant)] == [s["id"]]
        assert_error(c.get(f"/sessions/{d['id']}", headers=fresh_tenant), 404, "not_found")


# -- concurrency -------------------------------------------------------------------------------------
def test_concurrent_messages_get_distinct_positions(c, stack):
    s = create(c)
    n = 20
    barrier = threading.Barrier(n)
    clients = [httpx.Client(base_url=stack.api.url, headers=ACME, timeout=15) for _ in range(n)]
    try:
        for cl in clients:  # open the connections first, so the posts start together
            assert cl.get("/health").status_code == 200

        def post(i: int) -> httpx.Response:
            barrier.wait()
            return clients[i].post(f"/sessions/{s['id']}/messages", json={"role": "user", "content": f"c{i}"})

        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(post, range(n)))
    finally:
        for cl in clients:
            cl.close()
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [201] * n, [r.text for r in answers if r.status_code != 201]
    by_seq = sorted((r.json() for r in answers), key=lambda m: m["seq"])
    assert [m["seq"] for m in by_seq] == list(range(1, n + 1))
    assert messages(c, s["id"]) == by_seq
    assert sorted(m["content"] for m in by_seq) == sorted(f"c{i}" for i in range(n))
    assert get_session(c, s["id"])["version"] == n + 1


# -- a second API process ----------------------------------------------------------------------------
def test_configured_limits_are_enforced(stack, spawn):
    api = spawn(
        "api",
        stack.redis.url,
        {"PARLEY_API_KEYS": ALL_KEYS, "PARLEY_MAX_CONTENT_CHARS": "50", "PARLEY_MAX_BODY_BYTES": "4096"},
    )
    with httpx.Client(base_url=api.url, headers=ACME, timeout=15) as small:
        s = create(small)
        m = add_message(small, s["id"], {"role": "user", "content": "x" * 50})
        assert_error(
            small.post(f"/sessions/{s['id']}/messages", json={"role": "user", "content": "x" * 51}),
            422,
            "validation_failed",
        )
        assert_error(
            small.post(f"/sessions/{s['id']}/messages", json={"role": "user", "content": "y" * 5000}),
            413,
            "payload_too_large",
        )
        assert_error(small.patch(f"/sessions/{s['id']}", json={"situation": "z" * 51}), 422, "validation_failed")
        assert messages(small, s["id"]) == [m]
        assert get_session(small, s["id"])["version"] == 2


def test_two_api_processes_agree(c, stack, spawn):
    other_api = spawn("api", stack.redis.url, {"PARLEY_API_KEYS": ALL_KEYS})
    with httpx.Client(base_url=other_api.url, headers=ACME, timeout=15) as other:
        s = create(c)
        assert get_session(other, s["id"]) == s  # written through one, read through the other

        # `c`'s API caches the session at version 1; `other` moves it to 2
        r = other.patch(f"/sessions/{s['id']}", json={"situation": "from other"})
        assert r.status_code == 200 and r.headers["ETag"] == '"2"'
        assert get_session(c, s["id"]) == r.json()
        assert_error(
            c.patch(f"/sessions/{s['id']}", json={"agent_id": "stale"}, headers={**ACME, "If-Match": '"1"'}),
            412,
            "version_conflict",
        )
        assert get_session(other, s["id"]) == r.json()
        ok = c.patch(f"/sessions/{s['id']}", json={"agent_id": "fresh"}, headers={**ACME, "If-Match": '"2"'})
        assert ok.status_code == 200 and ok.json()["version"] == 3 and ok.json()["situation"] == "from other"

        # messages from both processes interleave with consecutive positions
        seqs = []
        for i in range(6):
            seqs.append(add_message(c if i % 2 else other, s["id"], {"role": "user", "content": str(i)})["seq"])
        assert seqs == [1, 2, 3, 4, 5, 6]
        assert messages(c, s["id"]) == messages(other, s["id"])

        # an idempotent retry through the other process answers the first answer
        key = {**ACME, "Idempotency-Key": "two-apis"}
        first = c.post(f"/sessions/{s['id']}/messages", json={"role": "user", "content": "once"}, headers=key)
        again = other.post(f"/sessions/{s['id']}/messages", json={"role": "user", "content": "once"}, headers=key)
        assert first.status_code == again.status_code == 201 and again.content == first.content
        assert len(messages(c, s["id"])) == 7

        dkey = {**ACME, "Idempotency-Key": "two-apis-delete"}
        deleted = other.delete(f"/sessions/{s['id']}", headers=dkey)
        assert deleted.status_code == 202
        retried = c.delete(f"/sessions/{s['id']}", headers=dkey)
        assert retried.status_code == 202 and retried.content == deleted.content
        assert_error(
            c.post(f"/sessions/{s['id']}/messages", json={"role": "user", "content": "late"}, headers=ACME),
            404,
            "not_found",
        )
        assert_error(c.get(f"/sessions/{s['id']}", headers=ACME), 404, "not_found")


def test_a_body_nested_too_deeply_is_refused_and_creates_nothing(c, fresh_tenant):
    raw = b'{"metadata":{"a":' + b"[" * 5000 + b"]" * 5000 + b"}}"
    r = c.post("/sessions", content=raw, headers={**fresh_tenant, **JSON})
    assert_error(r, 422, "validation_failed")
    assert listed(c, fresh_tenant) == []
