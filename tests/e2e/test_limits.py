"""Limits and overload, end to end, across two API processes on one Redis.

Per-tenant limits live in Redis, so two API processes enforce one budget together: the request rate (429
`rate_limited` with `Retry-After` and the IETF `RateLimit-Policy` / `RateLimit` fields), concurrent chats, chat
tokens per day (429 `quota_exceeded`), open streams. One tenant over its limits never gets another refused.
A process sheds work beyond `PARLEY_MAX_INFLIGHT` with 503 `overloaded` and keeps every acknowledged write.
Limits are set with `parley tenants set-limits`, as an operator would.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest

from shared.adapters.redis.scripts import ADMIT
from shared.adapters.redis.server import RedisServer
from tests.chat.conftest import model_env
from tests.model_server import ModelServer
from tests.support import ROOT, ParleyProcess, wait_ready

TENANTS = {
    name: f"{name}-key" for name in ("quiet", "noisy", "chatty", "thrifty", "streamer", "counted", "crowd", "leased")
}
KEYS = ",".join(f"{t}:{k}" for t, k in TENANTS.items())
POLICY = re.compile(r'^"tenant";q=(\d+);w=(\d+)$')
STATE = re.compile(r'^"tenant";r=(\d+);t=(\d+)$')


def _post(url: str, path: str, body: object, key: str) -> bytes:
    data = json.dumps(body).encode()
    host = urlsplit(url).netloc
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
    return f"{head}Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data


async def _burst(url: str, requests: list[bytes]) -> list[tuple[int, dict]]:
    """Send every request at the same instant, each on its own connection opened beforehand, and read the answers
    (status, JSON body): an HTTP client pool opens its connections as it goes and trickles the requests in, so
    whether the server ever saw them queue would depend on how fast the test's own process is."""
    u = urlsplit(url)
    conns = await asyncio.gather(*(asyncio.open_connection(u.hostname, u.port) for _ in requests))
    for (_, writer), raw in zip(conns, requests, strict=True):
        writer.write(raw)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, dict]:
        try:
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            return status, json.loads(await reader.readexactly(length))
        finally:
            writer.close()

    return await asyncio.gather(*(answer(r, w) for r, w in conns))


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TENANTS[tenant]}"}


@dataclass
class Stack:
    redis: RedisServer
    apis: list[ParleyProcess]
    model: ModelServer

    def set_limits(self, tenant: str, *args: str) -> None:
        env = {**os.environ, "REDIS_URL": self.redis.url, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", "tenants", "set-limits", "--tenant", tenant, *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e-limits")
    model = ModelServer().start()
    redis = RedisServer(root / "redis").start()
    env = {**model_env(model), "PARLEY_API_KEYS": KEYS}
    procs = [
        ParleyProcess("api", redis.url, root, env),
        ParleyProcess("api", redis.url, root, env),
        ParleyProcess("worker", redis.url, root, env),
    ]
    try:
        for p in procs:
            p.start()
        for p in procs[:2]:
            wait_ready(p.url)
        yield Stack(redis, procs[:2], model)
    finally:
        for p in reversed(procs):
            p.stop()
        redis.stop()
        model.stop()


async def test_a_tenants_rate_is_one_budget_across_processes_and_refusals_say_when_to_retry(stack: Stack):
    stack.set_limits("noisy", "--rps", "2", "--burst", "10")
    async with httpx.AsyncClient(timeout=10) as c:
        answers = [await c.get(f"{stack.apis[i % 2].url}/sessions", headers=auth("noisy")) for i in range(30)]
    statuses = Counter(r.status_code for r in answers)
    # 10 at once, plus what 2/s refills while 30 requests go out: well under 30, whatever process took each
    assert 10 <= statuses[200] <= 14 and statuses[429] == 30 - statuses[200], statuses
    for r in answers:
        policy = POLICY.match(r.headers["ratelimit-policy"])
        state = STATE.match(r.headers["ratelimit"])
        assert policy and state and policy.groups() == ("10", "5"), r.headers
        if r.status_code == 429:
            body = r.json()["error"]
            assert body == {"status": 429, "code": "rate_limited", "message": body["message"]}
            assert int(r.headers["retry-after"]) >= 1 and state.group(1) == "0"
    refused = [r for r in answers if r.status_code == 429]
    assert {str(r.url).split("/sessions")[0] for r in refused} == {p.url for p in stack.apis}  # both processes refuse


