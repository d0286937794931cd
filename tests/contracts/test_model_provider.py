"""The `ModelProvider` contract, on the offline model (the fake the use cases' tests run on) and on the
OpenAI-compatible adapter against a real OpenAI-protocol HTTP server (tests/model_server.py): a stream of deltas
ending in exactly one `Completion`, whose content the deltas add up to; a tool call when one is asked for."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared.adapters.llm.offline import OfflineModel
from shared.adapters.llm.openai_compat import OpenAICompatible
from shared.app.ports import Completion, Delta, ModelProvider, ModelRequest
from tests.model_server import MODEL_NAME, ModelServer


@pytest.fixture(scope="module")
def model_server() -> Iterator[ModelServer]:
    server = ModelServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["offline", "openai-compatible"])
def provider(request: pytest.FixtureRequest) -> ModelProvider:
    if request.param == "offline":
        return OfflineModel()
    server: ModelServer = request.getfixturevalue("model_server")
    return OpenAICompatible(server.base_url, "", MODEL_NAME, max_retries=0, timeout_s=10)


async def collect(provider: ModelProvider, request: ModelRequest) -> tuple[list[Delta], Completion]:
    items = [item async for item in provider.stream(request)]
    assert items and isinstance(items[-1], Completion)
    assert all(isinstance(i, Delta) for i in items[:-1])
    return [i for i in items[:-1] if isinstance(i, Delta)], items[-1]


async def test_the_deltas_add_up_to_the_one_completion(provider: ModelProvider) -> None:
    model = provider.models[0]
    request = ModelRequest(model=model, messages=[{"role": "user", "content": "hello there, model"}], max_tokens=100)
    deltas, completion = await collect(provider, request)
    assert completion.content and "hello there, model" in completion.content
    assert "".join(d.content or "" for d in deltas) == completion.content
    assert completion.finish_reason == "stop" and completion.tool_calls is None
    assert completion.model


async def test_a_tool_is_called_when_asked_for(provider: ModelProvider) -> None:
    tool = {"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object"}}}
    request = ModelRequest(
        model=provider.models[0],
        messages=[{"role": "user", "content": "call lookup_order 1234"}],
        max_tokens=100,
        tools=[tool],
    )
    _, completion = await collect(provider, request)
    assert completion.finish_reason == "tool_calls"
    assert completion.tool_calls is not None and [c.function.name for c in completion.tool_calls] == ["lookup_order"]
    assert "1234" in completion.tool_calls[0].function.arguments
