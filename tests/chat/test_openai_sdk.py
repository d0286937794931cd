"""A session as an OpenAI Chat Completions endpoint, driven by the official `openai` SDK (and LangChain's ChatOpenAI
when installed) over real HTTP: real `parley api` and `parley worker` processes on a redis-server of this module's
own, the worker answering through the test model server (tests/model_server.py).

The SDK is the client no one here wrote: if it parses our answers, raises the right exceptions and accumulates our
streams, other OpenAI clients will too.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.chat.conftest import Stack, model_env
from tests.model_server import MODEL_NAME, ModelServer, parse_sse
from tests.support import TENANTS, auth

ACME = auth("acme")
TOOL = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Find an order",
        "parameters": {"type": "object", "properties": {"input": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def stack(start_stack: Callable[..., Stack], model_server: ModelServer) -> Stack:
    return start_stack("openai-sdk", model_env(model_server))


@pytest.fixture(scope="module")
def c(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=40) as client:
        yield client


def marker() -> str:
    return f"m{uuid.uuid4().hex[:10]}"


def create(c: httpx.Client, tenant: str = "acme", **body: Any) -> str:
    r = c.post("/sessions", json=body, headers=auth(tenant))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def sdk(stack: Stack, sid: str, tenant: str = "acme", **kw: Any) -> openai.OpenAI:
    """The SDK pointed at a session, exactly as the README says. No retries: each test sees each answer."""
    return openai.OpenAI(
        base_url=f"{stack.url}/sessions/{sid}", api_key=TENANTS[tenant], max_retries=0, timeout=40, **kw
    )


def stored(c: httpx.Client, sid: str) -> list[dict[str, Any]]:
    r = c.get(f"/sessions/{sid}/messages", params={"limit": 1000}, headers=ACME)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def turns(c: httpx.Client, sid: str) -> list[tuple[str, Any]]:
    return [(m["role"], m["content"]) for m in stored(c, sid)]


def jobs(c: httpx.Client, sid: str) -> list[dict[str, Any]]:
    r = c.get(f"/sessions/{sid}/chats", headers=ACME)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


# -- completions ------------------------------------------------------------------------------------------------------
def test_sync_completion_is_a_chat_completion_whose_id_is_the_chat_job(
    stack: Stack, c: httpx.Client, model: ModelServer
) -> None:
    sid = create(c, situation="You are terse.")
    m = marker()
    r = sdk(stack, sid).chat.completions.create(
        model="gpt-4o-mini",
        messages=[user(f"hello {m}")],
        temperature=0.2,
        seed=7,
        user="u-1",
        metadata={"k": "v"},
        max_completion_tokens=64,
    )
    assert r.object == "chat.completion"
    assert isinstance(r.created, int) and r.created > 1_600_000_000
    assert r.model == "gpt-4o-mini"  # any name goes to the provider, which answers with it
    [choice] = r.choices
    assert choice.index == 0 and choice.finish_reason == "stop" and choice.logprobs is None
    assert choice.message.role == "assistant" and choice.message.content == f"echo: hello {m}"
    assert choice.message.tool_calls is None and choice.message.refusal is None
    assert r.usage is not None and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0
    # the same chat job machinery as /chat: the job is listed, with its context report
    [job] = jobs(c, sid)
    assert job["id"] == r.id and job["status"] == "succeeded" and job["model"] == "gpt-4o-mini"
    assert job["response"]["choices"][0]["message"]["content"] == f"echo: hello {m}"
    assert len(job["context"]["included"]) == 1 and job["context"]["max_tokens"] == 64
    [sent] = model.requests(containing=m)
    body = sent["body"]
    assert (
        body["model"] == "gpt-4o-mini" and body["temperature"] == 0.2 and body["seed"] == 7 and body["max_tokens"] == 64
    )
    assert body["messages"] == [{"role": "system", "content": "You are terse."}, user(f"hello {m}")]
    assert turns(c, sid) == [("user", f"hello {m}"), ("assistant", f"echo: hello {m}")]


def test_streamed_completion_without_usage(stack: Stack, c: httpx.Client, model: ModelServer) -> None:
    sid = create(c)
    m = marker()
    chunks = list(
        sdk(stack, sid).chat.completions.create(model="any-model", messages=[user(f"stream this {m}")], stream=True)
    )
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    assert all(ch.usage is None for ch in chunks)
    assert all(ch.choices for ch in chunks)  # no usage chunk without include_usage
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == f"echo: stream this {m}"
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == "stop"
    assert [j["id"] for j in jobs(c, sid)] == [chunks[0].id]
    assert turns(c, sid)[-1] == ("assistant", f"echo: stream this {m}")


def test_streamed_completion_with_usage_ends_with_a_usage_chunk(
    stack: Stack, c: httpx.Client, model: ModelServer
) -> None:
    sid = create(c)
    m = marker()
    chunks = list(
        sdk(stack, sid).chat.completions.create(
            model=MODEL_NAME, messages=[user(f"count {m}")], stream=True, stream_options={"include_usage": True}
        )
    )
    *body, last = chunks
    assert last.choices == [] and last.usage is not None and last.usage.total_tokens > 0
    assert all(ch.usage is None and ch.choices for ch in body)
    assert "".join(ch.choices[0].delta.content or "" for ch in body) == f"echo: count {m}"


def test_stream_framing_is_openai_s_data_lines_only(stack: Stack, c: httpx.Client) -> None:
    """No `id:` lines and no comments between chunks (the SDK turns those into empty events and fails)."""
    sid = create(c)
    body = {"model": "x", "messages": [user("frame me")], "stream": True, "stream_options": {"include_usage": True}}
    with c.stream("POST", f"/sessions/{sid}/chat/completions", json=body, headers=ACME) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    lines = [line for line in raw.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    events = parse_sse(raw)
    assert events[-1].data == "[DONE]" and all(e.id is None and e.event is None and e.comment is None for e in events)
    usage = events[-2].json()
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] > 0 and usage["object"] == "chat.completion.chunk"


# -- tools, the way the SDK's docs drive them ------------------------------------------------------------------------------
def test_tool_call_round_trip(stack: Stack, c: httpx.Client, model: ModelServer) -> None:
    sid = create(c, situation="You look up orders.")
    client = sdk(stack, sid)
    messages: list[Any] = [{"role": "system", "content": "You look up orders."}, user("call lookup_order 1234")]
    first = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=[TOOL])
    assert first.choices[0].finish_reason == "tool_calls"
    [call] = first.choices[0].message.tool_calls or []
    assert call.function.name == "lookup_order" and json.loads(call.function.arguments) == {"input": "1234"}
    messages.append(first.choices[0].message)  # the SDK's own pydantic message, as its docs do
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "Order 1234 ships tomorrow."})
    second = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=[TOOL])
    assert second.choices[0].message.content == "tool said: Order 1234 ships tomorrow."
    assert second.id != first.id
    history = stored(c, sid)
    assert [(m["role"], m["content"]) for m in history] == [
        ("user", "call lookup_order 1234"),
        ("assistant", None),
        ("tool", "Order 1234 ships tomorrow."),
        ("assistant", "tool said: Order 1234 ships tomorrow."),
    ]
    assert history[1]["tool_calls"][0]["id"] == call.id and history[2]["tool_call_id"] == call.id
    # the model saw the call once and its result once
    last = model.requests(containing="Order 1234 ships tomorrow.")[-1]["body"]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "tool"]


def test_streamed_tool_call_accumulates_in_the_sdk(stack: Stack, c: httpx.Client) -> None:
    sid = create(c, tools=[TOOL])
    with sdk(stack, sid).chat.completions.stream(model="gpt-4o-mini", messages=[user("call lookup_order 77")]) as s:
        final = s.get_final_completion()
    [call] = final.choices[0].message.tool_calls or []
    assert final.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "lookup_order" and json.loads(call.function.arguments) == {"input": "77"}
    assert stored(c, sid)[-1]["tool_calls"][0]["id"] == call.id


# -- the conversation rule ---------------------------------------------------------------------------------------------------
def test_resending_the_whole_conversation_stores_each_message_once(
    stack: Stack, c: httpx.Client, model: ModelServer
) -> None:
    situation = "You are a support agent."
    sid = create(c, situation=situation)
    client = sdk(stack, sid)
    m = marker()
    messages: list[Any] = [{"role": "system", "content": situation}]
    for i in range(3):
        messages.append(user(f"turn {i} {m}"))
        r = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        messages.append(r.choices[0].message)
    assert turns(c, sid) == [
        x for i in range(3) for x in (("user", f"turn {i} {m}"), ("assistant", f"echo: turn {i} {m}"))
    ]
    assert len(jobs(c, sid)) == 3
    # the situation went to the model once, as the first system message; every turn once
    last = model.requests(containing=f"turn 2 {m}")[-1]["body"]["messages"]
    assert [x["role"] for x in last] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert last[0]["content"] == situation


def test_a_client_that_sends_only_new_turns(stack: Stack, c: httpx.Client, model: ModelServer) -> None:
    sid = create(c)
    client = sdk(stack, sid)
    m = marker()
    for i in range(3):
        r = client.chat.completions.create(model="gpt-4o-mini", messages=[user(f"only new {i} {m}")])
        assert r.choices[0].message.content == f"echo: only new {i} {m}"
    assert turns(c, sid) == [
        x for i in range(3) for x in (("user", f"only new {i} {m}"), ("assistant", f"echo: only new {i} {m}"))
    ]
    # the model got the stored history each time
    last = model.requests(containing=f"only new 2 {m}")[-1]["body"]["messages"]
    assert len(last) == 5


def test_retrying_an_identical_request_stores_nothing_twice(stack: Stack, c: httpx.Client, model: ModelServer) -> None:
    sid = create(c)
    client = sdk(stack, sid)
    m = marker()
    first = client.chat.completions.create(model="gpt-4o-mini", messages=[user(f"once {m}")])
    again = client.chat.completions.create(model="gpt-4o-mini", messages=[user(f"once {m}")])  # the answer was "lost"
    assert again.id == first.id and again.choices[0].message.content == first.choices[0].message.content
    assert again.usage == first.usage
    assert turns(c, sid) == [("user", f"once {m}"), ("assistant", f"echo: once {m}")]
    assert len(jobs(c, sid)) == 1 and len(model.requests(containing=f"once {m}")) == 1
    # a later turn retried, streamed this time: the stored answer again, as a stream
    convo = [user(f"once {m}"), first.choices[0].message, user(f"twice {m}")]
    second = client.chat.completions.create(model="gpt-4o-mini", messages=convo)
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini", messages=convo, stream=True, stream_options={"include_usage": True}
        )
    )
    assert {ch.id for ch in chunks} == {second.id}
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == f"echo: twice {m}"
    assert chunks[-1].usage == second.usage
    assert len(stored(c, sid)) == 4 and len(jobs(c, sid)) == 2


def test_identical_requests_at_once_store_once_and_share_one_answer(
    stack: Stack, c: httpx.Client, model: ModelServer
) -> None:
    """Two copies of one request race (a client retrying while the first is still running): the second finds its
    messages stored and the chat running, and answers that chat's answer."""
    sid = create(c)
    m = marker()
    model.control(delay_s=0.5)
    with ThreadPoolExecutor(2) as pool:
        answers = list(
            pool.map(
                lambda _: sdk(stack, sid).chat.completions.create(model="x", messages=[user(f"race {m}")]), range(2)
            )
        )
    assert answers[0].id == answers[1].id
    assert turns(c, sid) == [("user", f"race {m}"), ("assistant", f"echo: race {m}")]
    assert len(jobs(c, sid)) == 1 and len(model.requests(containing=f"race {m}")) == 1


