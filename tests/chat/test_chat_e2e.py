"""The chat contract, end to end: real `parley api` and `parley worker` processes on a redis-server of
this module's own, the worker talking through the official `openai` SDK to a real OpenAI-compatible
HTTP server (tests/model_server.py) whose requests the tests inspect, over real HTTP with httpx.

A second stack without PARLEY_MODEL_BASE_URL checks the built-in offline model. Every wait is a
bounded poll; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from shared.adapters.redis.keys import Keys, partition_of
from shared.adapters.redis.store import RedisStore
from shared.adapters.tokenizer import Tokenizer
from shared.domain.context import REPLY_PRIMING, SUMMARY_PREFIX, ContextMessage, message_tokens, prompt_tokens
from shared.domain.events import MessageAdded, SummaryAdded
from tests.chat.conftest import Stack, model_env
from tests.model_server import MODEL_NAME, SSE, ModelServer, iter_sse, parse_sse, text_of
from tests.support import auth

ACME = auth("acme")
GLOBEX = auth("globex")
ASYNC = {**ACME, "Prefer": "respond-async"}
TOK = Tokenizer.for_model(MODEL_NAME)
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
JOB_FIELDS = {
    "id",
    "session_id",
    "status",
    "model",
    "stream",
    "attempts",
    "created_at",
    "run_at",
    "started_at",
    "finished_at",
    "context",
    "response",
    "error",
}
CONTEXT_FIELDS = {"included", "dropped", "summarized", "prompt_tokens", "budget", "max_tokens"}
ENDED = ("succeeded", "failed", "cancelled")
WAIT_S = 20.0
"""Bound on every wait for a job to reach a state (the slowest path, retries with backoff, takes ~2 s)."""


# -- the processes -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(start_stack: Callable[..., Stack], model_server: ModelServer) -> Stack:
    return start_stack("chat-e2e", model_env(model_server))


@pytest.fixture(scope="module")
def c(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=40) as client:
        yield client


@pytest.fixture(scope="module")
def offline(start_stack: Callable[..., Stack]) -> Iterator[httpx.Client]:
    """A stack with no PARLEY_MODEL_BASE_URL: the built-in offline model answers."""
    s = start_stack("chat-offline", {"PARLEY_CHAT_WAIT_S": "30"})
    with httpx.Client(base_url=s.url, timeout=40) as client:
        yield client


# -- helpers ------------------------------------------------------------------------------------
def marker() -> str:
    """A word unique to a test, put in its prompts so the model server's requests can be told apart."""
    return f"m{uuid.uuid4().hex[:10]}"


def create(c: httpx.Client, headers: dict[str, str] = ACME, **body: Any) -> dict[str, Any]:
    r = c.post("/sessions", json=body, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def patch(c: httpx.Client, sid: str, **body: Any) -> dict[str, Any]:
    r = c.patch(f"/sessions/{sid}", json=body, headers=ACME)
    assert r.status_code == 200, r.text
    return r.json()


def add(c: httpx.Client, sid: str, role: str, content: str | None, **extra: Any) -> dict[str, Any]:
    r = c.post(f"/sessions/{sid}/messages", json={"role": role, "content": content, **extra}, headers=ACME)
    assert r.status_code == 201, r.text
    return r.json()


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def chat(
    c: httpx.Client, sid: str, *messages: dict[str, Any], headers: dict[str, str] = ACME, **body: Any
) -> httpx.Response:
    return c.post(f"/sessions/{sid}/chat", json={"messages": list(messages), **body}, headers=headers)


def chat_ok(c: httpx.Client, sid: str, *messages: dict[str, Any], **body: Any) -> dict[str, Any]:
    r = chat(c, sid, *messages, **body)
    assert r.status_code == 200, r.text
    return r.json()


def chat_async(c: httpx.Client, sid: str, *messages: dict[str, Any], **body: Any) -> dict[str, Any]:
    r = chat(c, sid, *messages, headers=ASYNC, **body)
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert r.headers["Location"] == f"/sessions/{sid}/chats/{accepted['id']}"
    return accepted


def job(c: httpx.Client, sid: str, job_id: str) -> dict[str, Any]:
    r = c.get(f"/sessions/{sid}/chats/{job_id}", headers=ACME)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(check: Callable[[], Any], what: str, timeout: float = WAIT_S, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def wait_job(
    c: httpx.Client, sid: str, job_id: str, statuses: tuple[str, ...] = ENDED, timeout: float = WAIT_S
) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        nonlocal last
        last = job(c, sid, job_id)
        return last if last["status"] in statuses else None

    deadline = time.monotonic() + timeout
    while (found := reached()) is None:
        if time.monotonic() >= deadline:
            pytest.fail(f"job {job_id} did not reach {statuses} within {timeout:.0f}s; last seen: {last}")
        time.sleep(0.05)
    return found


def messages(c: httpx.Client, sid: str, headers: dict[str, str] = ACME) -> list[dict[str, Any]]:
    r = c.get(f"/sessions/{sid}/messages", params={"limit": 1000}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def chats(c: httpx.Client, sid: str, **params: Any) -> list[dict[str, Any]]:
    r = c.get(f"/sessions/{sid}/chats", params=params, headers=ACME)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"items"}
    return r.json()["items"]


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, f"expected {status} {code}, got {r.status_code}: {r.text}"
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["status"] == status and body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


STREAM_READ = httpx.Timeout(30.0, read=12.0)
"""Stream reads: a stream that only sends keep-alives (every 15 s) times out instead of hanging the suite."""
STREAM_DEADLINE_S = 25.0


def sse(
    c: httpx.Client,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] = ACME,
    last_event_id: str | None = None,
    stop_after: int | None = None,
) -> list[SSE]:
    """Send a request answered by server-sent events and read them (bounded) to the stream's end, or until
    `stop_after` data events (then disconnect). Answers the data events; fails on a non-200 answer."""
    h = dict(headers)
    if last_event_id is not None:
        h["Last-Event-ID"] = last_event_id
    events: list[SSE] = []
    deadline = time.monotonic() + STREAM_DEADLINE_S
    with c.stream(method, path, json=body, headers=h, timeout=STREAM_READ) as r:
        assert r.status_code == 200, r.read().decode()
        assert r.headers["content-type"].startswith("text/event-stream"), r.headers
        for e in iter_sse(r.iter_lines()):
            if e.data is not None:
                events.append(e)
            if stop_after is not None and len(events) >= stop_after:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"{method} {path}: the stream did not end within {STREAM_DEADLINE_S:.0f}s; got {events}")
    return events


def stream_chat(
    c: httpx.Client, sid: str, *messages: dict[str, Any], stop_after: int | None = None, **body: Any
) -> list[SSE]:
    return sse(
        c, "POST", f"/sessions/{sid}/chat", {"messages": list(messages), "stream": True, **body}, stop_after=stop_after
    )


def stream_events(
    c: httpx.Client, sid: str, job_id: str, last_event_id: str | None = None, headers: dict[str, str] = ACME
) -> list[SSE]:
    """The job's whole event stream (from the start, or after `last_event_id`), read to its end."""
    return sse(c, "GET", f"/sessions/{sid}/chats/{job_id}/stream", headers=headers, last_event_id=last_event_id)


