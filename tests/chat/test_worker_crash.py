"""Crash test for chat jobs: kill -9 `parley worker` while 50 chats are mid-answer, start a new worker,
and check every chat ends with exactly one answer and a complete stream.

The model server streams one word per chunk with a delay, so when the worker dies every chat is
running and has streamed part of its answer. The new worker (PARLEY_CHAT_CLAIM_S=2) picks the jobs
up once their lease lapses; the answers are decided on the session's log, so none is stored twice,
and the retried attempt resumes the chunk stream instead of repeating it. Two more sessions hold
three chats each, queued behind one another (multitask enqueue), so queued jobs cross the crash too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.chat.conftest import Stack, model_env
from tests.model_server import ModelServer, parse_sse
from tests.support import auth, wait_for

pytestmark = pytest.mark.slow

ACME = auth("acme")
RUNNING = 50
QUEUED_SESSIONS, QUEUED_PER_SESSION = 2, 3
WORDS = 24
CHUNK_DELAY_S = 0.1
START_TIMEOUT_S = 30.0
"""Bound on waiting for all 50 answers to be streaming before the kill."""
END_TIMEOUT_S = 60.0
"""Bound on waiting for every job to end after the restart."""
ENDED = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def crash_stack(start_stack: Callable[..., Stack], model_server: ModelServer) -> Stack:
    return start_stack("chat-crash", model_env(model_server, PARLEY_CHAT_CLAIM_S="2"))


async def post_chat(c: httpx.AsyncClient, sid: str, text: str) -> str:
    r = await c.post(
        f"/sessions/{sid}/chat",
        json={"messages": [{"role": "user", "content": text}]},
        headers={**ACME, "Prefer": "respond-async"},
    )
    assert r.status_code == 202, r.text
    return r.json()["id"]


async def create(c: httpx.AsyncClient) -> str:
    r = await c.post("/sessions", json={}, headers=ACME)
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def read_stream(c: httpx.AsyncClient, sid: str, job_id: str) -> str:
    """The job's whole stream from the start (the job has ended, so it ends at once)."""
    r = await c.get(f"/sessions/{sid}/chats/{job_id}/stream", headers=ACME, timeout=httpx.Timeout(20, read=10))
    assert r.status_code == 200, r.text
    return r.text


async def test_kill_9_of_the_worker_mid_answer_loses_no_chat_and_doubles_no_answer(
    crash_stack: Stack, model_server: ModelServer
):
    model_server.reset()
    model_server.control(chunk_delay_s=CHUNK_DELAY_S)
    mark = f"crash{int(time.time())}"
    text_of = lambda i, k=0: " ".join([f"chat{i}.{k}", *(f"w{n}" for n in range(WORDS)), mark])  # noqa: E731

    async with httpx.AsyncClient(base_url=crash_stack.url, timeout=30) as c:
        # 50 sessions with one chat each, all of them answering at once.
        sids = await asyncio.gather(*(create(c) for _ in range(RUNNING)))
        running = await asyncio.gather(*(post_chat(c, sid, text_of(i)) for i, sid in enumerate(sids)))
        jobs: dict[str, list[tuple[str, str]]] = {
            sid: [(jid, text_of(i))] for i, (sid, jid) in enumerate(zip(sids, running))
        }
        # Two sessions with three chats queued behind one another.
        for q in range(QUEUED_SESSIONS):
            sid = await create(c)
            jobs[sid] = []
            for k in range(QUEUED_PER_SESSION):
                text = text_of(RUNNING + q, k)
                jobs[sid].append((await post_chat(c, sid, text), text))
        total = sum(len(v) for v in jobs.values())

        async def all_mid_answer() -> bool:
            reqs = [r for r in model_server.requests(mark) if r["outcome"] is None and r["chunks_sent"] >= 2]
            return len(reqs) >= RUNNING + QUEUED_SESSIONS

        await wait_for(all_mid_answer, START_TIMEOUT_S, "every session's first chat to be mid-answer")
        old = crash_stack.worker
        old.kill()
        assert old.proc is not None and old.proc.returncode == -9
        crash_stack.start_worker()

        async def job(sid: str, jid: str) -> dict[str, Any]:
            r = await c.get(f"/sessions/{sid}/chats/{jid}", headers=ACME)
            assert r.status_code == 200, r.text
            return r.json()

        async def all_ended() -> list[dict[str, Any]] | None:
            found = await asyncio.gather(*(job(sid, jid) for sid, pairs in jobs.items() for jid, _ in pairs))
            return found if all(j["status"] in ENDED for j in found) else None

        try:
            await wait_for(all_ended, END_TIMEOUT_S, f"all {total} chats to end after the restart", interval=0.25)
        except pytest.fail.Exception:
            found = await asyncio.gather(*(job(sid, jid) for sid, pairs in jobs.items() for jid, _ in pairs))
            stuck = [(j["id"], j["status"], j["attempts"]) for j in found if j["status"] not in ENDED]
            pytest.fail(f"{len(stuck)} of {total} chats never ended, e.g. {stuck[:5]}")

        problems: list[str] = []
        for sid, pairs in jobs.items():
            r = await c.get(f"/sessions/{sid}/messages", params={"limit": 1000}, headers=ACME)
            assert r.status_code == 200, r.text
            stored = r.json()["items"]
            answers = [m for m in stored if m["role"] == "assistant"]
            if len(answers) != len(pairs):
                problems.append(
                    f"session {sid}: {len(answers)} assistant messages for {len(pairs)} chats: {[m['content'] for m in answers]}"
                )
            for jid, text in pairs:
                j = await job(sid, jid)
                if j["status"] != "succeeded":
                    problems.append(f"job {jid}: {j['status']} {j['error']}")
                    continue
                answer = j["response"]["choices"][0]["message"]["content"]
                if answer != f"echo: {text}":
                    problems.append(f"job {jid}: answered {answer!r}")
                if sum(1 for m in answers if m["content"] == answer) != 1:
                    problems.append(
                        f"job {jid}: its answer is stored {sum(1 for m in answers if m['content'] == answer)} times"
                    )
                events = [e for e in parse_sse(await read_stream(c, sid, jid)) if e.data is not None]
                if len(events) < 3 or events[-1].data != "[DONE]" or "usage" not in json.loads(events[-2].data or "{}"):
                    problems.append(
                        f"job {jid}: its stream does not end with the usage event and [DONE]: {events[-3:]}"
                    )
                    continue
                if not all(e.id for e in events):
                    problems.append(f"job {jid}: an event without an id")
                streamed = "".join(
                    (json.loads(e.data)["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                    for e in events[:-2]
                )
                if streamed != answer:
                    problems.append(f"job {jid}: the stream's deltas make {streamed!r}, not the answer {answer!r}")
        assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:20])

        # Every chat that was mid-answer ran again on the new worker.
        first_jobs = [pairs[0][0] for pairs in jobs.values()]
        attempts = [(await job(sid, jid))["attempts"] for sid, pairs in jobs.items() for jid in [pairs[0][0]]]
        assert all(a >= 2 for a in attempts), dict(zip(first_jobs, attempts))