def test_the_whole_stored_conversation_again_asks_for_a_new_answer(stack: Stack, c: httpx.Client) -> None:
    """Nothing new to store: the model answers the stored conversation (one more assistant message)."""
    sid = create(c)
    client = sdk(stack, sid)
    first = client.chat.completions.create(model="x", messages=[user("hi")])
    again = client.chat.completions.create(model="x", messages=[user("hi"), first.choices[0].message])
    assert again.id != first.id
    assert turns(c, sid) == [("user", "hi"), ("assistant", "echo: hi"), ("assistant", "echo: hi")]


def test_leading_system_message_equal_to_the_situation_is_not_stored(
    stack: Stack, c: httpx.Client, model: ModelServer
) -> None:
    sid = create(c, situation="Be brief.")
    client = sdk(stack, sid)
    client.chat.completions.create(model="x", messages=[{"role": "system", "content": "Be brief."}, user("a")])
    client.chat.completions.create(model="x", messages=[{"role": "developer", "content": "Be brief."}, user("b")])
    assert [r for r, _ in turns(c, sid)] == ["user", "assistant", "user", "assistant"]


def test_a_system_message_other_than_the_situation_is_a_turn_stored_once(
    stack: Stack, c: httpx.Client, model: ModelServer
) -> None:
    sid = create(c, situation="Be brief.")
    client = sdk(stack, sid)
    m = marker()
    messages: list[Any] = [{"role": "system", "content": f"Speak like a pirate {m}."}, user("hello")]
    r = client.chat.completions.create(model="x", messages=messages)
    messages += [r.choices[0].message, user("again")]
    client.chat.completions.create(model="x", messages=messages)
    assert turns(c, sid) == [
        ("system", f"Speak like a pirate {m}."),
        ("user", "hello"),
        ("assistant", "echo: hello"),
        ("user", "again"),
        ("assistant", "echo: again"),
    ]
    sent = model.requests(containing=f"pirate {m}")[-1]["body"]["messages"]
    assert sent[:2] == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": f"Speak like a pirate {m}."},
    ]


