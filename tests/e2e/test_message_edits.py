"""Editing and removing one message, end to end: `PATCH` / `DELETE /sessions/{id}/messages/{message_id}` as
`MessageEdited` / `MessageRemoved` events. The list shows the current text (or omits the removed message), time
travel shows what was there at each version, bad input changes nothing, and a purge still erases every version
of the text.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis as redis_sync

from tests.e2e.helpers import ACME, GLOBEX, Stack, add_message, assert_error, create, running_stack
from tests.e2e.test_history_api import dump, holders
from tests.support import API_KEYS


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("e2e-edits"), {"PARLEY_API_KEYS": API_KEYS}) as stack:
        yield stack


@pytest.fixture(scope="module")
def c(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api.url, timeout=15) as client:
        yield client


def messages(c: httpx.Client, sid: str, **params: object) -> list[dict]:
    resp = c.get(f"/sessions/{sid}/messages", params=params, headers=ACME)
    assert resp.status_code == 200, resp.text
    return resp.json()["items"]


def version_of(c: httpx.Client, sid: str) -> int:
    return c.get(f"/sessions/{sid}", headers=ACME).json()["version"]


def test_an_edit_changes_the_list_and_time_travel_keeps_the_original(c):
    sid = create(c)["id"]
    first = add_message(c, sid, {"role": "user", "content": "the original question"})
    add_message(c, sid, {"role": "assistant", "content": "an answer"})
    before = version_of(c, sid)
    resp = c.patch(f"/sessions/{sid}/messages/{first['id']}", json={"content": "the edited question"}, headers=ACME)
    assert resp.status_code == 200, resp.text
    edited = resp.json()
    assert edited["id"] == first["id"] and edited["seq"] == 1 and edited["content"] == "the edited question"
    assert edited["edited_at"] is not None
    listed = messages(c, sid)
    assert [m["content"] for m in listed] == ["the edited question", "an answer"]
    assert c.get(f"/sessions/{sid}/messages/{first['id']}", headers=ACME).json() == listed[0]
    # the past is kept: right before the edit, the original text
    assert [m["content"] for m in messages(c, sid, version=before)] == ["the original question", "an answer"]
    log = c.get(f"/sessions/{sid}/events", headers=ACME).json()["items"]
    assert log[-1]["type"] == "MessageEdited" and log[-1]["version"] == before + 1


def test_an_edit_of_the_name_only_keeps_the_content(c):
    sid = create(c)["id"]
    m = add_message(c, sid, {"role": "user", "content": "hi", "name": "alice"})
    resp = c.patch(f"/sessions/{sid}/messages/{m['id']}", json={"name": "bob"}, headers=ACME)
    assert resp.status_code == 200, resp.text
    assert (resp.json()["name"], resp.json()["content"]) == ("bob", "hi")


def test_a_removal_omits_the_message_and_time_travel_still_shows_it(c):
    sid = create(c)["id"]
    ids = [add_message(c, sid, {"role": "user", "content": f"message {i}"})["id"] for i in range(3)]
    before = version_of(c, sid)
    resp = c.delete(f"/sessions/{sid}/messages/{ids[1]}", headers=ACME)
    assert resp.status_code == 200, resp.text
    assert resp.json()["id"] == ids[1] and resp.json()["content"] == "message 1"
    assert [m["content"] for m in messages(c, sid)] == ["message 0", "message 2"]
    assert [m["content"] for m in messages(c, sid, version=before)] == ["message 0", "message 1", "message 2"]
    assert_error(c.get(f"/sessions/{sid}/messages/{ids[1]}", headers=ACME), 404, "not_found")
    assert_error(c.delete(f"/sessions/{sid}/messages/{ids[1]}", headers=ACME), 404, "not_found")
    assert_error(c.patch(f"/sessions/{sid}/messages/{ids[1]}", json={"content": "x"}, headers=ACME), 404, "not_found")
    assert version_of(c, sid) == before + 1  # the refused ones wrote nothing


def test_removing_an_assistant_turn_that_called_a_tool_closes_the_call(c):
    sid = create(c)["id"]
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    turn = add_message(c, sid, {"role": "assistant", "content": None, "tool_calls": [call]})
    assert c.delete(f"/sessions/{sid}/messages/{turn['id']}", headers=ACME).status_code == 200
    resp = c.post(
        f"/sessions/{sid}/messages", json={"role": "tool", "tool_call_id": "call_1", "content": "42"}, headers=ACME
    )
    assert resp.status_code == 422, resp.text


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"content": "x", "role": "assistant"}, 422),  # role cannot change
        ({"name": "has space"}, 422),
        ({"content": 5}, 422),
        ({"content": None}, 422),  # null content only on an assistant message with tool calls
        ({"content": "x" * 2_000_000}, 413),
    ],
)
def test_bad_edits_are_refused_and_change_nothing(c, body, status):
    sid = create(c)["id"]
    m = add_message(c, sid, {"role": "user", "content": "keep me"})
    before = version_of(c, sid)
    assert c.patch(f"/sessions/{sid}/messages/{m['id']}", json=body, headers=ACME).status_code == status
    assert version_of(c, sid) == before
    assert [x["content"] for x in messages(c, sid)] == ["keep me"]


def test_another_tenants_or_an_unknown_message_is_not_found(c):
    sid = create(c)["id"]
    m = add_message(c, sid, {"role": "user", "content": "mine"})
    other = create(c)["id"]
    assert_error(
        c.patch(f"/sessions/{sid}/messages/{m['id']}", json={"content": "x"}, headers=GLOBEX), 404, "not_found"
    )
    assert_error(c.delete(f"/sessions/{sid}/messages/{m['id']}", headers=GLOBEX), 404, "not_found")
    assert_error(c.get(f"/sessions/{sid}/messages/{m['id']}", headers=GLOBEX), 404, "not_found")
    # a message id of another session of the same tenant
    assert_error(
        c.patch(f"/sessions/{other}/messages/{m['id']}", json={"content": "x"}, headers=ACME), 404, "not_found"
    )
    assert_error(c.delete(f"/sessions/{sid}/messages/{uuid.uuid4()}", headers=ACME), 404, "not_found")
    assert_error(c.delete(f"/sessions/{sid}/messages/not-an-id", headers=ACME), 404, "not_found")
    assert [x["content"] for x in messages(c, sid)] == ["mine"]


def test_an_edit_with_an_idempotency_key_is_applied_once(c):
    sid = create(c)["id"]
    m = add_message(c, sid, {"role": "user", "content": "v1"})
    headers = {**ACME, "Idempotency-Key": secrets.token_hex(8)}
    first = c.patch(f"/sessions/{sid}/messages/{m['id']}", json={"content": "v2"}, headers=headers)
    again = c.patch(f"/sessions/{sid}/messages/{m['id']}", json={"content": "v2"}, headers=headers)
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    log = c.get(f"/sessions/{sid}/events", headers=ACME).json()["items"]
    assert [e["type"] for e in log].count("MessageEdited") == 1


def test_a_purge_erases_every_version_of_an_edited_message(stack: Stack, c):
    sid = create(c)["id"]
    original, edited = f"mkorig{secrets.token_hex(8)}", f"mkedit{secrets.token_hex(8)}"
    m = add_message(c, sid, {"role": "user", "content": original})
    assert c.patch(f"/sessions/{sid}/messages/{m['id']}", json={"content": edited}, headers=ACME).status_code == 200
    r = redis_sync.Redis.from_url(stack.redis.url)
    try:
        db = dump(r)
        assert holders(db, original) and holders(db, edited)  # the scan can fail
        assert c.delete(f"/sessions/{sid}", params={"purge": "true"}, headers=ACME).status_code == 202
        db = dump(r)
        assert holders(db, original) == [] and holders(db, edited) == []
    finally:
        r.close()
