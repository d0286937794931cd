"""Fixtures of the client tests: one Parley stack (redis-server, `parley api`, `parley worker`, real processes)
answering through the OpenAI-protocol test model server, with CORS open to the origin of a test page server;
the Node clients, and a proxy to cut their connections.

One stack serves the whole directory (each test makes its own sessions), so the set stays well under two minutes.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.adapters.redis.server import RedisServer, free_port
from tests.chat.conftest import Stack, model_env
from tests.clients.node import HERE, NodeScript, chromium_missing, node_missing, unavailable
from tests.clients.proxy import CutProxy
from tests.model_server import ModelServer
from tests.support import ParleyProcess, wait_ready


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def page_server() -> Iterator[str]:
    """A static HTTP server of tests/clients/page on its own port: a browser origin other than the API's."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), functools.partial(_Quiet, directory=str(HERE / "page")))
    threading.Thread(target=server.serve_forever, daemon=True, name="page-server").start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def clients_model() -> Iterator[ModelServer]:
    server = ModelServer().start()
    yield server
    server.stop()


@pytest.fixture
def model(clients_model: ModelServer) -> ModelServer:
    """The model server, reset: default behaviour, no requests recorded."""
    clients_model.reset()
    return clients_model


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, clients_model: ModelServer, page_server: str) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("clients")
    env = model_env(clients_model, PARLEY_CORS_ORIGINS=page_server)
    redis = RedisServer(root / "redis").start()
    api = ParleyProcess("api", redis.url, root, env)
    s = Stack(redis=redis, api=api, workers=[], root=root, env=env)
    try:
        api.start()
        s.start_worker()
        wait_ready(api.url)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def node() -> None:
    """Node 20+ and tests/clients/node_modules, or a skip (a failure under PARLEY_REQUIRE_CLIENTS=1)."""
    reason = node_missing()
    if reason:
        unavailable(reason)


@pytest.fixture(scope="session")
def chromium(node: None) -> None:
    reason = chromium_missing()
    if reason:
        unavailable(reason)


@pytest.fixture
def run_node(node: None, tmp_path: Path) -> Iterator[Callable[..., NodeScript]]:
    """run_node("script.mjs", **args) → a running client script, killed at the test's end if still running."""
    scripts: list[NodeScript] = []

    def _run(script: str, **args: Any) -> NodeScript:
        s = NodeScript(script, args, tmp_path)
        scripts.append(s)
        return s

    yield _run
    for s in scripts:
        s.stop()


@pytest.fixture
def proxy(stack: Stack) -> Iterator[CutProxy]:
    p = CutProxy(stack.api.port)
    yield p
    p.close()


@pytest.fixture
def c(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        yield client