def deltas(events: list[SSE]) -> str:
    out = []
    for e in events:
        if e.data is None or e.data == "[DONE]" or e.event == "chat.failed":
            continue
        body = e.json()
        for choice in body["choices"]:
            out.append(choice["delta"].get("content") or "")
    return "".join(out)


def assert_complete_stream(events: list[SSE], job_id: str) -> tuple[str, dict[str, Any]]:
    """Delta chunks, a final chunk with the finish_reason, the usage event, then [DONE]; every event with an
    id, ids increasing. Answers (finish_reason, usage)."""
    assert len(events) >= 4, events
    ids = [e.id for e in events]
    assert all(ids), f"an event without an id: {events}"
    assert events[-1].data == "[DONE]", events[-1]
    usage_event = events[-2].json()
    assert usage_event["id"] == job_id and usage_event["choices"] == [], usage_event
    assert set(usage_event["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    finish = events[-3].json()
    assert finish["id"] == job_id and finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"], (
        finish
    )
    for e in events[:-3]:
        assert e.event is None, e
        body = e.json()
        assert body["id"] == job_id, body
        [choice] = body["choices"]
        assert (
            choice["index"] == 0
            and choice["finish_reason"] is None
            and set(choice["delta"]) <= {"content", "tool_calls"}
        ), body
    stream_ids = [_stream_id(i) for i in ids[:-1]]
    assert stream_ids == sorted(stream_ids) and len(set(stream_ids)) == len(stream_ids), ids
    return finish["choices"][0]["finish_reason"], usage_event["usage"]


def _stream_id(eid: str) -> tuple[int, int]:
    ms, seq = eid.split("-")
    return int(ms), int(seq)


def sent_prompt(request: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, text) of each message of a request the model server received."""
    return [(m["role"], text_of(m.get("content"))) for m in request["body"]["messages"]]


def cost(role: str, content: str | None, **kw: Any) -> int:
    return message_tokens(TOK, ContextMessage(id=None, role=role, content=content, **kw))  # type: ignore[arg-type]


def received_tokens(request: dict[str, Any]) -> int:
    """What Parley's counting says the prompt the model server received costs (no tools offered)."""
    msgs = [
        ContextMessage(
            id=None,
            role=m["role"],
            content=m.get("content"),
            name=m.get("name"),
            tool_call_id=m.get("tool_call_id"),
            tool_calls=m.get("tool_calls"),
        )
        for m in request["body"]["messages"]
    ]
    return prompt_tokens(TOK, msgs, None)


def log_events(stack: Stack, sid: str) -> list[Any]:
    """The session's event log, read straight from Redis."""

    async def read() -> list[Any]:
        r = Redis.from_url(stack.redis.url)
        try:
            keys = Keys(int(await r.hget(Keys.config, "partitions")))
            return await RedisStore(r, keys).read(sid, 0, 10_000)
        finally:
            await r.aclose()

    return asyncio.run(read())


def model_requests(model: ModelServer, mark: str, n: int | None = None) -> list[dict[str, Any]]:
    """The model server's requests containing `mark`; with `n`, wait (bounded) until there are n."""
    if n is None:
        return model.requests(mark)

    def enough() -> list[dict[str, Any]] | None:
        found = model.requests(mark)
        return found if len(found) >= n else None

    return wait_for(enough, f"{n} model requests with {mark}")


def wait_model_outcome(model: ModelServer, mark: str) -> list[dict[str, Any]]:
    """Wait until every model request with `mark` has ended (answered, failed, or the client left)."""

    def ended() -> list[dict[str, Any]] | None:
        found = model.requests(mark)
        return found if found and all(r["outcome"] for r in found) else None

    return wait_for(ended, f"the model requests of {mark} to end")


def wait_streaming(model: ModelServer, mark: str, chunks: int = 2) -> None:
    """Wait until the model has sent `chunks` chunks of an answer to a prompt with `mark`."""
    wait_for(lambda: any(r["chunks_sent"] >= chunks for r in model.requests(mark)), f"an answer to {mark} to stream")


SLOW_TEXT = " ".join(f"word{i}" for i in range(30))
"""A user text whose echo streams in 32 chunks: with a chunk delay, a chat that stays running a while."""


# -- sync chat ------------------------------------------------------------------------------------
def test_sync_chat_answers_the_completion_and_stores_both_messages(c, model):
    mark = marker()
    s = create(c, situation=f"You are terse. {mark}")
    model.control(report_usage=False)
    r = chat(c, s["id"], user(f"hello there {mark}"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"id", "session_id", "created_at", "model", "choices", "usage"}, body
    assert UUID_RE.match(body["id"]) and body["session_id"] == s["id"] and body["model"] == MODEL_NAME
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": f"echo: hello there {mark}", "tool_calls": None}

    # The request's message, then the answer, are the session's next messages.
    stored = messages(c, s["id"])
    assert [(m["role"], m["content"], m["seq"]) for m in stored] == [
        ("user", f"hello there {mark}", 1),
        ("assistant", f"echo: hello there {mark}", 2),
    ]
    assert stored[1]["tool_calls"] is None

    # The model got the situation as the system message, then the user message, with Parley's parameters.
    [req] = model_requests(model, mark)
    assert sent_prompt(req) == [("system", f"You are terse. {mark}"), ("user", f"hello there {mark}")]
    assert req["body"]["model"] == MODEL_NAME and req["body"]["max_tokens"] == 150
    assert req["headers"]["authorization"] == "Bearer model-secret"

    # The job: succeeded on the first attempt, its context and its response.
    j = job(c, s["id"], body["id"])
    assert set(j) == JOB_FIELDS, j
    assert j["status"] == "succeeded" and j["attempts"] == 1 and j["error"] is None and j["stream"] is False
    assert j["model"] == MODEL_NAME and j["started_at"] and j["finished_at"]
    assert j["response"] == body
    ctx = j["context"]
    assert set(ctx) == CONTEXT_FIELDS
    assert ctx["included"] == [stored[0]["id"]] and ctx["dropped"] == [] and ctx["summarized"] == []
    assert ctx["budget"] is None and ctx["max_tokens"] == 150

    # The provider reported no usage: Parley's own count, the prompt it planned and the answer's tokens.
    expected_prompt = REPLY_PRIMING + cost("system", f"You are terse. {mark}") + cost("user", f"hello there {mark}")
    assert ctx["prompt_tokens"] == expected_prompt == received_tokens(req)
    usage = body["usage"]
    assert usage["prompt_tokens"] == ctx["prompt_tokens"]
    assert usage["completion_tokens"] == TOK.count(f"echo: hello there {mark}")
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_sync_chat_reports_the_providers_usage_when_it_gives_one(c, model):
    mark = marker()
    s = create(c)
    body = chat_ok(c, s["id"], user(f"count me {mark}"))
    [req] = model_requests(model, mark)
    assert req["usage"] is not None, "the model server reported usage"
    assert body["usage"] == req["usage"]
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_chat_parameters_reach_the_model(c, model):
    mark = marker()
    s = create(c)
    body = chat_ok(
        c,
        s["id"],
        user(f"params {mark}"),
        model="other-model",
        max_tokens=77,
        temperature=0.5,
        top_p=0.9,
        stop=["\n\n"],
        seed=7,
        response_format={"type": "text"},
    )
    [req] = model_requests(model, mark)
    sent = req["body"]
    assert sent["model"] == "other-model" and sent["max_tokens"] == 77 and sent["temperature"] == 0.5
    assert (
        sent["top_p"] == 0.9
        and sent["stop"] == ["\n\n"]
        and sent["seed"] == 7
        and sent["response_format"] == {"type": "text"}
    )
    assert "tools" not in sent
    assert body["model"] == "other-model"
    j = job(c, s["id"], body["id"])
    assert j["model"] == "other-model" and j["context"]["max_tokens"] == 77


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [], "bogus": 1},
        {"messages": [{"role": "user", "content": "x", "extra": True}]},
        {"messages": [{"role": "user", "content": "x"}], "stream": "yes"},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        {"messages": [{"role": "user", "content": "x"}], "multitask": "sometimes"},
        {"messages": [{"role": "robot", "content": "x"}]},
    ],
    ids=["unknown-field", "unknown-message-field", "stream-not-bool", "max-tokens-0", "bad-multitask", "bad-role"],
)
def test_an_invalid_chat_body_answers_422_and_writes_nothing(c, model, body):
    s = create(c)
    r = c.post(f"/sessions/{s['id']}/chat", json=body, headers=ACME)
    assert_error(r, 422, "validation_failed")
    assert messages(c, s["id"]) == [] and chats(c, s["id"]) == []
    assert c.get(f"/sessions/{s['id']}", headers=ACME).json()["version"] == s["version"]


