"""Wake-ups in memory (the `Wakeups` port): an append wakes the session's waiters, a chunk write the job's.

The memory store calls every `MemoryWakeups` of the deployment (one per process, as each API process has its own
Redis reader) with the name that grew; a waiter is armed as soon as `watching` yields, so nothing written after
it misses it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from shared.adapters.memory.store import Memory
from shared.app.ports import WakeOn

__all__ = ["MemoryWakeups", "MemoryWatch"]


class MemoryWatch:
    """One waiter's flag. Clear it, read, and wait only if the read found nothing: a wake-up that arrives while
    reading is kept."""

    __slots__ = ("_event", "on")

    def __init__(self, on: WakeOn) -> None:
        self._event = asyncio.Event()
        self.on = on

    def clear(self) -> None:
        self._event.clear()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._event.wait(), max(timeout_s, 0.0))
            return True
        except TimeoutError:
            return False


class MemoryWakeups:
    def __init__(self, memory: Memory) -> None:
        self._watches: dict[str, set[MemoryWatch]] = {}
        memory.listeners.append(self._wake)

    def _wake(self, name: str, ended: bool) -> None:
        for watch in self._watches.get(name, ()):
            if ended or watch.on != "end":
                watch.set()

    @contextlib.asynccontextmanager
    async def watching(self, name: str, session_id: str, on: WakeOn) -> AsyncIterator[MemoryWatch]:
        watch = MemoryWatch(on)
        self._watches.setdefault(name, set()).add(watch)
        try:
            yield watch
        finally:
            watches = self._watches.get(name)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._watches[name]
