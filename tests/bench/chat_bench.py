"""Row P4: what Parley adds to a chat over calling the model directly, and chat jobs/s against a no-op arq job.

Run by the harness; these functions run in the harness process against processes it started.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import openai
from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker, func


async def direct_latency(model_url: str, n: int) -> dict[str, float]:
    """The openai SDK against the model server: a plain completion, and the first streamed chunk."""
    client = openai.AsyncOpenAI(base_url=model_url, api_key="none", max_retries=0)
    plain, first = [], []
    for _ in range(n):
        t = time.perf_counter()
        await client.chat.completions.create(model="zero", messages=[{"role": "user", "content": "hi"}], max_tokens=50)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        stream = await client.chat.completions.create(
            model="zero", messages=[{"role": "user", "content": "hi"}], max_tokens=50, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first.append(time.perf_counter() - t)
                break
        async for _ in stream:
            pass
    await client.close()
    return {"sync_p50_ms": statistics.median(plain) * 1000, "first_chunk_p50_ms": statistics.median(first) * 1000}


async def parley_latency(api_url: str, key: str, session_ids: list[str], n: int) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {key}"}
    plain, first, errors = [], [], 0
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=30) as c:
        for i in range(n):
            sid = session_ids[i % len(session_ids)]
            t = time.perf_counter()
            r = await c.post(
                f"/sessions/{sid}/chat", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
            )
            plain.append(time.perf_counter() - t)
            errors += r.status_code != 200
            t = time.perf_counter()
            async with c.stream(
                "POST",
                f"/sessions/{sid}/chat",
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50, "stream": True},
            ) as s:
                got = False
                async for line in s.aiter_lines():
                    if not got and line.startswith("data: {") and '"content"' in line:
                        first.append(time.perf_counter() - t)
                        got = True
                errors += s.status_code != 200 or not got
    return {
        "sync_p50_ms": statistics.median(plain) * 1000,
        "first_chunk_p50_ms": statistics.median(first) * 1000,
        "errors": errors,
    }


async def parley_jobs_per_second(
    api_url: str, key: str, session_ids: list[str], n: int, concurrency: int = 64
) -> dict[str, float]:
    """Synchronous chats from `concurrency` clients over many sessions: answered chats per second."""
    headers = {"Authorization": f"Bearer {key}"}
    errors = 0
    todo = list(range(n))

    async def client(c: httpx.AsyncClient, lane: int) -> None:
        nonlocal errors
        while todo:
            i = todo.pop()
            sid = session_ids[(lane + i * concurrency) % len(session_ids)]
            r = await c.post(
                f"/sessions/{sid}/chat", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
            )
            errors += r.status_code != 200

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=60, limits=limits) as c:
        t = time.perf_counter()
        await asyncio.gather(*(client(c, lane) for lane in range(concurrency)))
        elapsed = time.perf_counter() - t
    return {"jobs_per_s": n / elapsed, "errors": errors}


async def noop(_: dict) -> None:
    return None


async def arq_noop_jobs_per_second(redis_url: str, n: int, max_jobs: int, poll_delay: float) -> float:
    """The ceiling: a no-op arq job, enqueued n times, drained by one worker with Parley's settings."""
    settings = RedisSettings.from_dsn(redis_url)
    pool = await create_pool(settings)
    queue = "bench:noop"
    worker = Worker(
        functions=[func(noop, name="noop", keep_result=0)],
        redis_pool=pool,
        queue_name=queue,
        max_jobs=max_jobs,
        poll_delay=poll_delay,
        handle_signals=False,
        keep_result=0,
        burst=True,
    )
    for _ in range(n):
        await pool.enqueue_job("noop", _queue_name=queue)
    t = time.perf_counter()  # the drain only: a conservative (higher) ceiling
    await worker.main()
    elapsed = time.perf_counter() - t
    await pool.aclose()
    return n / elapsed