async def test_a_busy_tenant_is_admitted_from_leases_one_redis_call_per_lease(stack: Stack, tmp_path):
    stack.set_limits("leased", "--rps", "400", "--burst", "200")  # leases of 20 (50 ms of its rate)
    log = tmp_path / "monitor.log"
    monitor = subprocess.Popen(
        ["redis-cli", "-p", str(stack.redis.port), "monitor"], stdout=open(log, "wb"), stderr=subprocess.DEVNULL
    )
    try:
        await asyncio.sleep(0.3)  # MONITOR attached
        async with httpx.AsyncClient(timeout=10) as c:
            answers = [await c.get(f"{stack.apis[i % 2].url}/sessions", headers=auth("leased")) for i in range(120)]
        await asyncio.sleep(0.3)
    finally:
        monitor.terminate()
        monitor.wait()
    assert Counter(r.status_code for r in answers) == {200: 120}
    admits = [line for line in log.read_text(errors="replace").splitlines() if ADMIT.sha in line and "leased" in line]
    # per request it would be 120; per lease: each process learns the limits once, then takes 20 at a time
    assert 2 <= len(admits) <= 16, len(admits)
    remaining = [int(STATE.match(r.headers["ratelimit"]).group(1)) for r in answers]  # type: ignore[union-attr]
    assert all(0 < r < 200 for r in remaining)


async def test_a_noisy_tenant_far_over_its_rate_never_gets_a_quiet_one_refused(stack: Stack):
    stack.set_limits("noisy", "--rps", "5", "--burst", "5")
    async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=64)) as c:

        async def noisy() -> Counter:
            got: Counter = Counter()
            for i in range(150):
                got[(await c.get(f"{stack.apis[i % 2].url}/sessions", headers=auth("noisy"))).status_code] += 1
            return got

        async def quiet() -> Counter:
            got: Counter = Counter()
            for i in range(40):
                r = await c.post(f"{stack.apis[i % 2].url}/sessions", json={}, headers=auth("quiet"))
                got[r.status_code] += 1
            return got

        results = await asyncio.gather(*(noisy() for _ in range(4)), quiet())
    noisy_total = sum(results[:4], Counter())
    assert noisy_total[429] >= 500 and set(noisy_total) <= {200, 429}, noisy_total
    assert results[4] == Counter({201: 40}), results[4]


async def wait_job(c: httpx.AsyncClient, url: str, tenant: str, sid: str, job: str) -> dict:
    for _ in range(200):
        got = (await c.get(f"{url}/sessions/{sid}/chats/{job}", headers=auth(tenant))).json()
        if got["status"] in ("succeeded", "failed", "cancelled"):
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"chat {job} did not end")


async def test_concurrent_chats_are_limited_per_tenant_and_a_slot_comes_back_when_a_chat_ends(stack: Stack):
    stack.set_limits("chatty", "--concurrent-chats", "1")
    stack.model.reset()
    stack.model.control(chunk_delay_s=0.2)
    async with httpx.AsyncClient(timeout=20) as c:
        api1, api2 = (p.url for p in stack.apis)
        s1 = (await c.post(f"{api1}/sessions", json={}, headers=auth("chatty"))).json()["id"]
        s2 = (await c.post(f"{api2}/sessions", json={}, headers=auth("chatty"))).json()["id"]
        ask = {"messages": [{"role": "user", "content": "one two three"}]}
        first = await c.post(
            f"{api1}/sessions/{s1}/chat", json=ask, headers={**auth("chatty"), "Prefer": "respond-async"}
        )
        assert first.status_code == 202, first.text
        second = await c.post(
            f"{api2}/sessions/{s2}/chat", json=ask, headers={**auth("chatty"), "Prefer": "respond-async"}
        )
        err = second.json()["error"]
        assert (
            second.status_code == 429
            and err["code"] == "rate_limited"
            and err["details"]["limit"] == "concurrent_chats"
        )
        assert second.headers["retry-after"] == "1"
        assert (await c.get(f"{api2}/sessions/{s2}/messages", headers=auth("chatty"))).json()[
            "items"
        ] == []  # nothing written
        other = await c.post(f"{api2}/sessions", json={}, headers=auth("quiet"))
        quiet = await c.post(
            f"{api2}/sessions/{other.json()['id']}/chat", json=ask, headers={**auth("quiet"), "Prefer": "respond-async"}
        )
        assert quiet.status_code == 202  # another tenant's chats are not counted
        assert (await wait_job(c, api1, "chatty", s1, first.json()["id"]))["status"] == "succeeded"
        for _ in range(100):  # the projector gives the slot back when it projects the answer
            again = await c.post(
                f"{api2}/sessions/{s2}/chat", json=ask, headers={**auth("chatty"), "Prefer": "respond-async"}
            )
            if again.status_code == 202:
                break
            await asyncio.sleep(0.05)
        assert again.status_code == 202, again.text
        await wait_job(c, api2, "chatty", s2, again.json()["id"])
    stack.model.reset()