def test_a_chat_on_an_unknown_session_answers_404(c, model):
    r = chat(c, str(uuid.uuid4()), user("anyone?"))
    assert_error(r, 404, "not_found")


# -- async chat, the job resource, the list ----------------------------------------------------------
def test_async_chat_answers_202_with_location_and_the_job_can_be_polled(c, model):
    mark = marker()
    s = create(c)
    r = chat(c, s["id"], user(f"later please {mark}"), headers=ASYNC)
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert set(accepted) == {"id", "session_id", "status", "created_at", "run_at"} and accepted["run_at"] is None
    assert UUID_RE.match(accepted["id"]) and accepted["session_id"] == s["id"] and accepted["status"] == "queued"
    assert r.headers["Location"] == f"/sessions/{s['id']}/chats/{accepted['id']}"

    j = wait_job(c, s["id"], accepted["id"])
    assert j["status"] == "succeeded", j
    assert c.get(r.headers["Location"], headers=ACME).json() == j
    assert j["created_at"] == accepted["created_at"]
    assert j["response"]["choices"][0]["message"]["content"] == f"echo: later please {mark}"
    assert [m["content"] for m in messages(c, s["id"])] == [f"later please {mark}", f"echo: later please {mark}"]


def test_list_chats_is_newest_first_and_pages(c, model):
    s = create(c)
    ids = [chat_ok(c, s["id"], user(f"chat {i}"))["id"] for i in range(3)]
    listed = chats(c, s["id"])
    assert [j["id"] for j in listed] == ids[::-1]
    assert all(set(j) == JOB_FIELDS and j["status"] == "succeeded" for j in listed)
    assert listed[0] == job(c, s["id"], ids[2])
    assert [j["id"] for j in chats(c, s["id"], limit=1, offset=1)] == [ids[1]]
    assert [j["id"] for j in chats(c, s["id"], limit=2)] == [ids[2], ids[1]]
    assert chats(c, s["id"], offset=3) == []
    assert chats(c, create(c)["id"]) == []


def test_an_unknown_job_answers_404(c, model):
    s = create(c)
    for path in (f"/chats/{uuid.uuid4()}", "/chats/not-a-uuid", f"/chats/{uuid.uuid4()}/stream"):
        assert_error(c.get(f"/sessions/{s['id']}{path}", headers=ACME), 404, "not_found")
    assert_error(c.post(f"/sessions/{s['id']}/chats/{uuid.uuid4()}/cancel", headers=ACME), 404, "not_found")


# -- streaming ------------------------------------------------------------------------------------
def test_streamed_chat_relays_chunks_then_usage_then_done(c, model):
    mark = marker()
    s = create(c)
    text = f"stream these few words please {mark}"
    events = stream_chat(c, s["id"], user(text))
    job_id = events[0].json()["id"]
    finish, usage = assert_complete_stream(events, job_id)
    assert finish == "stop"
    assert len(events) - 3 >= 5, "one chunk per word"
    answer = f"echo: {text}"
    assert deltas(events) == answer

    j = wait_job(c, s["id"], job_id)
    assert j["status"] == "succeeded", j
    assert j["stream"] is True
    assert j["response"]["choices"][0]["message"]["content"] == answer and j["response"]["usage"] == usage
    assert messages(c, s["id"])[-1]["content"] == answer
    # The stream can be read again from the start, identically.
    again = stream_events(c, s["id"], job_id)
    assert [(e.id, e.data) for e in again] == [(e.id, e.data) for e in events]


def test_a_stream_resumed_with_last_event_id_misses_nothing_and_repeats_nothing(c, model):
    mark = marker()
    s = create(c)
    model.control(chunk_delay_s=0.05)
    text = f"{SLOW_TEXT} {mark}"
    first = stream_chat(c, s["id"], user(text), stop_after=5)  # the client goes away mid-answer
    job_id = first[0].json()["id"]
    assert job(c, s["id"], job_id)["status"] in ("queued", "running"), "the answer should still be streaming"

    rest = stream_events(c, s["id"], job_id, last_event_id=first[-1].id)
    union = first + rest
    assert_complete_stream(union, job_id)
    whole = stream_events(c, s["id"], job_id)
    assert [(e.id, e.data) for e in union] == [(e.id, e.data) for e in whole], "a gap or a duplicate"
    assert deltas(union) == f"echo: {text}" == messages(c, s["id"])[-1]["content"]

    # Resuming after the usage event gives [DONE] alone; after [DONE], nothing: 204, so an EventSource stops.
    tail = stream_events(c, s["id"], job_id, last_event_id=whole[-2].id)
    assert [e.data for e in tail] == ["[DONE]"]
    after_done = c.get(f"/sessions/{s['id']}/chats/{job_id}/stream", headers={**ACME, "Last-Event-ID": whole[-1].id})
    assert after_done.status_code == 204 and after_done.content == b""


@pytest.mark.slow
def test_a_quiet_stream_gets_keep_alive_comments(c, model):
    """A job queued behind a slow one streams nothing for a while: the client gets `: keep-alive` (every 15 s)."""
    mark = marker()
    s = create(c)
    model.control(chunk_delay_s=0.6)
    first = chat_async(c, s["id"], user(f"{SLOW_TEXT} {mark}"))
    second = chat_async(c, s["id"], user(f"after {mark}"))
    seen: list[SSE] = []
    deadline = time.monotonic() + 25
    try:
        with c.stream(
            "GET",
            f"/sessions/{s['id']}/chats/{second['id']}/stream",
            headers=ACME,
            timeout=httpx.Timeout(30.0, read=20.0),
        ) as r:
            assert r.status_code == 200
            for e in iter_sse(r.iter_lines()):
                seen.append(e)
                if e.comment is not None or time.monotonic() > deadline:
                    break
    finally:
        for jid in (second["id"], first["id"]):
            c.post(f"/sessions/{s['id']}/chats/{jid}/cancel", headers=ACME)
    assert seen and seen[0].comment == "keep-alive" and seen[0].data is None, seen


