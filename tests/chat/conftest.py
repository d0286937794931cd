"""Fixtures of the chat tests: the OpenAI-compatible model server, and Parley stacks pointed at it.

A stack is a redis-server of its own, one `parley api` and one or more `parley worker` processes,
all real processes on loopback ports. Each test module starts its own stacks (module scope), so
the other suites' flushes of the session-wide redis-server never touch them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from shared.adapters.redis.server import RedisServer
from tests.model_server import MODEL_NAME, ModelServer
from tests.support import ParleyProcess, wait_ready

MODEL_API_KEY = "model-secret"


@dataclass
class Stack:
    redis: RedisServer
    api: ParleyProcess
    workers: list[ParleyProcess]
    root: Path
    env: dict[str, str]
    others: list[ParleyProcess] = field(default_factory=list)

    @property
    def worker(self) -> ParleyProcess:
        return self.workers[-1]

    @property
    def url(self) -> str:
        return self.api.url

    def start_worker(self, extra_env: dict[str, str] | None = None) -> ParleyProcess:
        worker = ParleyProcess("worker", self.redis.url, self.root, {**self.env, **(extra_env or {})})
        self.workers.append(worker)
        worker.start()
        return worker

    def stop(self) -> None:
        for p in reversed([self.api, *self.workers, *self.others]):
            p.stop()
        self.redis.stop()


def model_env(server: ModelServer, **extra: str) -> dict[str, str]:
    """Environment of api and worker processes that use the test model server."""
    return {
        "PARLEY_MODEL_BASE_URL": server.base_url,
        "PARLEY_MODEL_API_KEY": MODEL_API_KEY,
        "PARLEY_MODEL": MODEL_NAME,
        "PARLEY_MODEL_MAX_RETRIES": "2",
        "PARLEY_MODEL_TIMEOUT_S": "10",
        "PARLEY_CHAT_WAIT_S": "30",
        **extra,
    }


@pytest.fixture(scope="module")
def model_server() -> Iterator[ModelServer]:
    """The module's OpenAI-compatible model server (a uvicorn thread on a free loopback port)."""
    server = ModelServer().start()
    yield server
    server.stop()


@pytest.fixture
def model(model_server: ModelServer) -> ModelServer:
    """The module's model server, reset: default behaviour, no requests recorded."""
    model_server.reset()
    return model_server


@pytest.fixture(scope="module")
def start_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Stack]]:
    """start_stack(name, env) → a running Stack (redis, api, worker), stopped at the module's end."""
    stacks: list[Stack] = []

    def _start(name: str, env: dict[str, str], workers: int = 1) -> Stack:
        root = tmp_path_factory.mktemp(name)
        redis = RedisServer(root / "redis").start()
        api = ParleyProcess("api", redis.url, root, env)
        stack = Stack(redis=redis, api=api, workers=[], root=root, env=env)
        stacks.append(stack)
        api.start()
        for _ in range(workers):
            stack.start_worker()
        wait_ready(api.url)
        return stack

    yield _start
    for s in reversed(stacks):
        s.stop()