async def test_chat_tokens_per_day_are_a_quota_counted_from_the_log(stack: Stack):
    stack.set_limits("thrifty", "--chat-tokens-per-day", "10")
    async with httpx.AsyncClient(timeout=20) as c:
        url = stack.apis[0].url
        sid = (await c.post(f"{url}/sessions", json={}, headers=auth("thrifty"))).json()["id"]
        ask = {"messages": [{"role": "user", "content": "a few words to answer"}]}
        answered = await c.post(f"{url}/sessions/{sid}/chat", json=ask, headers=auth("thrifty"))
        assert answered.status_code == 200, answered.text
        assert answered.json()["usage"]["total_tokens"] >= 10  # one chat uses the day's quota up
        for _ in range(50):  # the usage counters move when the projector applies the chat's events
            refused = await c.post(f"{stack.apis[1].url}/sessions/{sid}/chat", json=ask, headers=auth("thrifty"))
            if refused.status_code == 429:
                break
            await asyncio.sleep(0.1)
        err = refused.json()["error"]
        assert refused.status_code == 429 and err["code"] == "quota_exceeded", refused.text
        assert err["details"]["limit"] == "chat_tokens_per_day" and err["details"]["used"] >= 10
        assert 1 <= int(refused.headers["retry-after"]) <= 86_400  # until midnight UTC


async def test_usage_shows_a_tenant_its_own_requests_chats_and_tokens(stack: Stack):
    async with httpx.AsyncClient(timeout=20) as c:
        url = stack.apis[1].url
        before = (await c.get(f"{url}/usage", params={"days": 2}, headers=auth("counted"))).json()
        assert before["tenant"] == "counted" and len(before["days"]) == 2
        assert before["limits"] == {
            "rps": 1000.0,
            "burst": 2000,
            "concurrent_chats": 100,
            "chat_tokens_per_day": 0,
            "streams": 1000,
            "retention_idle_days": 0,
            "retention_action": "delete",
            "retention_keep_messages": 0,
        }
        sid = (await c.post(f"{url}/sessions", json={}, headers=auth("counted"))).json()["id"]
        jobs = []
        for text in ("first question", "second, longer question for the model"):
            r = await c.post(
                f"{url}/sessions/{sid}/chat",
                json={"messages": [{"role": "user", "content": text}]},
                headers=auth("counted"),
            )
            jobs.append(r.json())
        records = [(await c.get(f"{url}/sessions/{sid}/chats/{j['id']}", headers=auth("counted"))).json() for j in jobs]
        await asyncio.sleep(0.3)
        after = (await c.get(f"{url}/usage", params={"days": 1}, headers=auth("counted"))).json()
    today, was = after["days"][0], before["days"][0]
    assert today["chats"] - was["chats"] == 2
    assert today["prompt_tokens"] - was["prompt_tokens"] == sum(r["context"]["prompt_tokens"] for r in records)
    assert today["completion_tokens"] - was["completion_tokens"] == sum(j["usage"]["completion_tokens"] for j in jobs)
    assert today["requests"] - was["requests"] >= 6  # (this one's own GET counts as well)
    quiet = (await httpx.AsyncClient().get(f"{url}/usage", params={"days": 1}, headers=auth("quiet"))).json()
    assert quiet["tenant"] == "quiet"  # a tenant sees only its own


async def test_open_streams_are_limited_per_tenant_across_processes(stack: Stack):
    stack.set_limits("streamer", "--streams", "2")
    async with httpx.AsyncClient(timeout=20) as c:
        url1, url2 = (p.url for p in stack.apis)
        sid = (await c.post(f"{url1}/sessions", json={}, headers=auth("streamer"))).json()["id"]
        headers = {**auth("streamer"), "Accept": "text/event-stream"}
        async with c.stream("GET", f"{url1}/sessions/{sid}/events", headers=headers) as one:
            assert one.status_code == 200
            async with c.stream("GET", f"{url2}/sessions/{sid}/events", headers=headers) as two:
                assert two.status_code == 200
                third = await c.get(f"{url2}/sessions/{sid}/events", headers=headers)
                err = third.json()["error"]
                assert (
                    third.status_code == 429
                    and err["code"] == "rate_limited"
                    and err["details"] == {"limit": "streams", "max": 2}
                )
                other = (await c.post(f"{url2}/sessions", json={}, headers=auth("quiet"))).json()["id"]
                async with c.stream(
                    "GET", f"{url2}/sessions/{other}/events", headers={**auth("quiet"), "Accept": "text/event-stream"}
                ) as q:
                    assert q.status_code == 200  # another tenant's streams are its own
        for _ in range(50):  # closed streams give their slots back
            async with c.stream("GET", f"{url2}/sessions/{sid}/events", headers=headers) as again:
                if again.status_code == 200:
                    break
            await asyncio.sleep(0.05)
        assert again.status_code == 200


