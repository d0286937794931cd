"""The supervisor: transient store errors are retried for ever, anything else stops the process (never silently)."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

from shared.supervise import PartFailed, Supervisor, until_available


async def test_a_part_that_meets_transient_errors_runs_again_and_is_down_meanwhile():
    supervisor = Supervisor(backoff_min_s=0.01, backoff_max_s=0.02)
    attempts: list[int] = []
    release = asyncio.Event()
    down_seen: list[bool] = []

    async def body() -> None:
        attempts.append(len(attempts))
        if len(attempts) <= 3:
            down_seen.append(supervisor.ready)
            raise [BusyLoadingError, ConnectionError, TimeoutError][len(attempts) - 1]("not now")
        await release.wait()

    task = supervisor.run("projector", body)
    while len(attempts) < 4:
        await asyncio.sleep(0.005)
    assert supervisor.ready and supervisor.status() == {"projector": True}
    release.set()
    await task
    assert supervisor.failure() is None and supervisor.status() == {}  # done for good: no longer a part


async def test_a_part_that_raises_anything_else_fails_the_process_loudly(caplog):
    failures: list[PartFailed] = []
    supervisor = Supervisor(on_failure=failures.append)

    async def body() -> None:
        raise KeyError("a bug")

    supervisor.run("projector", body)
    with pytest.raises(PartFailed) as raised:
        await asyncio.wait_for(supervisor.failed(), 2)
    assert raised.value.part == "projector" and isinstance(raised.value.cause, KeyError)
    assert failures == [raised.value] and not supervisor.ready
    assert "projector failed" in caplog.text and "KeyError" in caplog.text


async def test_a_part_is_down_while_it_waits_out_a_backoff():
    supervisor = Supervisor(backoff_min_s=0.2, backoff_max_s=0.2)

    async def body() -> None:
        raise ConnectionError("refused")

    supervisor.run("reader", body)
    await asyncio.sleep(0.05)
    assert not supervisor.ready and supervisor.status() == {"reader": False}
    await supervisor.stop_all()
    assert supervisor.ready


async def test_start_up_waits_for_a_store_that_is_loading():
    calls = []

    async def step() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise BusyLoadingError("Redis is loading the dataset in memory")
        return "ok"

    assert await until_available(step, "the store") == "ok" and len(calls) == 3