def test_a_streamed_tool_call_is_relayed_as_tool_call_deltas(c, model):
    mark = marker()
    s = create(c, tools=[{"type": "function", "function": {"name": "lookup_order"}}])
    events = stream_chat(c, s["id"], user(f"call lookup_order {mark}"))
    job_id = events[0].json()["id"]
    assert assert_complete_stream(events, job_id)[0] == "tool_calls"
    calls = [tc for e in events[:-3] for tc in e.json()["choices"][0]["delta"].get("tool_calls") or []]
    assert calls and calls[0]["function"]["name"] == "lookup_order" and calls[0]["id"].startswith("call_")
    args = "".join(tc.get("function", {}).get("arguments", "") for tc in calls)
    assert json.loads(args) == {"input": mark}
    j = wait_job(c, s["id"], job_id)
    assert j["status"] == "succeeded", j
    [stored_call] = j["response"]["choices"][0]["message"]["tool_calls"]
    assert stored_call["id"] == calls[0]["id"] and stored_call["function"]["arguments"] == args


# -- tool calls -----------------------------------------------------------------------------------
def test_tool_call_round_trip(c, model):
    mark = marker()
    lookup = {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "finds an order",
            "parameters": {"type": "object", "properties": {"input": {"type": "string"}}},
        },
    }
    s = create(c, situation=f"Support bot {mark}", tools=[lookup])
    body = chat_ok(c, s["id"], user("please call lookup_order 1234"))
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"] == {
        "name": "lookup_order",
        "arguments": json.dumps({"input": "1234"}),
    }
    [req] = model_requests(model, mark)
    assert req["body"]["tools"][0]["function"]["name"] == "lookup_order"
    assert req["body"]["tools"][0]["function"]["parameters"] == lookup["function"]["parameters"]

    # The assistant message with its calls is stored.
    stored = messages(c, s["id"])
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"] is None and stored[1]["tool_calls"] == [call]

    # A tool result answering no earlier call: 422, nothing written.
    before = c.get(f"/sessions/{s['id']}", headers=ACME).json()["version"]
    r = chat(c, s["id"], {"role": "tool", "tool_call_id": "call_nobody_made", "content": "shipped"})
    assert_error(r, 422, "validation_failed")
    assert len(messages(c, s["id"])) == 2 and len(chats(c, s["id"])) == 1
    assert c.get(f"/sessions/{s['id']}", headers=ACME).json()["version"] == before
    assert len(model_requests(model, mark)) == 1

    # The result of the real call: the model sees the call and its result, and answers.
    body2 = chat_ok(c, s["id"], {"role": "tool", "tool_call_id": call["id"], "content": "shipped on Monday"})
    assert body2["choices"][0]["finish_reason"] == "stop"
    assert body2["choices"][0]["message"]["content"] == "tool said: shipped on Monday"
    second = model_requests(model, mark)[1]["body"]["messages"]
    assert second[-2] == {"role": "assistant", "tool_calls": [call]} or (
        second[-2]["role"] == "assistant" and second[-2]["tool_calls"] == [call] and not second[-2].get("content")
    )
    assert second[-1] == {"role": "tool", "tool_call_id": call["id"], "content": "shipped on Monday"}
    stored = messages(c, s["id"])
    assert [(m["role"], m["tool_call_id"]) for m in stored] == [
        ("user", None),
        ("assistant", None),
        ("tool", call["id"]),
        ("assistant", None),
    ]


# -- cancel ---------------------------------------------------------------------------------------
def test_cancel_a_running_chat(c, model):
    mark = marker()
    s = create(c)
    model.control(chunk_delay_s=0.1)
    accepted = chat_async(c, s["id"], user(f"{SLOW_TEXT} {mark}"))
    jid = accepted["id"]
    wait_streaming(model, mark)
    assert job(c, s["id"], jid)["status"] == "running"

    r = c.post(f"/sessions/{s['id']}/chats/{jid}/cancel", headers=ACME)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled" and r.json()["error"]["code"] == "cancelled"

    # The answer as far as it had streamed joins the session, once; the job stays cancelled, whatever the worker
    # does next; the stream ends with a `chat.failed` event (not `error`, which is EventSource's own).
    wait_model_outcome(model, mark)
    j = job(c, s["id"], jid)
    assert j["status"] == "cancelled" and j["response"] is None and j["error"]["code"] == "cancelled"
    events = stream_events(c, s["id"], jid)
    assert events[-1].data == "[DONE]" and events[-2].event == "chat.failed"
    assert events[-2].json()["error"]["code"] == "cancelled"
    streamed = deltas(events[:-2])
    stored = messages(c, s["id"])
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"] and streamed.startswith(stored[1]["content"]), (stored[1]["content"], streamed)

    # Once ended it cannot be cancelled again.
    assert_error(c.post(f"/sessions/{s['id']}/chats/{jid}/cancel", headers=ACME), 409, "chat_not_active")


def test_cancelling_a_running_chat_stops_the_model_call(c, model):
    """A cancelled chat should not go on consuming (and paying for) the model's answer."""
    mark = marker()
    s = create(c)
    model.control(chunk_delay_s=0.1)
    jid = chat_async(c, s["id"], user(f"{SLOW_TEXT} {mark}"))["id"]
    wait_streaming(model, mark)
    assert c.post(f"/sessions/{s['id']}/chats/{jid}/cancel", headers=ACME).status_code == 200
    [req] = wait_model_outcome(model, mark)
    assert req["outcome"] == "disconnected", (
        f"the worker read the whole answer ({req['chunks_sent']} chunks) after the chat was cancelled"
    )


def test_cancel_a_queued_chat_and_an_ended_chat(c, model):
    mark = marker()
    s = create(c)
    model.control(chunk_delay_s=0.05)
    first = chat_async(c, s["id"], user(f"{SLOW_TEXT} {mark}"))
    second = chat_async(c, s["id"], user(f"queued {mark}"))
    assert job(c, s["id"], second["id"])["status"] == "queued"
    r = c.post(f"/sessions/{s['id']}/chats/{second['id']}/cancel", headers=ACME)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled"

    done = wait_job(c, s["id"], first["id"])
    assert done["status"] == "succeeded"
    assert job(c, s["id"], second["id"])["status"] == "cancelled"
    assert len(model_requests(model, mark)) == 1, "a cancelled queued chat never reaches the model"
    assert [m["content"] for m in messages(c, s["id"])] == [
        f"{SLOW_TEXT} {mark}",
        f"queued {mark}",
        f"echo: {SLOW_TEXT} {mark}",
    ]

    r = c.post(f"/sessions/{s['id']}/chats/{first['id']}/cancel", headers=ACME)
    assert_error(r, 409, "chat_not_active")
    assert job(c, s["id"], first["id"])["status"] == "succeeded"