async def test_a_process_sheds_work_beyond_its_in_flight_bound_and_keeps_every_acknowledged_write(
    stack: Stack, tmp_path
):
    shedding = ParleyProcess(
        "api", stack.redis.url, tmp_path, {"PARLEY_API_KEYS": KEYS, "PARLEY_MAX_INFLIGHT": "2"}
    ).start()
    try:
        async with httpx.AsyncClient(base_url=shedding.url, timeout=20, limits=httpx.Limits(max_connections=100)) as c:
            sid = (await c.post("/sessions", json={}, headers=auth("crowd"))).json()["id"]
            answers = await asyncio.gather(
                *(
                    c.post(
                        f"/sessions/{sid}/messages", json={"role": "user", "content": f"m{i}"}, headers=auth("crowd")
                    )
                    for i in range(100)
                )
            )
            statuses = Counter(r.status_code for r in answers)
            assert set(statuses) == {201, 503} and statuses[503] > 0, statuses
            for r in answers:
                if r.status_code == 503:
                    assert r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"] == "1"
            assert (await c.get("/health")).status_code == 200  # never shed
            acked = {r.json()["id"] for r in answers if r.status_code == 201}
            stored = [
                m["id"]
                for m in (
                    await c.get(f"/sessions/{sid}/messages", params={"limit": 1000}, headers=auth("crowd"))
                ).json()["items"]
            ]
        assert len(stored) == len(acked) and set(stored) == acked  # refused requests wrote nothing
    finally:
        shedding.stop()


async def test_the_in_flight_limit_falls_when_requests_queue_and_what_it_admits_is_kept(stack: Stack, tmp_path):
    """`PARLEY_MAX_INFLIGHT` is only the ceiling: once requests are seen to queue, the process admits fewer at once
    (down to `PARLEY_MIN_INFLIGHT`) and sheds the rest with 503 `overloaded`, so the served keep their latency."""
    env = {"PARLEY_API_KEYS": KEYS, "PARLEY_MAX_INFLIGHT": "64", "PARLEY_MIN_INFLIGHT": "4"}
    adaptive = ParleyProcess("api", stack.redis.url, tmp_path, env).start()

    def limit(text: str) -> float:
        return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("parley_inflight_limit")))

    try:
        async with httpx.AsyncClient(base_url=adaptive.url, timeout=20, limits=httpx.Limits(max_connections=200)) as c:
            sid = (await c.post("/sessions", json={}, headers=auth("crowd"))).json()["id"]
            for i in range(60):  # one at a time: how fast this process serves a write when nothing queues
                await c.post(
                    f"/sessions/{sid}/messages", json={"role": "user", "content": f"w{i}"}, headers=auth("crowd")
                )
            assert limit((await c.get("/metrics")).text) == 64
            answers: list[tuple[int, dict]] = []
            lowest = 64.0
            for round_ in range(6):  # bursts of 150 at once: far more than one core serves without queueing
                answers += await _burst(
                    adaptive.url,
                    [
                        _post(
                            adaptive.url,
                            f"/sessions/{sid}/messages",
                            {"role": "user", "content": f"b{round_}-{i}"},
                            TENANTS["crowd"],
                        )
                        for i in range(150)
                    ],
                )
                lowest = min(lowest, limit((await c.get("/metrics")).text))
            statuses = Counter(status for status, _ in answers)
            assert set(statuses) == {201, 503}, statuses
            assert {body["error"]["code"] for status, body in answers if status == 503} == {"overloaded"}
            assert lowest < 64, "the limit never fell below its ceiling"
            acked = {body["id"] for status, body in answers if status == 201}
            page = await c.get(f"/sessions/{sid}/messages", params={"limit": 1000}, headers=auth("crowd"))
            stored = {m["id"] for m in page.json()["items"] if m["content"].startswith("b")}
        assert stored == acked  # shed requests wrote nothing; every acknowledged one is kept
    finally:
        adaptive.stop()
