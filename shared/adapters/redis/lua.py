"""Calling Lua scripts by SHA, in pipelines too, without redis-py's per-pipeline SCRIPT EXISTS round trip."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError


class Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def queue(self, pipe: Any, keys: Sequence[str], args: Sequence[Any]) -> None:
        pipe.evalsha(self.sha, len(keys), *keys, *args)

    async def __call__(self, redis: Redis, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # not run at all, so a second try is safe
            await redis.script_load(self.source)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)


async def run_pipeline(redis: Redis, scripts: Sequence[Script], fill: Callable[[Any], None]) -> list[Any]:
    """Run an idempotent pipeline; if Redis lost the scripts (a restart), load them and run it again."""
    for attempt in (0, 1):
        pipe = redis.pipeline(transaction=False)
        fill(pipe)
        results = await pipe.execute(raise_on_error=False)
        if not any(isinstance(r, NoScriptError) for r in results) or attempt:
            for r in results:
                if isinstance(r, Exception):
                    raise r
            return results
        for s in scripts:
            await redis.script_load(s.source)
    raise AssertionError("unreachable")