# -- one chat at a time: multitask ------------------------------------------------------------------
def test_multitask_enqueue_runs_the_second_chat_after_the_first(c, model):
    mark = marker()
    s = create(c)
    model.control(chunk_delay_s=0.03)
    a = chat_async(c, s["id"], user(f"{SLOW_TEXT} first {mark}"))
    b = chat_async(c, s["id"], user(f"second {mark}"))
    ja = wait_job(c, s["id"], a["id"])
    jb = wait_job(c, s["id"], b["id"])
    assert ja["status"] == jb["status"] == "succeeded"

    reqs = model_requests(model, mark)
    assert len(reqs) == 2
    assert sent_prompt(reqs[0])[-1] == ("user", f"{SLOW_TEXT} first {mark}")
    assert sent_prompt(reqs[1])[-1] == ("user", f"second {mark}")
    assert reqs[0]["outcome"] == "completed" and reqs[1]["received_at"] >= reqs[0]["ended_at"], (
        "the second ran after the first"
    )
    assert ("assistant", f"echo: {SLOW_TEXT} first {mark}") in sent_prompt(reqs[1]), (
        "the second chat runs after the first: its prompt should hold the first answer"
    )


@pytest.mark.parametrize("where", ["create", "patch", "request"])
def test_multitask_reject_answers_409_while_a_chat_is_in_progress(c, model, where):
    mark = marker()
    s = create(c, **({"multitask": "reject"} if where == "create" else {}))
    if where == "patch":
        assert patch(c, s["id"], multitask="reject")["multitask"] == "reject"
    if where == "create":
        assert c.get(f"/sessions/{s['id']}", headers=ACME).json()["multitask"] == "reject", (
            "multitask given at create is kept"
        )
    per_request = {"multitask": "reject"} if where == "request" else {}
    model.control(chunk_delay_s=0.05)
    a = chat_async(c, s["id"], user(f"{SLOW_TEXT} {mark}"))

    r = chat(c, s["id"], user(f"me too {mark}"), headers=ASYNC, **per_request)
    err = assert_error(r, 409, "chat_in_progress")
    assert a["id"] in json.dumps(err)
    assert [m["content"] for m in messages(c, s["id"])][:1] == [f"{SLOW_TEXT} {mark}"]
    assert "me too" not in json.dumps(messages(c, s["id"])) and len(chats(c, s["id"])) == 1, (
        "a rejected chat writes nothing"
    )

    assert wait_job(c, s["id"], a["id"])["status"] == "succeeded"
    assert len(chats(c, s["id"])) == 1
    assert [m["role"] for m in messages(c, s["id"])] == ["user", "assistant"]
    # Once the first has ended, the next chat is accepted.
    assert (
        chat_ok(c, s["id"], user(f"now {mark}"), **per_request)["choices"][0]["message"]["content"]
        == f"echo: now {mark}"
    )


def test_multitask_interrupt_cancels_the_running_chat(c, model, stack):
    mark = marker()
    s = create(c)
    model.control(chunk_delay_s=0.1)
    with httpx.Client(base_url=stack.url, timeout=40) as other, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(chat, other, s["id"], user(f"{SLOW_TEXT} {mark}"))  # a synchronous chat, waiting
        wait_streaming(model, mark, 1)
        [a] = chats(c, s["id"])
        model.control(chunk_delay_s=0.0)
        b = chat_ok(c, s["id"], user(f"never mind {mark}"), multitask="interrupt")
        assert b["choices"][0]["message"]["content"] == f"echo: never mind {mark}"
        # The interrupted chat's caller learns it was cancelled.
        assert_error(waiting.result(timeout=30), 409, "cancelled")

    ja = job(c, s["id"], a["id"])
    assert ja["status"] == "cancelled" and ja["error"]["code"] == "cancelled" and ja["response"] is None
    wait_model_outcome(model, mark)
    assert [(m["role"], m["content"]) for m in messages(c, s["id"])] == [
        ("user", f"{SLOW_TEXT} {mark}"),
        ("user", f"never mind {mark}"),
        ("assistant", f"echo: never mind {mark}"),
    ]
    events = stream_events(c, s["id"], a["id"])
    assert (
        events[-1].data == "[DONE]"
        and events[-2].event == "chat.failed"
        and events[-2].json()["error"]["code"] == "cancelled"
    )


def test_deleting_the_session_ends_its_waiting_chat_with_409_session_deleted(c, model, stack):
    mark = marker()
    s = create(c)
    model.control(chunk_delay_s=0.1)
    with httpx.Client(base_url=stack.url, timeout=40) as other, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(chat, other, s["id"], user(f"{SLOW_TEXT} {mark}"))
        wait_streaming(model, mark, 1)
        assert c.delete(f"/sessions/{s['id']}", headers=ACME).status_code == 202
        assert_error(waiting.result(timeout=30), 409, "session_deleted")
    wait_model_outcome(model, mark)
    # No answer joins the deleted session's log, whatever the worker does after the deletion.
    log = log_events(stack, s["id"])
    assert type(log[-1]).__name__ == "SessionDeleted", log[-1]
    assert not [e for e in log if isinstance(e, MessageAdded) and e.data.role == "assistant"]
    # Its chat jobs leave the read models with it, like its messages and tools.
    [requested] = [e for e in log if type(e).__name__ == "ChatRequested"]
    assert_error(c.get(f"/sessions/{s['id']}/chats", headers=ACME), 404, "not_found")
    assert_error(c.get(f"/sessions/{s['id']}/chats/{requested.data.job_id}", headers=ACME), 404, "not_found")


# -- save: false ------------------------------------------------------------------------------------
def test_save_false_appends_nothing_and_still_answers(c, model):
    mark = marker()
    s = create(c)
    add(c, s["id"], "user", f"kept {mark}")
    body = chat_ok(c, s["id"], user(f"off the record {mark}"), save=False)
    assert body["choices"][0]["message"]["content"] == f"echo: off the record {mark}"
    assert [m["content"] for m in messages(c, s["id"])] == [f"kept {mark}"]
    j = job(c, s["id"], body["id"])
    assert j["status"] == "succeeded" and j["response"] == body
    assert j["context"]["included"] == [messages(c, s["id"])[0]["id"]], "the unsaved message has no id to list"
    [req] = model_requests(model, mark)
    assert sent_prompt(req) == [("user", f"kept {mark}"), ("user", f"off the record {mark}")]
    assert j["context"]["prompt_tokens"] == received_tokens(req)

    # A later chat does not see the unsaved exchange.
    chat_ok(c, s["id"], user(f"again {mark}"))
    later = model_requests(model, mark)[1]
    assert sent_prompt(later) == [("user", f"kept {mark}"), ("user", f"again {mark}")]


# -- token budgets --------------------------------------------------------------------------------
HISTORY = [
    ("user", "What colour are apples usually?"),
    ("assistant", "Apples are usually red, green or yellow."),
    ("user", "And pears, what colour are they?"),
    ("assistant", "Pears are mostly green or yellow, some are red."),
]


def _history_session(
    c: httpx.Client, situation: str, budget: int, policy: str | None
) -> tuple[str, list[dict[str, Any]]]:
    s = create(c, situation=situation, token_budget=budget, context_overflow=policy)
    return s["id"], [add(c, s["id"], role, text) for role, text in HISTORY]


