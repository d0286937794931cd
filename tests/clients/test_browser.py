"""A real headless browser (Debian's Chromium, driven by playwright-core) runs a page served from another origin
than the API: CORS (PARLEY_CORS_ORIGINS is the page's origin), a stream token minted with `fetch` and the key, the
session's events live in an EventSource across a dropped connection, a fetch-based SSE client's preflighted resume,
and a streamed chat read to its end."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.chat.conftest import Stack
from tests.clients.api import ACME, EVENT_NAMES, KEY, create, say
from tests.clients.node import NodeScript
from tests.clients.proxy import CutProxy
from tests.model_server import ModelServer

pytestmark = pytest.mark.usefixtures("chromium")  # checked first: a skip (or failure) before any stack starts


def page_events(b: NodeScript) -> list[dict[str, Any]]:
    return [r for r in b.reports if r["kind"] == "page" and r["what"] == "event" and r["stream"] == "events"]


def page_added(text: str) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r["kind"] == "page" and r.get("type") == "MessageAdded" and r["data"]["data"]["content"] == text


def call(b: NodeScript, name: str, *args: Any) -> Any:
    b.send(call=name, args=list(args))
    return b.expect(lambda r: r["kind"] == "called" and r["name"] == name)["result"]


def test_a_page_of_another_origin_follows_a_session_and_a_streamed_chat(
    stack: Stack,
    c: httpx.Client,
    model: ModelServer,
    proxy: CutProxy,
    page_server: str,
    run_node: Callable[..., NodeScript],
) -> None:
    sid = create(c)
    b = run_node("browser.mjs", page=f"{page_server}/index.html?api={proxy.url}&key={KEY}", deadline_ms=50000)
    assert b.expect("ready")["origin"] == page_server != proxy.url
    minted = call(b, "mint", sid)
    assert minted["status"] == 201 and minted["body"]["session_id"] == sid, minted
    assert minted["etag"] == '"1"'  # readable by the page only because the API exposes it
    token = minted["body"]["token"]

    assert call(b, "follow", sid, token, EVENT_NAMES) is True
    b.expect(lambda r: r["kind"] == "page" and r.get("type") == "SessionCreated")
    say(c, sid, "one")
    b.expect(page_added("one"))
    assert proxy.cut() >= 1  # the page's live stream drops
    say(c, sid, "two")
    b.expect(page_added("two"))  # the browser reconnected by itself, with Last-Event-ID

    # a fetch-based SSE client sends Last-Event-ID itself: the browser preflights the URL with the token in it
    assert call(b, "resume", sid, token, "1") == {"status": 200, "id": "2", "type": "MessageAdded"}

    model.control(chunk_delay_s=0.05)
    chat = call(b, "chat", sid, "stream this to the page", token)
    assert chat["status"] == 200 and chat["contentType"].startswith("text/event-stream")
    assert chat["text"] == "echo: stream this to the page"
    assert set(chat["ids"]) == {chat["job"]}

    assert c.delete(f"/sessions/{sid}", headers=ACME).status_code == 202
    b.expect(lambda r: r["kind"] == "page" and r["stream"] == "events" and r.get("readyState") == 2)  # 204: CLOSED
    b.send(do="exit")
    b.result()

    got = page_events(b)
    versions = [e["data"]["version"] for e in got]
    assert (
        versions == list(range(1, len(versions) + 1)) and [int(e["id"]) for e in got] == versions
    )  # each once, in order
    assert got[-1]["type"] == "SessionDeleted"
    assert [e["data"]["data"]["content"] for e in got if e["type"] == "MessageAdded"][:2] == ["one", "two"]
    # what went over the wire: CORS preflights for the calls with a key, the event stream resumed after the cut
    seen = proxy.requests()
    # preflights: one per call that sends a key or Last-Event-ID itself; EventSource's own reconnects send none
    preflighted = Counter(r.path.split("?")[0] for r in seen if r.method == "OPTIONS")
    assert preflighted == Counter(f"/sessions/{sid}{p}" for p in ("", "/stream-tokens", "/chat", "/events")), (
        preflighted
    )
    streams = [
        r.headers.get("last-event-id")
        for r in seen
        if r.path.startswith(f"/sessions/{sid}/events") and r.method == "GET"
    ]
    # the EventSource: its first connection, its resume after the cut, its last try after the end (204); the fetch
    assert Counter(streams) == Counter([None, "2", str(versions[-1]), "1"]), streams
    assert not [r for r in b.reports if r["kind"] == "pageerror"]
