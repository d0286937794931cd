"""The official npm `openai` SDK (pinned in package-lock.json) against a session's Chat Completions endpoint, using
its own helpers the way its docs show; each time, Parley's own `GET /sessions/{id}/messages` must show every
message stored exactly once. The helpers echo back fields they parsed (`parsed`, `parsed_arguments`, …), which
OpenAI ignores and so must Parley."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.chat.conftest import Stack
from tests.clients.api import KEY, create, events, job_ended, marker, stored
from tests.clients.node import NodeScript
from tests.model_server import MODEL_NAME, ModelServer

pytestmark = pytest.mark.usefixtures("node")  # checked first: a skip (or failure) before any stack starts


def turns(c: httpx.Client, sid: str) -> list[tuple[str, object]]:
    return [(m["role"], m["content"]) for m in stored(c, sid)]


def test_stream_helper_final_message_appended(
    stack: Stack, c: httpx.Client, model: ModelServer, run_node: Callable[..., NodeScript]
) -> None:
    sid = create(c)
    m = marker()
    out = run_node(
        "openai_sdk.mjs", api=stack.url, key=KEY, session=sid, scenario="stream_final_message", text=f"hi {m}"
    ).result()
    assert "".join(out["deltas"]) == out["final"]["content"] == f"echo: hi {m}"
    assert "parsed" in out["final"]  # what the helper adds, and what the next request echoes
    echoed = out["sent"][1]["messages"][1]
    assert echoed["role"] == "assistant" and "parsed" in echoed, echoed
    assert out["next"]["content"] == f"echo: hi {m} again"
    assert turns(c, sid) == [
        ("user", f"hi {m}"),
        ("assistant", f"echo: hi {m}"),
        ("user", f"hi {m} again"),
        ("assistant", f"echo: hi {m} again"),
    ]
    assert len(set(out["ids"])) == 2


def test_run_tools_with_two_tools(
    stack: Stack, c: httpx.Client, model: ModelServer, run_node: Callable[..., NodeScript]
) -> None:
    """`runTools()` drives two tools over three requests; then the conversation goes on from `runner.messages`,
    whose assistant turns carry the helper's `parsed` and `parsed_arguments`."""
    sid = create(c)
    ask = "call get_weather Paris, then call get_time Paris"
    out = run_node("openai_sdk.mjs", api=stack.url, key=KEY, session=sid, scenario="run_tools", text=ask).result()
    assert out["called"] == [
        {"name": "get_weather", "args": {"input": "Paris"}},
        {"name": "get_time", "args": {"input": "Paris"}},
    ]
    assert out["content"] == "tool said: noon in Paris"
    assert out["rounds"] == 3  # one request per round, each the whole conversation so far
    assert [m["role"] for m in out["sent"][2]["messages"]] == ["user", "assistant", "tool", "assistant", "tool"]
    continued = out["sent"][3]["messages"]
    echoed = [call["function"] for m in continued if m.get("tool_calls") for call in m["tool_calls"]]
    assert [f["parsed_arguments"] for f in echoed] == [{"input": "Paris"}] * 2, continued
    assert "parsed" in continued[-2], continued
    assert out["next"]["content"] == "echo: thanks"
    history = stored(c, sid)
    assert [(m["role"], m["content"]) for m in history] == [
        ("user", ask),
        ("assistant", None),
        ("tool", "sunny in Paris"),
        ("assistant", None),
        ("tool", "noon in Paris"),
        ("assistant", "tool said: noon in Paris"),
        ("user", "thanks"),
        ("assistant", "echo: thanks"),
    ]
    calls = [m["tool_calls"][0] for m in history if m["tool_calls"]]
    assert [call["function"]["name"] for call in calls] == ["get_weather", "get_time"]
    assert [m["tool_call_id"] for m in history if m["role"] == "tool"] == [call["id"] for call in calls]
    assert all(
        set(call) == {"id", "type", "function"} and set(call["function"]) == {"name", "arguments"} for call in calls
    )


def test_models_retrieve(stack: Stack, c: httpx.Client, run_node: Callable[..., NodeScript]) -> None:
    sid = create(c)
    out = run_node(
        "openai_sdk.mjs", api=stack.url, key=KEY, session=sid, scenario="models", text="gpt-4o-mini"
    ).result()
    retrieved = out["retrieved"]
    assert retrieved["id"] == "gpt-4o-mini" and retrieved["object"] == "model"
    assert isinstance(retrieved["created"], int) and retrieved["owned_by"] == "parley"
    assert [m["id"] for m in out["listed"]] == [MODEL_NAME]


def test_stream_stopped_after_first_delta_then_resent(
    stack: Stack, c: httpx.Client, model: ModelServer, run_node: Callable[..., NodeScript]
) -> None:
    """ "Stop generating": the client keeps the first delta, the job goes on and stores its whole answer, and the
    client's next request (with its partial answer) must amend that answer rather than store the history again."""
    sid = create(c)
    m = marker()
    model.control(chunk_delay_s=0.05)
    script = run_node(
        "openai_sdk.mjs",
        api=stack.url,
        key=KEY,
        session=sid,
        scenario="stop_and_resend",
        text=f"tell me a long story {m}",
    )
    stopped = script.expect("stopped")
    whole = f"echo: tell me a long story {m}"
    assert stopped["partial"] and whole.startswith(stopped["partial"]) and stopped["partial"] != whole
    assert job_ended(c, sid, stopped["job"])["status"] == "succeeded"  # a disconnect does not cancel the job
    [answer] = [x for x in stored(c, sid) if x["role"] == "assistant"]
    assert answer["content"] == whole
    script.send(do="resend")
    out = script.result()
    assert out["next"]["content"] == f"echo: tell me a long story {m} again"
    history = stored(c, sid)
    assert [(x["role"], x["content"]) for x in history] == [
        ("user", f"tell me a long story {m}"),
        ("assistant", stopped["partial"]),
        ("user", f"tell me a long story {m} again"),
        ("assistant", f"echo: tell me a long story {m} again"),
    ]
    assert history[1]["id"] == answer["id"] and "edited_at" in history[1]
    # the partial answer is an edit of the stored one: the log keeps what the model said
    log = events(c, sid)
    edits = [e for e in log if e["type"] == "MessageEdited"]
    assert [(e["data"]["id"], e["data"]["content"]) for e in edits] == [(answer["id"], stopped["partial"])]
    added = [e["data"]["content"] for e in log if e["type"] == "MessageAdded"]
    assert added.count(f"tell me a long story {m}") == 1 and added.count(whole) == 1
    assert not [e for e in log if e["type"] == "MessageRemoved"]
    assert [x["content"] for x in out["sent"][1]["messages"]] == [
        f"tell me a long story {m}",
        stopped["partial"],
        f"tell me a long story {m} again",
    ]