@pytest.mark.parametrize("kept", [2, 1, 0])
def test_truncate_drops_the_oldest_messages_to_fit_exactly(c, model, kept):
    mark = marker()
    situation, question, max_tokens = f"Answer in one line. {mark}", "What about plums?", 40
    history_costs = [cost(role, text) for role, text in HISTORY]
    # Exactly the last `kept` history messages fit (prompt + max_tokens == budget).
    prompt = (
        REPLY_PRIMING + cost("system", situation) + sum(history_costs[len(HISTORY) - kept :]) + cost("user", question)
    )
    sid, stored = _history_session(c, situation, prompt + max_tokens, "truncate")

    body = chat_ok(c, sid, user(question), max_tokens=max_tokens)
    j = job(c, sid, body["id"])
    new_id = messages(c, sid)[len(HISTORY)]["id"]
    cut = len(HISTORY) - kept
    assert j["context"]["dropped"] == [m["id"] for m in stored[:cut]]
    assert j["context"]["included"] == [m["id"] for m in stored[cut:]] + [new_id]
    assert j["context"]["summarized"] == []
    assert j["context"]["prompt_tokens"] == prompt and j["context"]["budget"] == prompt + max_tokens
    [req] = model_requests(model, mark)
    assert sent_prompt(req) == [("system", situation), *HISTORY[cut:], ("user", question)]
    assert received_tokens(req) == prompt


def test_truncate_on_a_long_session_reads_only_what_the_budget_reaches_and_keeps_every_system_message(c, model):
    """A chat with a `truncate` budget reads the conversation from its newest message backwards, a page of 100
    (more than the budget holds) and one more of 100 here, never the rest: the report names the unread part as a seq range. The system message far back in
    the session is fetched alone and stays in the prompt, as when the whole conversation was read."""
    mark = marker()
    situation, question, max_tokens, kept, filler = f"Be brief. {mark}", "And now?", 20, 3, 2_300
    s = create(c, situation=situation)
    sid = s["id"]
    add(c, sid, "user", "the very first question")
    rule = add(c, sid, "system", f"Never mention the weather. {mark}")
    texts = [("user" if i % 2 == 0 else "assistant", f"filler message number {i}") for i in range(filler)]
    with httpx.Client(base_url=str(c.base_url), headers=ACME, timeout=30) as bulk:
        stored = [bulk.post(f"/sessions/{sid}/messages", json={"role": r, "content": t}).json() for r, t in texts]
    assert all("id" in m for m in stored)
    prompt = (
        REPLY_PRIMING
        + cost("system", situation)
        + cost("system", rule["content"])
        + sum(cost(r, t) for r, t in texts[-kept:])
        + cost("user", question)
    )
    patch(c, sid, token_budget=prompt + max_tokens, context_overflow="truncate")

    body = chat_ok(c, sid, user(question), max_tokens=max_tokens)
    ctx = job(c, sid, body["id"])["context"]
    new_id = c.get(f"/sessions/{sid}/messages", params={"offset": 2 + filler}, headers=ACME).json()["items"][0]["id"]
    total = 2 + filler + 1  # the question is stored too
    oldest_read = total - (100 + 100) + 1
    assert ctx["dropped_range"] == [1, oldest_read - 1]
    assert ctx["included"] == [rule["id"], *(m["id"] for m in stored[-kept:]), new_id]
    assert ctx["dropped"] == [m["id"] for m in stored if m["seq"] >= oldest_read][:-kept]
    assert ctx["prompt_tokens"] == prompt
    [req] = model_requests(model, mark)
    assert sent_prompt(req) == [("system", situation), ("system", rule["content"]), *texts[-kept:], ("user", question)]
    assert received_tokens(req) == prompt


def test_truncate_drops_a_tool_result_together_with_its_call(c, model):
    mark = marker()
    situation, question, max_tokens = f"Support. {mark}", "Thanks, anything else?", 30
    call = {"id": "call_abc", "type": "function", "function": {"name": "lookup_order", "arguments": '{"input": "7"}'}}
    s = create(c, situation=situation, token_budget=10_000, context_overflow="truncate")
    sid = s["id"]
    stored = [
        add(c, sid, "user", "Where is order 7?"),
        add(c, sid, "assistant", None, tool_calls=[call]),
        add(c, sid, "tool", "order 7 shipped", tool_call_id="call_abc"),
        add(c, sid, "user", "Great."),
    ]
    c_tool = cost("tool", "order 7 shipped", tool_call_id="call_abc")
    kept_cost = cost("user", "Great.") + cost("user", question)
    # Room for the tool result too, were it allowed without its call: it must go with the call.
    budget = REPLY_PRIMING + cost("system", situation) + c_tool + kept_cost + max_tokens
    patch(c, sid, token_budget=budget)

    body = chat_ok(c, sid, user(question), max_tokens=max_tokens)
    ctx = job(c, sid, body["id"])["context"]
    assert ctx["dropped"] == [m["id"] for m in stored[:3]]
    assert ctx["included"] == [stored[3]["id"], messages(c, sid)[4]["id"]]
    assert ctx["prompt_tokens"] == REPLY_PRIMING + cost("system", situation) + kept_cost
    [req] = model_requests(model, mark)
    assert sent_prompt(req) == [("system", situation), ("user", "Great."), ("user", question)]


def test_a_budget_the_newest_message_alone_overflows_fails_under_every_policy(c, model):
    mark = marker()
    for policy in ("truncate", "adaptive", None):
        s = create(
            c,
            situation=f"Hi {mark}",
            token_budget=REPLY_PRIMING + cost("system", f"Hi {mark}") + 5,
            context_overflow=policy,
        )
        r = chat(c, s["id"], user("a question that needs more than five tokens, surely"), max_tokens=1)
        assert_error(r, 422, "token_budget_exceeded")
        [j] = chats(c, s["id"])
        assert j["status"] == "failed" and j["error"]["code"] == "token_budget_exceeded"
    assert model_requests(model, mark) == []


def test_no_overflow_policy_fits_exactly_or_fails_without_calling_the_model(c, model):
    mark = marker()
    situation, question, max_tokens = f"Be kind. {mark}", "Which fruit is sweetest?", 25
    prompt = REPLY_PRIMING + cost("system", situation) + sum(cost(r, t) for r, t in HISTORY) + cost("user", question)

    # Exactly at the budget: everything goes in.
    sid, stored = _history_session(c, situation, prompt + max_tokens, None)
    body = chat_ok(c, sid, user(question), max_tokens=max_tokens)
    ctx = job(c, sid, body["id"])["context"]
    assert ctx["dropped"] == [] and ctx["prompt_tokens"] == prompt
    assert ctx["included"] == [m["id"] for m in stored] + [messages(c, sid)[4]["id"]]
    [req] = model_requests(model, mark)
    assert received_tokens(req) == prompt

    # One token over: the job fails with token_budget_exceeded and the model is not called.
    model.reset()
    sid, stored = _history_session(c, situation, prompt + max_tokens - 1, None)
    r = chat(c, sid, user(question), max_tokens=max_tokens)
    err = assert_error(r, 422, "token_budget_exceeded")
    assert model_requests(model, mark) == []
    [j] = chats(c, sid)
    assert j["status"] == "failed" and j["error"]["code"] == "token_budget_exceeded" and j["response"] is None
    # The request's message was stored before the model would have been called; no answer follows it.
    assert [m["role"] for m in messages(c, sid)] == ["user", "assistant", "user", "assistant", "user"]
    assert err["message"]

    # The same, queued: the job fails, nothing reaches the model.
    a = chat_async(c, sid, user(question), max_tokens=max_tokens)
    assert wait_job(c, sid, a["id"])["error"]["code"] == "token_budget_exceeded"
    assert model_requests(model, mark) == []


