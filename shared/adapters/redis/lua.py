"""Calling Lua scripts by SHA, in pipelines too, without redis-py's per-pipeline SCRIPT EXISTS round trip.

Scripts live as `.lua` files in `lua/` (package data) and are read once by the registry in `scripts.py`. Each
file names its KEYS and ARGV as locals at the top; every key a script touches is in KEYS (Redis Cluster needs it,
and it keeps a script correct if keys move), but for a copy-on-write fork's parents' logs and heads, which
APPLY, READ_MESSAGES and READ_EVENTS find through the fork's head (`fp`) as they go: a fork's id is chosen in its
parent's partition, so those keys share the slot of the keys named. A script that reads a session's read models is given the keys of
the generation the caller believes live and answers `{'stale', g}` when the head says otherwise: the caller
remembers `g` (`Keys.generations`) and calls again with that generation's keys (`stale_generation`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from shared.adapters.redis.cluster import Client

__all__ = [
    "MAX_STALE",
    "Registry",
    "Script",
    "StaleGenerations",
    "call_live",
    "run_live",
    "run_pipeline",
    "stale_generation",
]

STALE = b"stale"


class Script:
    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def queue(self, pipe: Any, keys: Sequence[str], args: Sequence[Any]) -> None:
        """Queue the call on a pipeline. A raw EVALSHA: redis-py 5's cluster pipeline blocks its `evalsha` method
        but routes a raw EVALSHA by its first key like any keyed command."""
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    async def __call__(self, redis: Client, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # not run at all, so a second try is safe
            await redis.script_load(self.source)  # on a cluster: every primary
            return await redis.evalsha(self.sha, len(keys), *keys, *args)

    def __repr__(self) -> str:
        return f"Script({self.name!r}, {self.sha[:8]})"


class Registry:
    """Every script of the package, read from `lua/<name>.lua` once per process."""

    def __init__(self, package: str = __package__, folder: str = "lua") -> None:
        self._root = resources.files(package) / folder
        self.scripts: dict[str, Script] = {}

    def script(self, name: str) -> Script:
        if name not in self.scripts:
            self.scripts[name] = Script(name, (self._root / f"{name}.lua").read_text(encoding="utf-8"))
        return self.scripts[name]

    async def load_all(self, redis: Client) -> None:
        """SCRIPT LOAD each (on a cluster redis-py sends it to every primary), so pipelines can call by hash."""
        for s in list(self.scripts.values()):
            await redis.script_load(s.source)


def stale_generation(reply: Any) -> int | None:
    """The live generation a script answered `{'stale', g}` with, else None."""
    if isinstance(reply, list) and len(reply) == 2 and reply[0] == STALE:
        return int(reply[1])
    return None


async def run_pipeline(redis: Client, registry: Registry, fill: Callable[[Any], None]) -> list[Any]:
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
        await registry.load_all(redis)
    raise AssertionError("unreachable")


MAX_STALE = 5
"""Calls of one script for one session that may each find the generation switched; a rebuild switches a session
once per run, so more means something is wrong."""

Build = Callable[[int], tuple[Sequence[str], Sequence[Any]]]
"""The keys and arguments of a call for the read models of generation g."""


class StaleGenerations(RuntimeError):
    pass


async def call_live(redis: Client, script: Script, generations: Any, session_id: str, build: Build) -> Any:
    """Call `script` with the keys of the session's live generation (as last seen; again if a rebuild switched)."""
    for _ in range(MAX_STALE):
        reply = await script(redis, *build(generations[session_id]))
        live = stale_generation(reply)
        if live is None:
            return reply
        generations.saw(session_id, live)
    raise StaleGenerations(f"{script.name}: session {session_id}'s generation kept changing")


async def run_live(
    redis: Client, registry: Registry, generations: Any, calls: Sequence[tuple[Script, str, Build]]
) -> list[Any]:
    """`call_live` for many calls in one pipeline (a second one for those that found their generation stale)."""
    out: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for _ in range(MAX_STALE):
        if not todo:
            return out
        args = [(i, calls[i][2](generations[calls[i][1]])) for i in todo]
        replies = await run_pipeline(
            redis, registry, lambda pipe, args=args: [calls[i][0].queue(pipe, *ka) for i, ka in args]
        )
        again = []
        for (i, _), reply in zip(args, replies):
            live = stale_generation(reply)
            if live is None:
                out[i] = reply
            else:
                generations.saw(calls[i][1], live)
                again.append(i)
        todo = again
    if todo:
        raise StaleGenerations(f"{len(todo)} sessions' generations kept changing")
    return out
