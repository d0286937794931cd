"""Hostile and malformed input gets a clear 4xx in the one error shape and changes nothing.

Each case here answered 500, or was accepted, before: Unicode digits in `If-Match`, bodies that are not JSON but
sent as something else (or JSON sent as a form), duplicate JSON keys, query integers written `1e3` or `1.0`,
malformed `Idempotency-Key` and `Last-Event-ID`. Real `parley api` and `parley worker` processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.helpers import ACME, JSON, Stack, add_message, assert_error, create, running_stack

UNICODE_DIGITS = ["²", "٣", "𝟕", "①", "٣٣", "1²"]
"""`str.isdigit` accepts these and `int` does not (or reads them as other numbers)."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("e2e-hostile"), {}) as stack:
        yield stack


@pytest.fixture(scope="module")
def c(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api.url, timeout=15) as client:
        yield client


def raw_headers(**headers: str) -> list[tuple[bytes, bytes]]:
    """Headers as UTF-8 bytes (httpx would refuse non-ASCII text), the way a hostile client sends them."""
    return [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]


def unchanged(c: httpx.Client, sid: str, version: int, messages: int) -> None:
    got = c.get(f"/sessions/{sid}", headers=ACME).json()
    assert got["version"] == version, got
    assert len(c.get(f"/sessions/{sid}/messages", headers=ACME).json()["items"]) == messages


@pytest.mark.parametrize(
    "etag",
    [
        *UNICODE_DIGITS,
        '"²"',
        'W/"٣"',
        '"1',
        '1"',
        '""',
        '"-1"',
        '"1.0"',
        '"99999999999999999999999"',
        "abc",
        '"1", "2"',
    ],
)
@pytest.mark.parametrize("method", ["PATCH", "PUT", "DELETE"])
def test_a_malformed_if_match_is_412_and_changes_nothing(c, method, etag):
    s = create(c)
    headers = [
        *raw_headers(**{"If-Match": etag}),
        (b"authorization", ACME["Authorization"].encode()),
        (b"content-type", b"application/json"),
    ]
    body = b'{"agent_id":"changed"}' if method != "DELETE" else None
    r = c.request(method, f"/sessions/{s['id']}", content=body, headers=headers)
    assert_error(r, 412, "version_conflict")
    unchanged(c, s["id"], 1, 0)


@pytest.mark.parametrize("key", ["", "é", "²", "x" * 256, "tab\there"])
def test_a_malformed_idempotency_key_is_422_and_writes_nothing(c, key):
    s = create(c)
    headers = [
        *raw_headers(**{"Idempotency-Key": key}),
        (b"authorization", ACME["Authorization"].encode()),
        (b"content-type", b"application/json"),
    ]
    r = c.post(f"/sessions/{s['id']}/messages", content=b'{"role":"user","content":"x"}', headers=headers)
    assert_error(r, 422, "validation_failed")
    unchanged(c, s["id"], 1, 0)


def test_a_request_the_http_parser_refuses_is_400_in_the_one_error_shape(c):
    s = create(c)
    headers = [
        *raw_headers(**{"Idempotency-Key": "nul\x01"}),
        (b"authorization", ACME["Authorization"].encode()),
        (b"content-type", b"application/json"),
    ]
    r = c.post(f"/sessions/{s['id']}/messages", content=b'{"role":"user","content":"x"}', headers=headers)
    assert_error(r, 400, "bad_request")
    unchanged(c, s["id"], 1, 0)


