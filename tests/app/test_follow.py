"""The one follow loop of every stream and wait: a transient store error (every connection busy, the store briefly
out of reach) is waited out and the read tried again; any other error ends the stream."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.adapters.memory import Memory
from shared.adapters.memory.wakeups import MemoryWakeups
from shared.app.follow import follow


async def test_a_transient_error_is_waited_out_and_the_read_tried_again() -> None:
    calls = 0

    async def fetch() -> list[int]:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RedisConnectionError("No connection available.")
        return [calls]

    stream = follow(MemoryWakeups(Memory(4)), "appends", "s", "s", fetch, keepalive_s=30)
    assert await anext(stream) == [3]
    await stream.aclose()


async def test_any_other_error_ends_the_stream() -> None:
    async def fetch() -> list[int]:
        raise ValueError("a bug")

    with pytest.raises(ValueError):
        await anext(follow(MemoryWakeups(Memory(4)), "appends", "s", "s", fetch, keepalive_s=30))
