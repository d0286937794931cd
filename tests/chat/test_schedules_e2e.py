"""Cron schedules on a real stack (redis-server, `parley api`, two `parley worker`s, the OpenAI-protocol test
server), over HTTP: the routes answer as documented and bad input is a 4xx that writes nothing; a schedule ticking
every second runs one chat per tick across a worker's kill -9 (none lost, none twice), each answered once."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

import httpx
import pytest

from shared.domain.events import ChatCompleted, ChatRequested, ScheduleFired
from tests.chat.conftest import Stack, model_env
from tests.chat.test_chat_e2e import ACME, GLOBEX, assert_error, create, log_events, marker, messages, user, wait_for
from tests.model_server import ModelServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(start_stack: Callable[..., Stack], model_server: ModelServer) -> Stack:
    env = model_env(model_server, PARLEY_SCHEDULE_MIN_INTERVAL_S="1", PARLEY_SCHEDULE_POLL_S="0.1")
    return start_stack("chat-schedules", env, workers=2)


@pytest.fixture
def c(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client


def version(c: httpx.Client, sid: str) -> int:
    return int(c.get(f"/sessions/{sid}", headers=ACME).headers["etag"].strip('"'))


def test_schedule_routes_answer_as_documented_and_bad_input_writes_nothing(c: httpx.Client) -> None:
    sid = create(c)["id"]
    base = f"/sessions/{sid}/schedules"
    r = c.post(base, headers=ACME, json={"cron": "30 8 * * 1-5", "timezone": "Europe/Paris", "messages": [user("hi")]})
    assert r.status_code == 201, r.text
    made = r.json()
    assert r.headers["location"] == f"{base}/{made['id']}" and r.headers["etag"] == f'"{version(c, sid)}"'
    assert (made["cron"], made["timezone"], made["paused"], made["runs"], made["skipped"]) == (
        "30 8 * * 1-5",
        "Europe/Paris",
        False,
        0,
        0,
    )
    next_run = datetime.fromisoformat(made["next_run_at"])
    assert next_run.weekday() < 5 and next_run.utcoffset() == timedelta(0)
    assert c.get(base, headers=ACME).json()["items"] == [made]
    assert c.get(f"{base}/{made['id']}", headers=ACME).json() == made

    paused = c.patch(f"{base}/{made['id']}", headers=ACME, json={"paused": True})
    assert paused.status_code == 200 and paused.json()["paused"] and paused.json()["next_run_at"] is None

    before = version(c, sid)
    for bad, code in (
        ({"cron": "* * * *", "messages": [user("x")]}, "validation_failed"),
        ({"cron": "*/1 * * * * *", "timezone": "Nowhere/Else"}, "validation_failed"),
        ({"cron": "* * * * *", "stream": True}, "validation_failed"),  # a chat request's field, not a schedule's
        ({"cron": "* * * * *", "run_at": "2027-01-01T00:00:00Z"}, "validation_failed"),
        ({"messages": [user("x")]}, "validation_failed"),
        (
            {"cron": "* * * * *", "messages": [{"role": "tool", "content": "x", "tool_call_id": "c"}]},
            "validation_failed",
        ),
    ):
        assert_error(c.post(base, headers=ACME, json=bad), 422, code)
    assert_error(
        c.patch(f"{base}/{made['id']}", headers=ACME, json={"cron": "nope nope nope"}), 422, "validation_failed"
    )
    assert_error(c.patch(f"{base}/{made['id']}", headers=ACME, json={"every": 5}), 422, "validation_failed")
    assert_error(c.get(f"{base}/{made['id']}", headers=GLOBEX), 404, "not_found")
    assert_error(c.post(base, headers=GLOBEX, json={"cron": "* * * * *"}), 404, "not_found")
    assert_error(c.delete(f"{base}/{made['id']}", headers=GLOBEX), 404, "not_found")
    assert_error(c.get(f"{base}/not-a-uuid", headers=ACME), 404, "not_found")
    assert version(c, sid) == before  # nothing refused wrote anything

    gone = c.delete(f"{base}/{made['id']}", headers=ACME)
    assert gone.status_code == 204 and gone.headers["etag"] == f'"{before + 1}"'
    assert_error(c.get(f"{base}/{made['id']}", headers=ACME), 404, "not_found")
    assert c.get(base, headers=ACME).json() == {"items": []}


def test_every_tick_runs_one_chat_across_a_worker_kill(stack: Stack, c: httpx.Client, model: ModelServer) -> None:
    mark = marker()
    sid = create(c)["id"]
    base = f"/sessions/{sid}/schedules"
    r = c.post(base, headers=ACME, json={"cron": "* * * * * *", "messages": [user(f"tick {mark}")]})
    assert r.status_code == 201, r.text
    sched = r.json()["id"]

    def runs(n: int) -> Callable[[], bool]:
        return lambda: c.get(f"{base}/{sched}", headers=ACME).json()["runs"] >= n

    wait_for(runs(3), "3 ticks", timeout=15)
    stack.workers[0].kill()  # -9: the other worker's scheduler goes on; the dead one's chat is run again
    wait_for(runs(6), "6 ticks", timeout=15)
    stack.start_worker()
    wait_for(runs(9), "9 ticks", timeout=15)
    assert c.patch(f"{base}/{sched}", headers=ACME, json={"paused": True}).status_code == 200

    def answered() -> list[object] | None:
        events = log_events(stack, sid)
        asked = [e.data.job_id for e in events if isinstance(e, ChatRequested)]
        done = [e.data.job_id for e in events if isinstance(e, ChatCompleted)]
        return events if sorted(asked) == sorted(done) else None

    events = wait_for(answered, "every tick's chat answered", timeout=30)
    ticks = [e for e in events if isinstance(e, ScheduleFired)]
    assert all(t.data.skipped is None and t.data.job_id for t in ticks), ticks
    seconds = [t.data.tick for t in ticks]
    assert len(ticks) >= 9
    assert seconds == [seconds[0] + timedelta(seconds=i) for i in range(len(seconds))]  # none lost, none twice
    requested = [e.data.job_id for e in events if isinstance(e, ChatRequested)]
    assert requested == [t.data.job_id for t in ticks]
    completed = [e.data.job_id for e in events if isinstance(e, ChatCompleted)]
    assert sorted(completed) == sorted(requested) and len(set(completed)) == len(completed)  # each answered once
    said = messages(c, sid)
    assert [m["role"] for m in said].count("user") == [m["role"] for m in said].count("assistant") == len(ticks)
    shown = c.get(f"{base}/{sched}", headers=ACME).json()
    assert shown["runs"] == len(ticks) and shown["last_job_id"] == ticks[-1].data.job_id
    time.sleep(1.5)
    assert len([e for e in log_events(stack, sid) if isinstance(e, ScheduleFired)]) == len(ticks)  # paused
