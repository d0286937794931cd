"""Supervision of a process's long-running parts (projector, chat worker, wake-up listener, shared readers…).

A task that dies in an asyncio loop dies silently unless something awaits it, and a process whose projector died
but whose HTTP server still answers is the worst kind of broken: nothing restarts it. So every long-running part
runs under a `Supervisor`:

- a transient store error (connection refused or reset, timeout, Redis loading its AOF, a cluster failover) is
  retried with capped exponential backoff, forever; the part is *down* until it runs again;
- anything else is a bug or a broken deployment: it is logged once and `failed` is set, and the process's main
  loop exits non-zero so its supervisor (systemd, Kubernetes, compose) restarts it;
- `ready` is false while any part is down, so `/ready` (and the worker's readiness) says so.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    ReadOnlyError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.observability import metrics

T = TypeVar("T")

__all__ = ["TRANSIENT", "PartFailed", "Supervisor", "is_transient", "pool_exhausted", "until_available"]

TRANSIENT: tuple[type[BaseException], ...] = (
    RedisConnectionError,  # includes BusyLoadingError: Redis is loading its AOF
    RedisTimeoutError,
    BusyLoadingError,
    TryAgainError,
    ClusterDownError,  # includes MasterDownError: a failover is under way
    ClusterError,  # redirections did not settle (a resharding under way)
    SlotNotCoveredError,  # a cluster still being set up, or a slot's node lost
    ReadOnlyError,  # a replica promoted, or a failover in progress
    OSError,
    TimeoutError,
)
"""Errors that mean "the store is not reachable right now", never "the code is wrong"."""


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT)


def pool_exhausted(exc: BaseException) -> bool:
    """True for redis-py's "no free connection within the pool's wait" (a cluster node's pool: full at once): the
    process is overloaded, the store is fine."""
    if type(exc).__name__ == "MaxConnectionsError":
        return True
    return type(exc).__name__ == "ConnectionError" and str(exc) == "No connection available."


class PartFailed(Exception):
    """A supervised part died of an error that retrying cannot fix; the process must exit and be restarted."""

    def __init__(self, part: str, cause: BaseException) -> None:
        super().__init__(f"part {part!r} failed: {cause!r}")
        self.part = part
        self.cause = cause


class _Part:
    __slots__ = ("name", "task", "up", "since", "errors")

    def __init__(self, name: str) -> None:
        self.name = name
        self.task: asyncio.Task[None] | None = None
        self.up = False
        self.since = time.monotonic()
        self.errors = 0


class Supervisor:
    def __init__(
        self,
        logger: logging.Logger | None = None,
        backoff_min_s: float = 0.05,
        backoff_max_s: float = 2.0,
        on_failure: Callable[[PartFailed], None] | None = None,
    ) -> None:
        self.log = logger or logging.getLogger("parley.supervisor")
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.on_failure = on_failure
        self._parts: dict[str, _Part] = {}
        self._failed: asyncio.Future[None] | None = None

    # -- running parts -------------------------------------------------------------------
    def run(self, name: str, body: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run `body()` as the part `name` until it returns or is cancelled; restart it after transient errors."""
        running = self._parts[name].task if name in self._parts else None
        if running is not None and not running.done():
            raise RuntimeError(f"part {name!r} is already running")
        part = self._parts[name] = _Part(name)
        part.task = asyncio.create_task(self._loop(part, body), name=f"part:{name}")
        return part.task

    async def stop(self, name: str) -> None:
        """Cancel a part and forget it (a part that is no longer wanted, e.g. a reader with no subscribers)."""
        part = self._parts.pop(name, None)
        if part is not None and part.task is not None:
            part.task.cancel()
            await asyncio.gather(part.task, return_exceptions=True)

    async def stop_all(self) -> None:
        for name in list(self._parts):
            await self.stop(name)

    async def _loop(self, part: _Part, body: Callable[[], Awaitable[None]]) -> None:
        backoff = self.backoff_min_s
        while True:
            part.up, part.since = True, time.monotonic()
            try:
                await body()
                part.up = False
                if self._parts.get(part.name) is part:  # done for good: no longer a part of the process
                    del self._parts[part.name]
                return
            except asyncio.CancelledError:
                part.up = False
                raise
            except BaseException as e:
                part.up, part.errors = False, part.errors + 1
                if not is_transient(e):
                    self._fail(part.name, e)
                    return
                metrics.redis_error(e)
                if time.monotonic() - part.since > 10 * self.backoff_max_s:
                    backoff = self.backoff_min_s  # it ran fine for a while: this is a new outage
                self.log.warning(
                    "%s: store unavailable (%s: %s); retrying in %.2fs", part.name, type(e).__name__, e, backoff
                )
                await asyncio.sleep(backoff * (0.5 + random.random() / 2))
                backoff = min(backoff * 2, self.backoff_max_s)

    def _fail(self, name: str, exc: BaseException) -> None:
        self.log.critical("%s failed; the process stops so that its supervisor restarts it", name, exc_info=exc)
        failure = PartFailed(name, exc)
        future = self._failure_future()
        if not future.done():
            future.set_exception(failure)
        if self.on_failure is not None:
            self.on_failure(failure)

    def _failure_future(self) -> asyncio.Future[None]:
        if self._failed is None:
            self._failed = asyncio.get_running_loop().create_future()
        return self._failed

    # -- state -----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Every part is running (none is waiting out a backoff, none failed)."""
        return not (self._failed is not None and self._failed.done()) and all(p.up for p in self._parts.values())

    def status(self) -> dict[str, bool]:
        return {name: p.up for name, p in sorted(self._parts.items())}

    async def failed(self) -> None:
        """Wait until a part fails for good; raises `PartFailed`."""
        await self._failure_future()

    def failure(self) -> PartFailed | None:
        future = self._failed
        if future is None or not future.done():
            return None
        exc = future.exception()
        return exc if isinstance(exc, PartFailed) else None


async def until_available(
    step: Callable[[], Awaitable[T]], what: str, logger: logging.Logger | None = None, backoff_max_s: float = 2.0
) -> T:
    """Run a start-up step, retrying transient store errors with backoff until the store answers (a process that
    starts while Redis loads its AOF waits for it instead of dying)."""
    log = logger or logging.getLogger("parley.supervisor")
    backoff = 0.05
    while True:
        try:
            return await step()
        except TRANSIENT as e:
            log.warning("waiting for %s (%s: %s); retrying in %.2fs", what, type(e).__name__, e, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, backoff_max_s)