@pytest.mark.parametrize("last_event_id", [*UNICODE_DIGITS, "-1", "1.5", "1e3", "99999999999999999999999"])
def test_a_malformed_last_event_id_is_422(c, last_event_id):
    s = create(c)
    headers = [
        *raw_headers(**{"Last-Event-ID": last_event_id}),
        (b"authorization", ACME["Authorization"].encode()),
        (b"accept", b"text/event-stream"),
    ]
    assert_error(c.get(f"/sessions/{s['id']}/events", headers=headers), 422, "validation_failed")
    job = c.post(
        f"/sessions/{s['id']}/chat",
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers={**ACME, "Prefer": "respond-async"},
    ).json()["id"]
    assert_error(c.get(f"/sessions/{s['id']}/chats/{job}/stream", headers=headers), 422, "validation_failed")


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "image/png",
        "text/json",
        "application/jsonx",
        None,
    ],
)
def test_a_body_that_is_not_declared_json_is_415_and_writes_nothing(c, content_type):
    s = create(c)
    headers = {**ACME, **({"Content-Type": content_type} if content_type else {})}
    body = b'{"role":"user","content":"smuggled"}'
    r = c.post(f"/sessions/{s['id']}/messages", content=body, headers=headers)
    assert_error(r, 415, "unsupported_media_type")
    assert_error(c.post("/sessions", content=b"{}", headers=headers), 415, "unsupported_media_type")
    assert_error(
        c.post(f"/sessions/{s['id']}/chat", content=b'{"messages":[]}', headers=headers), 415, "unsupported_media_type"
    )
    unchanged(c, s["id"], 1, 0)


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "application/vnd.parley+json"],
)
def test_json_with_or_without_parameters_and_json_suffixed_types_are_accepted(c, content_type):
    s = create(c)
    r = c.post(
        f"/sessions/{s['id']}/messages",
        content=b'{"role":"user","content":"ok"}',
        headers={**ACME, "Content-Type": content_type},
    )
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "body",
    [
        b'{"role":"user","content":"a","content":"b"}',
        b'{"role":"user","role":"system","content":"a"}',
        b'{"role" : "user", "content" : "a" , "content" : "b"}',
        b'{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","name":"g","arguments":"{}"}}]}',
    ],
)
def test_duplicate_json_keys_are_422_and_write_nothing(c, body):
    s = create(c)
    r = c.post(f"/sessions/{s['id']}/messages", content=body, headers={**ACME, **JSON})
    err = assert_error(r, 422, "validation_failed")
    assert "more than once" in err["message"]
    unchanged(c, s["id"], 1, 0)


def test_duplicate_keys_are_refused_on_every_body(c):
    s = create(c)
    for path, body in [
        ("/sessions", b'{"agent_id":"a","agent_id":"b"}'),
        (f"/sessions/{s['id']}/chat", b'{"messages":[],"stream":false,"stream":true}'),
        (f"/sessions/{s['id']}/chat/completions", b'{"messages":[{"role":"user","content":"a","content":"b"}]}'),
    ]:
        assert c.post(path, content=body, headers={**ACME, **JSON}).status_code == 422, path
    r = c.patch(f"/sessions/{s['id']}", content=b'{"metadata":{"k":1,"k":2}}', headers={**ACME, **JSON})
    assert_error(r, 422, "validation_failed")
    unchanged(c, s["id"], 1, 0)


@pytest.mark.parametrize("value", ["1e3", "1.0", "+5", " 5", "5 ", "0x10", "1_0", "01", *UNICODE_DIGITS])
def test_query_integers_are_decimal_digits_only(c, value):
    s = create(c)
    add_message(c, s["id"], {"role": "user", "content": "hi"})
    for path, name in [
        ("/sessions", "limit"),
        ("/sessions", "offset"),
        (f"/sessions/{s['id']}/messages", "limit"),
        (f"/sessions/{s['id']}/events", "after"),
        (f"/sessions/{s['id']}", "version"),
        ("/usage", "days"),
    ]:
        r = c.get(path, params={name: value}, headers=ACME)
        err = assert_error(r, 422, "validation_failed")
        assert err["details"][0]["message"].startswith("Expected a decimal integer"), (path, err)


def test_a_body_nested_too_deeply_is_422_wherever_a_typed_field_meets_it_first(c):
    """The decoder fails on the typed field before it reaches the nesting; the syntax check that follows must
    still answer 422 (it raised RecursionError outside the handler that catches it: a 500)."""
    s = create(c)
    deep = "[" * 1000 + "]" * 1000
    for path, body in [
        ("/sessions", '{"agent_id":%s}' % deep),
        (f"/sessions/{s['id']}/messages", '{"role":"user","content":%s}' % deep),
        (f"/sessions/{s['id']}/chat/completions", '{"messages":%s}' % deep),
        ("/webhooks", '{"url":"https://example.com/h","event_types":%s}' % deep),
    ]:
        r = c.post(path, content=body.encode(), headers={**ACME, **JSON})
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_failed", (path, r.text)
    unchanged(c, s["id"], 1, 0)
    assert c.get("/webhooks", headers=ACME).json()["items"] == []


