"""A WHATWG EventSource (npm `eventsource`, the one Node apps use) on both of Parley's event streams, through a
proxy the test cuts mid-stream: it must get every event once, in order, resume with `Last-Event-ID`, and stop once
the stream has ended (Parley's 204), not reconnect every few seconds for ever."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.chat.conftest import Stack
from tests.clients.api import ACME, EVENT_NAMES, KEY, create, say
from tests.clients.node import NodeScript
from tests.clients.proxy import CutProxy
from tests.model_server import ModelServer

pytestmark = pytest.mark.usefixtures("node")  # checked first: a skip (or failure) before any stack starts

CLOSED = 2


def kinds(script: NodeScript, kind: str) -> list[dict[str, Any]]:
    return [r for r in script.reports if r["kind"] == kind]


def connections(script: NodeScript) -> list[tuple[str | None, int]]:
    """(Last-Event-ID sent, status answered) of each connection the EventSource made."""
    sent = {r["n"]: r["last_event_id"] for r in kinds(script, "connect")}
    return [(sent[r["n"]], r["status"]) for r in kinds(script, "response")]


def token(c: httpx.Client, sid: str) -> str:
    r = c.post(f"/sessions/{sid}/stream-tokens", json={"ttl_s": 60}, headers=ACME)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def added(text: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: (
        r["kind"] == "event" and r["type"] == "MessageAdded" and json.loads(r["data"])["data"]["content"] == text
    )


def test_session_events_resume_after_a_cut_and_end_after_the_delete(
    stack: Stack, c: httpx.Client, proxy: CutProxy, run_node: Callable[..., NodeScript]
) -> None:
    sid = create(c)
    es = run_node(
        "eventsource.mjs", url=f"{proxy.url}/sessions/{sid}/events", key=KEY, names=EVENT_NAMES, deadline_ms=30000
    )
    es.expect(lambda r: r["kind"] == "event" and r["type"] == "SessionCreated")
    say(c, sid, "one")
    es.expect(added("one"))
    assert proxy.cut() == 1  # the network drops the live stream
    say(c, sid, "two")  # appended while the client is away
    es.expect(added("two"))
    assert c.delete(f"/sessions/{sid}", headers=ACME).status_code == 202
    result = es.result()  # ends only once the EventSource is CLOSED
    got = kinds(es, "event")
    assert [(e["type"], int(e["id"])) for e in got] == [
        ("SessionCreated", 1),
        ("MessageAdded", 2),
        ("MessageAdded", 3),
        ("SessionDeleted", 4),
    ]
    assert [json.loads(e["data"])["version"] for e in got] == [1, 2, 3, 4]
    assert not kinds(es, "message")  # named events never reach onmessage
    # three connections: the first, the resume after the cut, the one after the end, answered 204
    assert connections(es) == [(None, 200), ("2", 200), ("4", 204)]
    assert result == {"connections": 3, "readyState": CLOSED}
    assert [r.headers.get("last-event-id") for r in proxy.requests("/events")] == [None, "2", "4"]


def test_chat_stream_resumes_mid_answer_and_ends_after_done(
    stack: Stack, c: httpx.Client, model: ModelServer, proxy: CutProxy, run_node: Callable[..., NodeScript]
) -> None:
    sid = create(c)
    text = "please stream a rather long answer of a dozen words or so"
    model.control(chunk_delay_s=0.3)  # ~4 s of answer: the reconnect (3 s later) joins it while it streams
    r = c.post(
        f"/sessions/{sid}/chat",
        json={"messages": [{"role": "user", "content": text}]},
        headers={**ACME, "Prefer": "respond-async"},
    )
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    es = run_node(
        "eventsource.mjs",
        url=f"{proxy.url}/sessions/{sid}/chats/{job}/stream",
        key=KEY,
        names=["chat.failed"],
        deadline_ms=30000,
    )
    es.expect(lambda r: r["kind"] == "message" and json.loads(r["data"])["choices"][0]["delta"].get("content"))
    assert proxy.cut() == 1
    es.expect(lambda r: r["kind"] == "message" and r["data"] == "[DONE]")
    result = es.result()
    messages = kinds(es, "message")
    chunks = [json.loads(m["data"]) for m in messages[:-1]]
    answer = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert answer == f"echo: {text}"  # nothing missed, nothing twice
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    ids = [tuple(int(x) for x in m["id"].split("-")) for m in messages[:-1]]
    assert ids == sorted(set(ids))
    assert messages[-1]["id"] == messages[-2]["id"] + ".1"
    # the resume asked for what followed the last chunk the client had when the connection dropped
    had = next(i for i, r in enumerate(es.reports) if r["kind"] == "connect" and r["n"] == 2)
    last_had = [r["id"] for r in es.reports[:had] if r["kind"] == "message"][-1]
    assert connections(es) == [(None, 200), (last_had, 200), (messages[-1]["id"], 204)]
    assert result == {"connections": 3, "readyState": CLOSED}
    assert not kinds(es, "event")


def test_a_failed_chat_is_a_chat_failed_event_not_an_error(
    stack: Stack, c: httpx.Client, model: ModelServer, run_node: Callable[..., NodeScript]
) -> None:
    sid = create(c)
    model.control(fail_always=500, retry_after_ms=1)
    r = c.post(
        f"/sessions/{sid}/chat",
        json={"messages": [{"role": "user", "content": "fail"}]},
        headers={**ACME, "Prefer": "respond-async"},
    )
    job = r.json()["id"]
    es = run_node(
        "eventsource.mjs",
        url=f"{stack.url}/sessions/{sid}/chats/{job}/stream",
        key=KEY,
        names=["chat.failed", "error"],
        deadline_ms=30000,
    )
    failed = es.expect("event")
    assert failed["type"] == "chat.failed" and json.loads(failed["data"])["error"]["code"] == "model_unavailable"
    result = es.result()
    assert [m["data"] for m in kinds(es, "message")] == ["[DONE]"]
    # EventSource's own `error` events are the connection's (the stream's end, the 204), none carries the failure
    assert [e["type"] for e in kinds(es, "event") if "data" in e] == ["chat.failed"]
    assert [status for _, status in connections(es)] == [200, 204] and result["readyState"] == CLOSED


def test_unnamed_events_reach_onmessage_with_a_stream_token(
    stack: Stack, c: httpx.Client, run_node: Callable[..., NodeScript]
) -> None:
    sid = create(c)
    url = f"{stack.url}/sessions/{sid}/events?unnamed=true&token={token(c, sid)}"
    es = run_node("eventsource.mjs", url=url, names=EVENT_NAMES, deadline_ms=30000)  # no key: the token alone
    es.expect("message")
    say(c, sid, "hello")
    es.expect(lambda r: r["kind"] == "message" and json.loads(r["data"])["type"] == "MessageAdded")
    assert c.delete(f"/sessions/{sid}", headers=ACME).status_code == 202
    result = es.result()
    assert [(json.loads(m["data"])["type"], m["id"]) for m in kinds(es, "message")] == [
        ("SessionCreated", "1"),
        ("MessageAdded", "2"),
        ("SessionDeleted", "3"),
    ]
    assert not kinds(es, "event")
    assert connections(es) == [(None, 200), ("3", 204)] and result["readyState"] == CLOSED