def test_adaptive_summarises_the_oldest_messages_and_later_chats_reuse_the_summary(c, model, stack):
    mark = marker()
    situation, question, max_tokens = f"You keep notes. {mark}", "Summarise what we know about plums.", 30
    long1 = "Facts about apples: " + " ".join(f"apple{i} is crisp" for i in range(60))
    long2 = "Noted about apples: " + " ".join(f"apple{i} noted" for i in range(60))
    short = [("user", "And plums are purple."), ("assistant", "Yes, plums are purple.")]
    history = [("user", long1), ("assistant", long2), *short]
    costs = [cost(r, t) for r, t in history]
    head = cost("system", situation)
    reserve = 256  # the worker's summary_reserve
    assert costs[0] + costs[1] > reserve, "the two long messages must not fit in the summary's room"
    # With h1 and h2 summarised, the rest fits exactly in the room the summary leaves.
    budget = REPLY_PRIMING + head + costs[2] + costs[3] + cost("user", question) + max_tokens + reserve

    s = create(c, situation=situation, token_budget=budget, context_overflow="adaptive")
    sid = s["id"]
    stored = [add(c, sid, r, t) for r, t in history]
    body = chat_ok(c, sid, user(question), max_tokens=max_tokens)
    new_id = messages(c, sid)[4]["id"]

    reqs = model_requests(model, mark)
    [summary_req] = [r for r in model.requests() if long1 in json.dumps(r["body"]["messages"])]
    assert summary_req["body"]["messages"][0]["role"] == "system" and summary_req["body"]["messages"][0][
        "content"
    ].startswith("Summarize")
    summary_input = summary_req["body"]["messages"][-1]["content"]
    assert long1 in summary_input and long2 in summary_input and "plums are purple" not in summary_input
    summary_text = summary_req["answer"]["content"]

    [answer_req] = reqs
    summary_msg = SUMMARY_PREFIX + summary_text
    assert sent_prompt(answer_req) == [("system", situation), ("system", summary_msg), *short, ("user", question)]
    j = job(c, sid, body["id"])
    expected_prompt = REPLY_PRIMING + head + cost("system", summary_msg) + costs[2] + costs[3] + cost("user", question)
    assert j["context"]["summarized"] == [stored[0]["id"], stored[1]["id"]]
    assert j["context"]["included"] == [stored[2]["id"], stored[3]["id"], new_id]
    assert j["context"]["dropped"] == []
    assert j["context"]["prompt_tokens"] == expected_prompt == received_tokens(answer_req)

    [added] = [e for e in log_events(stack, sid) if isinstance(e, SummaryAdded)]
    assert added.data.job_id == body["id"] and added.data.content == summary_text
    assert added.data.summarized == [stored[0]["id"], stored[1]["id"]] and added.data.up_to_seq == 2

    # A later chat reuses the summary: no new summarising call, the summarised messages stay out.
    answer = body["choices"][0]["message"]["content"]
    follow_up = "Anything else?"
    prompt2 = expected_prompt + cost("assistant", answer) + cost("user", follow_up)
    max2 = budget - prompt2
    assert max2 >= 1, "the follow-up must fit with the summary"
    body2 = chat_ok(c, sid, user(follow_up), max_tokens=max2)
    all_reqs = [
        r
        for r in model.requests()
        if mark in json.dumps(r["body"]["messages"]) or long1 in json.dumps(r["body"]["messages"])
    ]
    assert len(all_reqs) == 3, "one summary, two answers"
    later = all_reqs[-1]
    assert sent_prompt(later) == [
        ("system", situation),
        ("system", summary_msg),
        *short,
        ("user", question),
        ("assistant", answer),
        ("user", follow_up),
    ]
    assert all(text not in (long1, long2) for _, text in sent_prompt(later))
    j2 = job(c, sid, body2["id"])
    assert j2["context"]["summarized"] == [] and j2["context"]["dropped"] == []
    assert j2["context"]["prompt_tokens"] == prompt2 == received_tokens(later)
    assert len([e for e in log_events(stack, sid) if isinstance(e, SummaryAdded)]) == 1


# -- provider failures ------------------------------------------------------------------------------
def test_provider_500s_are_retried_then_the_chat_succeeds(c, model):
    mark = marker()
    s = create(c)
    model.control(fail_next=[500, 500])
    body = chat_ok(c, s["id"], user(f"eventually {mark}"))
    assert body["choices"][0]["message"]["content"] == f"echo: eventually {mark}"
    reqs = model_requests(model, mark)
    assert [r["status"] for r in reqs] == [500, 500, 200]
    j = job(c, s["id"], body["id"])
    assert j["status"] == "succeeded" and j["attempts"] == 1
    assert [m["role"] for m in messages(c, s["id"])] == ["user", "assistant"]


@pytest.mark.parametrize(
    ("status", "code"), [(500, "model_unavailable"), (503, "model_unavailable"), (429, "model_rate_limited")]
)
def test_a_provider_that_keeps_failing_fails_the_job(c, model, status, code):
    mark = marker()
    s = create(c)
    model.control(fail_always=status)
    a = chat_async(c, s["id"], user(f"queued {mark}"))
    j = wait_job(c, s["id"], a["id"])
    assert j["status"] == "failed" and j["error"]["code"] == code and j["error"]["message"]
    assert j["response"] is None
    assert len(model_requests(model, f"queued {mark}")) == 3, "one try and PARLEY_MODEL_MAX_RETRIES=2 retries"
    events = stream_events(c, s["id"], a["id"])
    assert (
        events[-1].data == "[DONE]" and events[-2].event == "chat.failed" and events[-2].json()["error"]["code"] == code
    )

    # A synchronous chat answers 502 with the code.
    r = chat(c, s["id"], user(f"waiting {mark}"))
    assert_error(r, 502, code)
    assert len(model_requests(model, f"waiting {mark}")) == 3
    assert [m["role"] for m in messages(c, s["id"])] == ["user", "user"], "no answer stored"


def test_a_streamed_chat_that_fails_ends_with_an_error_event(c, model):
    mark = marker()
    s = create(c)
    model.control(fail_always=500)
    events = stream_chat(c, s["id"], user(f"x {mark}"))
    assert events[-1].data == "[DONE]" and events[-2].event == "chat.failed"
    assert events[-2].json()["error"]["code"] == "model_unavailable"
    assert all(e.id for e in events)


@pytest.fixture(scope="module")
def impatient(start_stack: Callable[..., Stack], model_server: ModelServer) -> Iterator[httpx.Client]:
    """A stack with a short model timeout (1.5 s, one retry) and a short synchronous wait (1 s)."""
    env = model_env(model_server, PARLEY_MODEL_TIMEOUT_S="1.5", PARLEY_MODEL_MAX_RETRIES="1", PARLEY_CHAT_WAIT_S="1")
    s = start_stack("chat-impatient", env)
    with httpx.Client(base_url=s.url, timeout=40) as client:
        yield client