def test_content_parts_equal_the_same_text(stack: Stack, c: httpx.Client) -> None:
    """A client may resend a text turn as content parts (or tool arguments re-serialised): still the same turn."""
    sid = create(c, tools=[TOOL])
    client = sdk(stack, sid)
    r = client.chat.completions.create(model="x", messages=[user("call lookup_order 5")])
    [call] = r.choices[0].message.tool_calls or []
    echoed = {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {
                    "name": "lookup_order",
                    "arguments": json.dumps(json.loads(call.function.arguments), indent=2),
                },
            }
        ],
    }
    client.chat.completions.create(
        model="x",
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "call lookup_order 5"}]},
            echoed,
            {"role": "tool", "tool_call_id": call.id, "content": "found"},
        ],
    )
    assert [r for r, _ in turns(c, sid)] == ["user", "assistant", "tool", "assistant"]


# -- errors, as the SDK's exceptions ----------------------------------------------------------------------------------------------
def test_a_wrong_key_is_an_authentication_error(stack: Stack, c: httpx.Client) -> None:
    sid = create(c)
    client = openai.OpenAI(base_url=f"{stack.url}/sessions/{sid}", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        client.chat.completions.create(model="x", messages=[user("hi")])
    assert e.value.status_code == 401 and e.value.code == "unauthorized" and e.value.type == "authentication_error"
    assert (
        isinstance(e.value.body, dict)
        and e.value.body["status"] == 401
        and e.value.body["message"] == "invalid API key"
    )


def test_unknown_and_other_tenants_sessions_are_not_found(stack: Stack, c: httpx.Client) -> None:
    theirs = create(c, tenant="globex")
    for sid in (theirs, str(uuid.uuid4()), "not-a-uuid"):
        with pytest.raises(openai.NotFoundError) as e:
            sdk(stack, sid).chat.completions.create(model="x", messages=[user("hi")])
        assert e.value.code == "not_found" and e.value.type == "not_found_error"
        with pytest.raises(openai.NotFoundError):
            sdk(stack, sid).models.list()
    assert turns(c, create(c)) == []
    r = c.get(f"/sessions/{theirs}/messages", headers=auth("globex"))
    assert r.json()["items"] == []


def test_n_other_than_one_is_a_bad_request(stack: Stack, c: httpx.Client) -> None:
    sid = create(c)
    with pytest.raises(openai.BadRequestError) as e:
        sdk(stack, sid).chat.completions.create(model="x", messages=[user("hi")], n=2)
    assert e.value.param == "n" and e.value.type == "invalid_request_error" and e.value.code == "unsupported_value"
    assert stored(c, sid) == [] and jobs(c, sid) == []


def test_token_budget_exceeded_is_a_bad_request_with_its_code(stack: Stack, c: httpx.Client) -> None:
    sid = create(c, token_budget=60, situation="You are a support agent.")
    client = sdk(stack, sid)
    long = "word " * 200
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=[user(long)], max_tokens=10)
    assert e.value.code == "token_budget_exceeded" and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as e:  # streamed: the error comes before the first chunk
        list(client.chat.completions.create(model="x", messages=[user(long + "again")], max_tokens=10, stream=True))
    assert e.value.code == "token_budget_exceeded"
    assert [j["error"]["code"] for j in jobs(c, sid)] == ["token_budget_exceeded"] * 2


