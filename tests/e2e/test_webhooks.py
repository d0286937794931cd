"""Webhooks over real HTTP: a real API and worker on a real redis-server deliver to a real loopback receiver
(`PARLEY_WEBHOOKS_ALLOW_PRIVATE=1`). Signed deliveries in order, a failing receiver retried with the same
`webhook-id`, the deliveries list, a replay, tenants apart, and bad input refused with nothing written."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.domain.webhooks import delivery_id
from tests.e2e.helpers import ACME, GLOBEX, Stack, assert_error, create, running_stack
from tests.receiver import Receiver, receiving
from tests.support import ParleyProcess

pytestmark = pytest.mark.slow

ENV = {
    "PARLEY_WEBHOOKS_ALLOW_PRIVATE": "1",
    "PARLEY_WEBHOOK_POLL_S": "0.05",
    "PARLEY_WEBHOOK_RETRY_BASE_S": "0.05",
    "PARLEY_WEBHOOK_RETRY_MAX_S": "0.2",
    "PARLEY_WEBHOOK_TIMEOUT_S": "2",
}
TIMEOUT_S = 30.0
"""Only an upper bound for what must happen; a passing test never waits it out."""


def until(check: Callable[[], Any], what: str, timeout_s: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)
    return result


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("webhooks"), ENV) as s:
        yield s


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with receiving() as r:
        yield r


@pytest.fixture
def c(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api.url, timeout=30) as client:
        yield client


def subscribe(c: httpx.Client, url: str, types: list[str], headers: dict[str, str] = ACME) -> dict[str, Any]:
    resp = c.post("/webhooks", json={"url": url, "event_types": types}, headers=headers)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert resp.headers["location"] == f"/webhooks/{body['id']}"
    assert body["secret"].startswith("whsec_")
    return body


def events_of(c: httpx.Client, sid: str, headers: dict[str, str] = ACME) -> list[dict[str, Any]]:
    resp = c.get(f"/sessions/{sid}/events", headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()["items"]  # type: ignore[no-any-return]


def test_signed_deliveries_arrive_in_order_and_are_listed(c: httpx.Client, receiver: Receiver):
    hook = subscribe(c, receiver.url + "/ordered", ["SessionCreated", "ChatCompleted", "SessionDeleted"])
    assert "secret" not in c.get(f"/webhooks/{hook['id']}", headers=ACME).json()
    assert [h["id"] for h in c.get("/webhooks", headers=ACME).json()["items"]].count(hook["id"]) == 1
    sid = create(c, {"agent_id": "hooked"})["id"]
    chat = c.post(f"/sessions/{sid}/chat", json={"messages": [{"role": "user", "content": "hi"}]}, headers=ACME)
    assert chat.status_code == 200, chat.text
    assert c.delete(f"/sessions/{sid}", headers=ACME).status_code == 202

    got = until(lambda: len(receiver.taken("/ordered")) >= 3 and receiver.taken("/ordered"), "three deliveries")
    logged = {e["type"]: e for e in events_of(c, sid)}
    assert [r.payload["type"] for r in got] == ["SessionCreated", "ChatCompleted", "SessionDeleted"]
    for r in got:
        assert r.verified(hook["secret"]), r
        assert r.payload["session_id"] == sid
        assert r.event == logged[r.payload["type"]]  # the event as /events shows it
        assert r.msg_id == delivery_id(hook["id"], r.event["id"])
        assert abs(r.timestamp - time.time()) < 300
    assert len(receiver.at("/ordered")) == 3  # once each

    listed = c.get(f"/webhooks/{hook['id']}/deliveries", headers=ACME)
    assert listed.status_code == 200
    items = listed.json()["items"]
    assert [(d["event_type"], d["outcome"], d["status_code"], d["attempt"]) for d in items] == [
        ("SessionDeleted", "succeeded", 200, 1),
        ("ChatCompleted", "succeeded", 200, 1),
        ("SessionCreated", "succeeded", 200, 1),
    ]
    assert [d["id"] for d in reversed(items)] == [r.msg_id for r in got]
    assert c.get(f"/webhooks/{hook['id']}/deliveries?limit=1", headers=ACME).json()["items"] == items[:1]

    # a replay from the first delivery's position delivers all three again, with their ids
    first = items[-1]["position"]
    resp = c.post(f"/webhooks/{hook['id']}/replay", json={"from": first}, headers=ACME)
    assert resp.status_code == 200, resp.text
    again = until(lambda: len(receiver.taken("/ordered")) >= 6 and receiver.taken("/ordered")[3:], "the replay")
    assert [r.msg_id for r in again] == [r.msg_id for r in got]
    assert c.delete(f"/webhooks/{hook['id']}", headers=ACME).status_code == 204
    assert_error(c.get(f"/webhooks/{hook['id']}", headers=ACME), 404, "not_found")


def test_a_failing_receiver_is_retried_with_the_same_id(c: httpx.Client, receiver: Receiver):
    receiver.fail_first["/flaky"] = 2
    hook = subscribe(c, receiver.url + "/flaky", ["SessionCreated"])
    sid = create(c)["id"]
    [ok] = until(lambda: receiver.taken("/flaky"), "the third attempt")
    tries = receiver.at("/flaky")
    assert [r.status for r in tries] == [500, 500, 200]
    assert {r.msg_id for r in tries} == {ok.msg_id} and ok.event["type"] == "SessionCreated"
    assert ok.payload["session_id"] == sid and all(r.verified(hook["secret"]) for r in tries)
    items = until(
        lambda: (i := c.get(f"/webhooks/{hook['id']}/deliveries", headers=ACME).json()["items"]) and len(i) == 3 and i,
        "three attempts listed",
    )
    assert [(d["attempt"], d["outcome"], d["status_code"]) for d in items] == [
        (3, "succeeded", 200),
        (2, "retrying", 500),
        (1, "retrying", 500),
    ]
    assert {d["id"] for d in items} == {ok.msg_id}


def test_paused_and_resumed_subscriptions_miss_nothing(c: httpx.Client, receiver: Receiver):
    hook = subscribe(c, receiver.url + "/paused", ["SessionCreated"])
    resp = c.patch(f"/webhooks/{hook['id']}", json={"active": False}, headers=ACME)
    assert resp.status_code == 200 and resp.json()["active"] is False
    sids = [create(c)["id"] for _ in range(3)]
    assert c.patch(f"/webhooks/{hook['id']}", json={"active": True}, headers=ACME).status_code == 200
    got = until(lambda: len(receiver.taken("/paused")) >= 3 and receiver.taken("/paused"), "the paused deliveries")
    assert sorted(r.payload["session_id"] for r in got) == sorted(sids)


def test_tenants_see_only_their_own(c: httpx.Client, receiver: Receiver):
    mine = subscribe(c, receiver.url + "/acme", ["SessionCreated"])
    theirs = subscribe(c, receiver.url + "/globex", ["SessionCreated"], GLOBEX)
    for method, path in [
        ("GET", ""),
        ("PATCH", ""),
        ("DELETE", ""),
        ("GET", "/deliveries"),
        ("POST", "/replay"),
    ]:
        body = {"active": False} if method == "PATCH" else {"from": "0"} if method == "POST" else None
        resp = c.request(method, f"/webhooks/{mine['id']}{path}", json=body, headers=GLOBEX)
        assert_error(resp, 404, "not_found")
    assert mine["id"] not in [h["id"] for h in c.get("/webhooks", headers=GLOBEX).json()["items"]]
    a, g = create(c)["id"], create(c, headers=GLOBEX)["id"]
    until(lambda: receiver.taken("/acme") and receiver.taken("/globex"), "both tenants' deliveries")
    assert [r.payload["session_id"] for r in receiver.taken("/acme")] == [a]
    assert [r.payload["session_id"] for r in receiver.taken("/globex")] == [g]
    assert c.get(f"/webhooks/{mine['id']}", headers=ACME).json()["active"] is True  # globex's PATCH did nothing
    assert theirs["id"] in [h["id"] for h in c.get("/webhooks", headers=GLOBEX).json()["items"]]


@pytest.mark.parametrize(
    "body",
    [
        {"url": "http://example.com/h", "event_types": ["MessageAdded"]},  # not a webhook type
        {"url": "http://example.com/h", "event_types": []},
        {"url": "ftp://example.com/h", "event_types": ["ChatCompleted"]},
        {"url": "http://example.com/h", "event_types": ["ChatCompleted"], "secret": "short"},
        {"url": "http://example.com/h", "event_types": ["ChatCompleted"], "extra": 1},
        {"event_types": ["ChatCompleted"]},
    ],
)
def test_bad_input_is_a_422_and_writes_nothing(c: httpx.Client, body: dict[str, Any]):
    before = c.get("/webhooks", headers=ACME).json()["items"]
    assert_error(c.post("/webhooks", json=body, headers=ACME), 422)
    assert c.get("/webhooks", headers=ACME).json()["items"] == before


def test_private_urls_are_refused_unless_allowed(stack: Stack, tmp_path: Path, receiver: Receiver):
    strict = ParleyProcess("api", stack.redis.url, tmp_path, {**ENV, "PARLEY_WEBHOOKS_ALLOW_PRIVATE": "0"}).start()
    try:
        with httpx.Client(base_url=strict.url, timeout=30) as c:
            before = c.get("/webhooks", headers=GLOBEX).json()["items"]
            for url in [receiver.url + "/x", "http://localhost:9/x", "http://169.254.169.254/latest", "http://[::1]/"]:
                resp = c.post("/webhooks", json={"url": url, "event_types": ["ChatCompleted"]}, headers=GLOBEX)
                assert_error(resp, 422, "webhook_url_refused")
            assert c.get("/webhooks", headers=GLOBEX).json()["items"] == before
            [hook, *_] = before  # made on the lax API: its URL cannot be changed to a private one here
            resp = c.patch(f"/webhooks/{hook['id']}", json={"url": "http://10.0.0.1/x"}, headers=GLOBEX)
            assert_error(resp, 422, "webhook_url_refused")
            assert c.get(f"/webhooks/{hook['id']}", headers=GLOBEX).json() == hook
    finally:
        strict.stop()


def test_every_change_of_a_subscription_is_recorded_without_its_secret(c: httpx.Client, receiver: Receiver):
    def changes(headers: dict[str, str] = ACME) -> list[dict[str, Any]]:
        items, after = [], None
        while True:
            params = {"limit": 2, **({"after": after} if after else {})}
            resp = c.get("/audit/webhooks", params=params, headers=headers)
            assert resp.status_code == 200, resp.text
            items += resp.json()["items"]
            if (after := resp.json()["next"]) is None:
                return items

    seen = len(changes())
    hook = subscribe(c, receiver.url + "/audited", ["ChatFailed"])
    assert c.patch(f"/webhooks/{hook['id']}", json={"active": False}, headers=ACME).status_code == 200
    assert c.post(f"/webhooks/{hook['id']}/replay", json={"from": "0"}, headers=ACME).status_code == 200
    assert c.delete(f"/webhooks/{hook['id']}", headers=ACME).status_code == 204
    assert_error(c.delete(f"/webhooks/{hook['id']}", headers=ACME), 404)  # refused: not recorded
    mine = changes()[seen:]
    assert [(x["type"], x["data"]) for x in mine] == [
        ("WebhookCreated", {"webhook_id": hook["id"], "url": hook["url"], "event_types": ["ChatFailed"]}),
        ("WebhookUpdated", {"webhook_id": hook["id"], "active": False}),
        ("WebhookReplayed", {"webhook_id": hook["id"], "from": "0"}),
        ("WebhookDeleted", {"webhook_id": hook["id"]}),
    ]
    assert hook["secret"] not in str(changes())
    assert hook["id"] not in str(changes(GLOBEX))
    assert_error(c.get("/audit/webhooks", params={"after": "x"}, headers=ACME), 422)


def test_a_rotated_secret_signs_beside_the_new_one_and_is_audited(c: httpx.Client, receiver: Receiver):
    hook = subscribe(c, receiver.url + "/rotated", ["SessionCreated"])
    assert_error(c.post(f"/webhooks/{hook['id']}/rotate-secret", json={}, headers=GLOBEX), 404, "not_found")
    for bad in ({"previous_valid_s": -1}, {"previous_valid_s": 604_801}, {"secret": "nope"}, {"extra": 1}):
        assert_error(c.post(f"/webhooks/{hook['id']}/rotate-secret", json=bad, headers=ACME), 422)
    resp = c.post(f"/webhooks/{hook['id']}/rotate-secret", json={}, headers=ACME)
    assert resp.status_code == 200, resp.text
    rotated = resp.json()
    assert (
        rotated["id"] == hook["id"] and rotated["secret"].startswith("whsec_") and rotated["secret"] != hook["secret"]
    )
    create(c, {})
    [got] = until(lambda: receiver.taken("/rotated"), "a delivery")
    assert got.verified(rotated["secret"]) and got.verified(hook["secret"])  # a day of both, by default
    assert len(got.signature.split()) == 2

    resp = c.post(f"/webhooks/{hook['id']}/rotate-secret", json={"previous_valid_s": 0}, headers=ACME)
    latest = resp.json()["secret"]
    create(c, {})
    second = until(lambda: len(receiver.taken("/rotated")) >= 2 and receiver.taken("/rotated")[1], "the next")
    assert second.verified(latest) and not second.verified(rotated["secret"]) and not second.verified(hook["secret"])

    audit = c.get("/audit/webhooks", params={"limit": 1000}, headers=ACME).json()["items"]
    mine = [x for x in audit if x["data"]["webhook_id"] == hook["id"] and x["type"] == "WebhookSecretRotated"]
    assert len(mine) == 2 and mine[0]["data"]["previous_until"] is not None and "previous_until" not in mine[1]["data"]
    assert not any(secret in str(audit) for secret in (hook["secret"], rotated["secret"], latest))
    assert c.delete(f"/webhooks/{hook['id']}", headers=ACME).status_code == 204


def test_the_schema_documents_the_webhook_routes(c: httpx.Client):
    doc = c.get("/schema/openapi.json").json()
    paths = doc["paths"]
    assert set(paths["/webhooks"]) >= {"get", "post"}
    assert set(paths["/webhooks/{webhook_id}"]) >= {"get", "patch", "delete"}
    create_op = paths["/webhooks"]["post"]["responses"]
    assert "Location" in create_op["201"]["headers"] and "webhook_url_refused" in create_op["422"]["description"]
    assert "404" in paths["/webhooks/{webhook_id}/deliveries"]["get"]["responses"]
    assert (
        "webhook_url_refused" not in paths["/webhooks/{webhook_id}/replay"]["post"]["responses"]["422"]["description"]
    )
