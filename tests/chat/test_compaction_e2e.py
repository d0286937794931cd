"""Compaction on a real stack (redis-server, `parley api`, `parley worker`, the OpenAI-protocol test server), over
HTTP: a session's `compaction` is stored, shown and validated; `POST /sessions/{id}/compact` queues a job whose
summariser (the configured model and instruction) summarises all but the newest `keep_last` messages, answers the
summary, records it as `SummaryAdded` and stores no message; a failing summariser fails the job and drops nothing."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx
import pytest

from shared.domain.events import SummaryAdded
from tests.chat.conftest import Stack, model_env
from tests.chat.test_chat_e2e import ACME, add, assert_error, create, log_events, marker, messages, wait_job
from tests.model_server import ModelServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(start_stack: Callable[..., Stack], model_server: ModelServer) -> Stack:
    return start_stack("chat-compaction", model_env(model_server))


@pytest.fixture
def c(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


def test_compact_on_demand_summarises_all_but_the_verbatim_tail(stack: Stack, c: httpx.Client, model) -> None:
    mark = marker()
    compaction = {"model": "summariser-1", "prompt": f"Summarise tersely. {mark}", "keep_last": 2}
    s = create(c, context_overflow="adaptive", compaction=compaction)
    assert s["compaction"] == {**compaction, "threshold": 1.0, "on_failure": "fail"}
    stored = [add(c, s["id"], "user" if i % 2 == 0 else "assistant", f"fact {i}: plums are purple") for i in range(6)]

    r = c.post(f"/sessions/{s['id']}/compact", headers=ACME)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/sessions/{s['id']}/chats/{r.json()['id']}"
    done = wait_job(c, s["id"], r.json()["id"])
    assert done["status"] == "succeeded" and done["model"] == "summariser-1"

    [call] = [q for q in model.requests() if mark in json.dumps(q["body"]["messages"])]
    assert call["body"]["model"] == "summariser-1"
    assert call["body"]["messages"][0] == {"role": "system", "content": f"Summarise tersely. {mark}"}
    said = call["body"]["messages"][-1]["content"]
    assert "fact 3:" in said and "fact 4:" not in said and "fact 5:" not in said
    assert done["response"]["choices"][0]["message"]["content"] == call["answer"]["content"]

    [summary] = [e for e in log_events(stack, s["id"]) if isinstance(e, SummaryAdded)]
    assert summary.data.up_to_seq == 4 and summary.data.summarized == [m["id"] for m in stored[:4]]
    assert summary.data.model == "summariser-1"
    assert [m["id"] for m in messages(c, s["id"])] == [m["id"] for m in stored]  # nothing stored or dropped


def test_a_failing_summariser_fails_the_compaction_and_drops_nothing(c: httpx.Client, model) -> None:
    s = create(c, context_overflow="adaptive")
    for i in range(3):
        add(c, s["id"], "user", f"note {i}")
    model.control(fail_always=500)
    r = c.post(f"/sessions/{s['id']}/compact", headers=ACME)
    assert r.status_code == 202, r.text
    done = wait_job(c, s["id"], r.json()["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "compaction_failed"
    assert len(messages(c, s["id"])) == 3


def test_compaction_settings_are_validated_and_patched(c: httpx.Client) -> None:
    s = create(c)
    for bad in ({"threshold": 0}, {"threshold": 1.5}, {"keep_last": -1}, {"on_failure": "drop"}, {"every": 1}):
        assert_error(c.post("/sessions", headers=ACME, json={"compaction": bad}), 422, "validation_failed")
    r = c.patch(f"/sessions/{s['id']}", headers=ACME, json={"compaction": {"threshold": 0.75}})
    assert r.status_code == 200 and r.json()["compaction"]["threshold"] == 0.75
    r = c.patch(f"/sessions/{s['id']}", headers=ACME, json={"compaction": None})
    assert r.status_code == 200 and r.json()["compaction"] is None