def test_a_failing_provider_is_a_server_error(stack: Stack, c: httpx.Client, model: ModelServer) -> None:
    sid = create(c)
    model.control(fail_always=500, retry_after_ms=1)  # the worker's SDK retries at once
    client = sdk(stack, sid)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="x", messages=[user("hi")])
    assert e.value.status_code == 502 and e.value.code == "model_unavailable" and e.value.type == "server_error"
    with pytest.raises(openai.InternalServerError):  # streamed: before the first chunk, so an HTTP error too
        list(client.chat.completions.create(model="x", messages=[user("hi")], stream=True))
    model.control(fail_always=None)
    # the SDK's own retry of that request: the turn is stored already, so a new job answers it without storing it again
    r = client.chat.completions.create(model="x", messages=[user("hi")])
    assert r.choices[0].message.content == "echo: hi"
    assert turns(c, sid) == [("user", "hi"), ("assistant", "echo: hi")]
    assert [j["status"] for j in jobs(c, sid)] == ["succeeded", "failed", "failed"]


def test_malformed_input_is_rejected_and_stores_nothing(stack: Stack, c: httpx.Client) -> None:
    sid = create(c)
    client = sdk(stack, sid)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="x", messages=[{"role": "wizard", "content": "hi"}])  # type: ignore[misc]
    assert e.value.param == "messages[0].role" and e.value.code == "validation_failed"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="x", messages=[])
    with pytest.raises(openai.UnprocessableEntityError) as e:  # a tool result answering no call
        client.chat.completions.create(model="x", messages=[{"role": "tool", "tool_call_id": "call_x", "content": "?"}])
    assert e.value.param == "tool_call_id"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="x", messages=[user("hi")], temperature=3)
    assert e.value.param == "temperature"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(
            model="x",
            messages=[
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}
            ],
        )
    assert e.value.param == "messages[0].content[0]"
    r = c.post(
        f"/sessions/{sid}/chat/completions", content=b"{not json", headers={**ACME, "Content-Type": "application/json"}
    )
    assert (
        r.status_code == 400
        and r.json()["error"]["type"] == "invalid_request_error"
        and r.json()["error"]["code"] == "invalid_json"
    )
    assert stored(c, sid) == [] and jobs(c, sid) == []