@pytest.mark.parametrize(
    "path", ["/sessions/{sid}/messages", "/sessions/{sid}/chat", "/sessions/{sid}/chat/completions"]
)
def test_an_empty_body_where_one_is_required_says_so(c, path):
    s = create(c)
    r = c.post(path.format(sid=s["id"]), content=b"", headers={**ACME, **JSON})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    assert "body is empty" in r.json()["error"]["message"] and "data" not in r.text
    unchanged(c, s["id"], 1, 0)


def test_a_purge_honours_its_idempotency_key_before_it_erases_anything(c):
    """A key used for another request (a PATCH; a plain DELETE, which differs from a purge by its query only) is
    refused with 422 and the session is not erased. The erase takes the session's keys with it: a retry of a
    finished purge answers 404."""
    s = create(c)
    key = {"Idempotency-Key": "purge-1"}
    assert c.patch(f"/sessions/{s['id']}", json={"agent_id": "x"}, headers={**ACME, **key}).status_code == 200
    r = c.delete(f"/sessions/{s['id']}", params={"purge": "true"}, headers={**ACME, **key})
    assert_error(r, 422, "idempotency_key_reused")
    assert c.get(f"/sessions/{s['id']}", headers=ACME).json()["version"] == 2

    other = {"Idempotency-Key": "purge-2"}
    assert c.delete(f"/sessions/{s['id']}", headers={**ACME, **other}).status_code == 202
    r = c.delete(f"/sessions/{s['id']}", params={"purge": "true"}, headers={**ACME, **other})
    assert_error(r, 422, "idempotency_key_reused")
    assert [e["type"] for e in c.get(f"/sessions/{s['id']}/events", headers=ACME).json()["items"]][
        -1
    ] == "SessionDeleted"

    fresh = create(c)
    again = {"Idempotency-Key": "purge-3"}
    done = c.delete(f"/sessions/{fresh['id']}", params={"purge": "true"}, headers={**ACME, **again})
    assert done.status_code == 202 and done.json()["purged"] is True
    assert_error(c.delete(f"/sessions/{fresh['id']}", params={"purge": "true"}, headers={**ACME, **again}), 404)


def test_a_query_parameter_given_twice_is_422(c):
    """litestar reads the last of several, the session filters read the first: one value or a 422, never a guess."""
    s = create(c)
    for path, query in [
        ("/sessions", "limit=1&limit=2"),
        ("/sessions/count", "agent_id=a&agent_id=b"),
        ("/sessions", "metadata.x=1&metadata.x=2"),
        (f"/sessions/{s['id']}/messages", "offset=0&offset=1"),
        (f"/sessions/{s['id']}/events", "after=0&after=0"),
    ]:
        r = c.get(f"{path}?{query}", headers=ACME)
        err = assert_error(r, 422, "validation_failed")
        assert err["details"][0]["source"] == "query" and "more than once" in err["details"][0]["message"], (path, err)
    assert c.get("/sessions?limit=1&offset=0", headers=ACME).status_code == 200


def test_a_retry_naming_the_session_in_uppercase_is_the_same_request(c):
    s = create(c)
    key = {"Idempotency-Key": "upper-1"}
    body = {"role": "user", "content": "once"}
    first = c.post(f"/sessions/{s['id']}/messages", json=body, headers={**ACME, **key})
    again = c.post(f"/sessions/{s['id'].upper()}/messages", json=body, headers={**ACME, **key})
    assert first.status_code == again.status_code == 201 and first.json() == again.json()
    unchanged(c, s["id"], 2, 1)


def test_an_api_key_header_sent_twice_names_no_key(c):
    """Which of two a proxy in front checked is unknown: 401, never the first one silently."""
    s = create(c)
    for headers in (
        [(b"authorization", b"Bearer acme-key"), (b"authorization", b"Bearer wrong")],
        [(b"authorization", b"Bearer acme-key"), (b"authorization", b"Bearer acme-key")],
        [(b"x-auth-key", b"acme-key"), (b"x-auth-key", b"other")],
    ):
        assert_error(c.get(f"/sessions/{s['id']}", headers=headers), 401)
    assert c.get(f"/sessions/{s['id']}", headers=[(b"x-auth-key", b"acme-key")]).status_code == 200