def test_a_model_that_does_not_answer_in_time_fails_the_job_with_model_timeout(impatient, model):
    mark = marker()
    s = create(impatient)
    model.control(delay_s=3.0)
    a = chat_async(impatient, s["id"], user(f"slow {mark}"))
    j = wait_job(impatient, s["id"], a["id"])
    assert j["status"] == "failed" and j["error"]["code"] == "model_timeout", j
    assert len(model_requests(model, mark)) == 2, "one try and PARLEY_MODEL_MAX_RETRIES=1 retry"
    assert [m["role"] for m in messages(impatient, s["id"])] == ["user"]


def test_a_sync_chat_that_outlasts_the_wait_answers_504_and_the_job_goes_on(impatient, model):
    mark = marker()
    s = create(impatient)
    model.control(chunk_delay_s=0.1)
    r = chat(impatient, s["id"], user(f"{SLOW_TEXT} {mark}"))
    err = assert_error(r, 504, "chat_timeout")
    [j] = chats(impatient, s["id"])
    assert j["id"] in err["message"]
    done = wait_job(impatient, s["id"], j["id"])
    assert done["status"] == "succeeded"
    assert messages(impatient, s["id"])[-1]["content"] == f"echo: {SLOW_TEXT} {mark}"


# -- tenancy --------------------------------------------------------------------------------------
def test_another_tenants_session_and_jobs_answer_404_everywhere(c, model):
    mark = marker()
    s = create(c)
    done = chat_ok(c, s["id"], user(f"mine {mark}"))
    sid, jid = s["id"], done["id"]
    theirs = create(c, headers=GLOBEX)["id"]
    while partition_of(theirs, 16) != partition_of(sid, 16):  # same partition: acme's job keys share its slot
        theirs = create(c, headers=GLOBEX)["id"]
    model.control(chunk_delay_s=0.05)
    running = chat_async(c, sid, user(f"{SLOW_TEXT} {mark}"))

    wrong: list[str] = []
    for session, job_id in ((sid, jid), (sid, running["id"]), (theirs, jid), (theirs, running["id"])):
        calls = [
            ("GET", f"/sessions/{session}/chats/{job_id}", None),
            ("GET", f"/sessions/{session}/chats/{job_id}/stream", None),
            ("POST", f"/sessions/{session}/chats/{job_id}/cancel", None),
        ]
        if session == sid:
            calls += [
                ("GET", f"/sessions/{session}/chats", None),
                ("POST", f"/sessions/{session}/chat", {"messages": [user(f"intruder {mark}")]}),
            ]
        for method, path, body in calls:
            r = c.request(method, path, json=body, headers=GLOBEX)
            if r.status_code != 404 or r.json()["error"]["code"] != "not_found":
                where = "acme's session" if session == sid else "globex's own session"
                wrong.append(
                    f"{method} {path} ({where}, {'ended' if job_id == jid else 'running'} job) -> {r.status_code} {r.text}"
                )
    assert c.get(f"/sessions/{theirs}/chats", headers=GLOBEX).json() == {"items": []}
    assert wait_job(c, sid, running["id"])["status"] == "succeeded", "globex's cancel must not touch acme's chat"
    assert "intruder" not in json.dumps(messages(c, sid))
    assert all("intruder" not in json.dumps(r["body"]) for r in model.requests(mark))
    assert not wrong, "another tenant's chat endpoints must answer 404:\n" + "\n".join(wrong)


# -- idempotency ----------------------------------------------------------------------------------
def test_a_retried_chat_with_an_idempotency_key_answers_the_first_answer_once(c, model):
    mark = marker()
    s = create(c)
    key = {"Idempotency-Key": f"k-{mark}"}
    first = c.post(f"/sessions/{s['id']}/chat", json={"messages": [user(f"once {mark}")]}, headers={**ACME, **key})
    assert first.status_code == 200, first.text
    again = c.post(f"/sessions/{s['id']}/chat", json={"messages": [user(f"once {mark}")]}, headers={**ACME, **key})
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    assert len(messages(c, s["id"])) == 2 and len(chats(c, s["id"])) == 1
    assert len(model_requests(model, mark)) == 1


# -- the offline model ----------------------------------------------------------------------------
def test_the_offline_model_answers_a_sync_chat(offline):
    s = create(offline, situation="Offline.")
    body = chat_ok(offline, s["id"], user("hello offline world"))
    assert body["model"] == "parley-offline"
    assert body["choices"][0]["message"]["content"] == "You said: hello offline world"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    j = job(offline, s["id"], body["id"])
    assert j["status"] == "succeeded" and body["usage"]["prompt_tokens"] == j["context"]["prompt_tokens"]
    assert [m["role"] for m in messages(offline, s["id"])] == ["user", "assistant"]


def test_the_offline_model_streams_several_chunks(offline):
    s = create(offline)
    text = "one two three four five six seven eight nine ten"
    events = stream_chat(offline, s["id"], user(text))
    job_id = events[0].json()["id"]
    assert_complete_stream(events, job_id)
    assert len(events) - 3 >= 3
    assert deltas(events) == f"You said: {text}" == messages(offline, s["id"])[-1]["content"]


def test_the_sse_parser_reads_keep_alive_comments():
    """The helper the stream tests rely on: comments are kept apart from data events."""
    events = parse_sse(': keep-alive\n\nid: 1-0\ndata: {"a": 1}\n\nid: 1-0.1\ndata: [DONE]\n\n')
    assert [e.comment for e in events] == ["keep-alive", None, None]
    assert events[1].json() == {"a": 1} and events[2].id == "1-0.1" and events[2].data == "[DONE]"


def test_a_malformed_or_out_of_range_last_event_id_is_a_422(c, model):
    s = create(c)
    done = chat_ok(c, s["id"], user(f"hello {marker()}"))
    for bad in ("nope", "99999999999999999999-0", "1-99999999999999999999"):
        r = c.get(f"/sessions/{s['id']}/chats/{done['id']}/stream", headers={**ACME, "Last-Event-ID": bad})
        assert_error(r, 422, "validation_failed")


def test_an_idempotent_replay_of_an_interrupting_chat_interrupts_nothing_new(c, model):
    """The replay answers the first request's job; it must not cancel the chats that came after it."""
    mark = marker()
    s = create(c, multitask="interrupt")
    key = {**ACME, "Idempotency-Key": f"first-{mark}"}
    first = chat(c, s["id"], user(f"first {mark}"), headers=key)
    assert first.status_code == 200, first.text
    model.control(chunk_delay_s=0.05)
    later = chat_async(c, s["id"], user(f"{SLOW_TEXT} {mark}"))
    replay = chat(c, s["id"], user(f"first {mark}"), headers=key)
    assert replay.status_code == 200 and replay.json() == first.json()
    assert wait_job(c, s["id"], later["id"])["status"] == "succeeded"
    events = stream_events(c, s["id"], later["id"])
    assert not [e for e in events if e.event == "chat.failed"], (
        "the replay wrote a cancellation into another chat's stream"
    )
    assert_complete_stream(events, later["id"])
