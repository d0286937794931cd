"""Scheduled chats on a real stack (redis-server, `parley api`, `parley worker`, the OpenAI-protocol test server):
a chat with `delay_s` answers 202 with its `run_at`, the model is not called before then, the chat survives
its worker being killed -9 while it waits (the queue keeps it), a chat asked for now does not wait for it; without `Prefer: respond-async` it is a 422 that
writes nothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import httpx
import pytest

from tests.chat.conftest import Stack, model_env
from tests.chat.test_chat_e2e import ACME, ASYNC, chat, chat_ok, create, job, marker, messages, user, wait_job
from tests.model_server import ModelServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(start_stack: Callable[..., Stack], model_server: ModelServer) -> Stack:
    return start_stack("chat-scheduled", model_env(model_server))


@pytest.fixture
def c(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


def test_a_delayed_chat_waits_for_its_time_even_across_a_worker_kill(stack: Stack, c: httpx.Client, model):
    mark = marker()
    s = create(c)
    r = chat(c, s["id"], user(f"in a moment {mark}"), headers=ASYNC, delay_s=2.5)
    assert r.status_code == 202, r.text
    accepted = r.json()
    run_at = datetime.fromisoformat(accepted["run_at"])
    assert (run_at - datetime.fromisoformat(accepted["created_at"])).total_seconds() == pytest.approx(2.5, abs=0.01)
    assert job(c, s["id"], accepted["id"])["run_at"] == accepted["run_at"]

    stack.worker.kill()  # -9 while the chat waits: the queue, not the worker, holds it
    stack.start_worker()
    time.sleep(1.0)
    assert job(c, s["id"], accepted["id"])["status"] == "queued" and not model.requests(mark)

    done = wait_job(c, s["id"], accepted["id"])
    assert done["status"] == "succeeded" and len(model.requests(mark)) == 1
    received = datetime.fromtimestamp(model.requests(mark)[0]["received_at"], UTC)
    assert received >= run_at
    assert [m["role"] for m in messages(c, s["id"])] == ["user", "assistant"]


def test_a_chat_asked_for_now_overtakes_one_scheduled_for_later(stack: Stack, c: httpx.Client, model):
    mark = marker()
    s = create(c)
    later = chat(c, s["id"], user(f"remind me {mark}"), headers=ASYNC, delay_s=2.0).json()
    answered = chat_ok(c, s["id"], user(f"meanwhile {mark}"))  # synchronous: answered now, not in 2 s (or a 504)
    assert answered["choices"][0]["finish_reason"] == "stop"
    assert job(c, s["id"], later["id"])["status"] == "queued"
    done = wait_job(c, s["id"], later["id"])
    assert done["status"] == "succeeded"
    first, second = model.requests(mark)
    assert [m["content"] for m in first["body"]["messages"]] == [f"remind me {mark}", f"meanwhile {mark}"]
    assert datetime.fromtimestamp(second["received_at"], UTC) >= datetime.fromisoformat(later["run_at"])
    assert [m["role"] for m in messages(c, s["id"])] == ["user", "user", "assistant", "assistant"]


def test_a_scheduled_chat_answers_202_without_respond_async_and_bad_times_are_422s(c: httpx.Client):
    s = create(c)
    r = chat(c, s["id"], user("in an hour"), delay_s=3_600, stream=True)  # nothing to wait for or stream yet
    assert r.status_code == 202 and r.json()["run_at"], r.text
    both = chat(c, s["id"], user("a minute after"), run_at=r.json()["run_at"], delay_s=60).json()
    assert (datetime.fromisoformat(both["run_at"]) - datetime.fromisoformat(r.json()["run_at"])).total_seconds() == 60
    c.post(f"/sessions/{s['id']}/chats/{both['id']}/cancel", headers=ACME)
    cancelled = c.post(f"/sessions/{s['id']}/chats/{r.json()['id']}/cancel", headers=ACME)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    version = c.get(f"/sessions/{s['id']}", headers=ACME).json()["version"]
    for body in ({"run_at": "2026-01-01T00:00:00"}, {"delay_s": -1}, {"delay_s": 30 * 86_400 + 1}):
        r = chat(c, s["id"], user("when?"), headers=ASYNC, **body)
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_failed", r.text
    assert c.get(f"/sessions/{s['id']}", headers=ACME).json()["version"] == version