def test_models_list(stack: Stack, c: httpx.Client) -> None:
    sid = create(c)
    models = sdk(stack, sid).models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert (
        models.data[0].object == "model"
        and models.data[0].owned_by == "parley"
        and isinstance(models.data[0].created, int)
    )


# -- another client built on the SDK ----------------------------------------------------------------------------------------------
def test_langchain_chat_openai_round_trip(stack: Stack, c: httpx.Client) -> None:
    lc = pytest.importorskip("langchain_openai")
    messages_mod = pytest.importorskip("langchain_core.messages")
    sid = create(c, situation="You are helpful.")
    llm = lc.ChatOpenAI(
        model="gpt-4o-mini", base_url=f"{stack.url}/sessions/{sid}", api_key=TENANTS["acme"], max_retries=0
    )
    history = [messages_mod.SystemMessage("You are helpful."), messages_mod.HumanMessage("first")]
    answer = llm.invoke(history)
    assert answer.content == "echo: first"
    history += [answer, messages_mod.HumanMessage("second")]
    streamed = "".join(str(ch.content) for ch in llm.stream(history))
    assert streamed == "echo: second"
    assert turns(c, sid) == [
        ("user", "first"),
        ("assistant", "echo: first"),
        ("user", "second"),
        ("assistant", "echo: second"),
    ]
