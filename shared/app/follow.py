"""Following something that grows — a session's log, a chat job's chunks — for every stream and wait.

One loop serves them all: read what is new with an ordinary command; if nothing is, wait for the process's shared
reader to say the thing grew (the `Wakeups` port), re-checking every few seconds regardless. So an open stream or a
waiting synchronous chat holds no store connection while it waits, and a wake-up lost while the store restarted
only delays it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

from shared.app.ports import WakeOn, Wakeups
from shared.supervise import is_transient

__all__ = ["RECHECK_S", "follow"]

T = TypeVar("T")
RECHECK_S = 2.0
"""Even without a wake-up, look again this often."""
RETRY_S = 0.1
"""After a transient store error, read again this soon."""


async def follow(
    wakeups: Wakeups,
    on: WakeOn,
    name: str,
    session_id: str,
    fetch: Callable[[], Awaitable[list[T]]],
    keepalive_s: float,
    deadline: float | None = None,
) -> AsyncGenerator[list[T], None]:
    """Yield each non-empty batch `fetch()` answers as it appears; an empty batch after `keepalive_s` of quiet
    (time for a keep-alive comment). Ends at `deadline` (monotonic), or when the caller stops iterating.

    `fetch` moves its own cursor; `on` and `name` say what wakes it (`appends` to the session `name`, a job
    `name`'s `chunks`, or only its `end`)."""
    async with wakeups.watching(name, session_id, on) as watch:
        quiet_since = time.monotonic()
        while True:
            watch.clear()  # before the read: a wake-up that arrives while reading is kept
            try:
                batch = await fetch()
            except Exception as e:
                # the store briefly out of reach, or every connection busy (hundreds of streams woken at once):
                # an open stream waits and reads again instead of dying mid-body
                if not is_transient(e) or (deadline is not None and time.monotonic() >= deadline):
                    raise
                await asyncio.sleep(RETRY_S)
                batch = None
            now = time.monotonic()
            if batch is None:
                if now - quiet_since >= keepalive_s:
                    quiet_since = now
                    yield []
                continue
            if batch:
                quiet_since = now
                yield batch
                continue
            if deadline is not None and now >= deadline:
                return
            if now - quiet_since >= keepalive_s:
                quiet_since = now
                yield []
                continue
            wait = min(RECHECK_S, keepalive_s - (now - quiet_since))
            if deadline is not None:
                wait = min(wait, deadline - now)
            await watch.wait(wait)
