"""The use cases' tests: a whole Parley on the memory adapters (`bootstrap.in_memory`), no Redis, no HTTP.

Reads catch the read models up themselves at once (`read_assist_s=0`), so a test needs no projector unless it tests
projection; `settle` plays the projector and the chat worker until nothing is left to do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import pytest

from shared import bootstrap
from shared.adapters.memory import MemoryChatWorker
from shared.app.ports import Feed, ModelProvider
from shared.bootstrap import Parley
from shared.config import Settings

PARTITIONS = 4


def settings(**overrides: object) -> Settings:
    base: dict[str, object] = {"partitions": PARTITIONS, "read_assist_s": 0.0, "read_timeout_s": 5.0}
    return Settings.from_env({}, **{**base, **overrides})


@pytest.fixture
async def parley() -> AsyncIterator[Parley]:
    p = await bootstrap.in_memory(settings())
    yield p
    await p.close()


class Deployment:
    """A Parley with its projector's feed and a chat worker, run step by step."""

    def __init__(self, parley: Parley, provider: ModelProvider | None = None) -> None:
        self.parley = parley
        self.feed: Feed = parley.projector_feed("test-projector")
        worker = parley.make_chat_worker(parley.chat_runner(provider))
        assert isinstance(worker, MemoryChatWorker)
        self.worker = worker

    async def project(self) -> int:
        """Project every session the feed names (the projector's loop, run to the end)."""
        await self.feed.ensure_groups()
        handled = 0
        while entries := await self.feed.read(256, None):
            await self.parley.projection.handle(entries)
            handled += len(entries)
        return handled

    async def settle(self) -> None:
        """Project and run chat jobs until neither has anything left."""
        while (await self.project()) + (await self.worker.run_queued()):
            pass


def ids(items: Iterable[bytes]) -> list[str]:
    import msgspec

    return [msgspec.json.decode(i)["id"] for i in items]
