"""The `ModelProvider` contract, on the offline model (the fake the use cases' tests run on) and on the
OpenAI-compatible adapter against a real OpenAI-protocol HTTP server (tests/model_server.py): a stream of deltas
ending in exactly one `Completion`, whose content the deltas add up to; a tool call when one is asked for."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from shared.adapters.llm.offline import OfflineModel
from shared.adapters.llm.openai_compat import OpenAICompatible
from shared.app.ports import Completion, Delta, ModelError, ModelProvider, ModelRequest
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


async def test_a_refused_request_is_retried_but_a_stream_cut_short_never_is(model_server: ModelServer) -> None:
    """The OpenAI-compatible adapter retries what failed before anything was streamed (a 503; a first chunk later
    than the timeout), and fails at once, without a second request, once deltas are out: a retry would relay them
    twice."""
    provider = OpenAICompatible(model_server.base_url, "", MODEL_NAME, max_retries=2, timeout_s=0.5)
    model_server.reset()
    try:
        model_server.control(fail_next=[503])
        ask = ModelRequest(model=MODEL_NAME, messages=[{"role": "user", "content": "retried please"}], max_tokens=50)
        _, completion = await collect(provider, ask)
        assert completion.content and "retried please" in completion.content
        assert [r["status"] for r in model_server.requests("retried please")] == [503, 200]

        model_server.control(chunk_delay_s=1.0)  # every chunk later than the read timeout: nothing streamed yet
        late = ModelRequest(model=MODEL_NAME, messages=[{"role": "user", "content": "late"}], max_tokens=50)
        with pytest.raises(ModelError) as failed:
            await collect(provider, late)
        assert failed.value.code == "model_timeout" and len(model_server.requests("late")) == 3
    finally:
        model_server.reset()
        await provider.aclose()

    requests = 0

    async def one_chunk_then_silence(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        requests += 1
        await reader.readuntil(b"\r\n\r\n")
        chunk = b'data: {"model":"m","choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()
        await asyncio.sleep(5)  # then nothing: the read times out mid-stream
        writer.close()

    server = await asyncio.start_server(one_chunk_then_silence, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    provider = OpenAICompatible(f"http://127.0.0.1:{port}/v1", "", "m", max_retries=2, timeout_s=0.5)
    got: list[Delta | Completion] = []
    try:
        with pytest.raises(ModelError) as failed:
            async for item in provider.stream(ModelRequest(model="m", messages=[], max_tokens=5)):
                got.append(item)
        assert failed.value.code == "model_timeout"
        assert got == [Delta(content="Hel")] and requests == 1
    finally:
        await provider.aclose()
        server.close()


async def test_an_event_too_long_to_read_fails_the_call_once_with_a_model_error() -> None:
    """One line of the stream past what the client reads (2 MiB) is the server's fault: a `model_error`, no retry."""
    requests = 0

    async def one_huge_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        requests += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        writer.write(b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * (3 << 20) + b'"}}]}\n\n')
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(one_huge_line, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    provider = OpenAICompatible(f"http://127.0.0.1:{port}/v1", "", "m", max_retries=2, timeout_s=5)
    try:
        with pytest.raises(ModelError) as failed:
            await collect(provider, ModelRequest(model="m", messages=[], max_tokens=5))
        assert failed.value.code == "model_error" and requests == 1
    finally:
        await provider.aclose()
        server.close()


async def test_calls_reuse_one_connection(model_server: ModelServer) -> None:
    """A finished answer's connection goes back to the pool (its body read to the end, past `[DONE]`): a call to a
    remote provider must not pay a new TCP and TLS handshake."""
    provider = OpenAICompatible(model_server.base_url, "", MODEL_NAME, max_retries=0, timeout_s=10)
    model_server.reset()
    try:
        for i in range(5):
            await collect(
                provider, ModelRequest(model=MODEL_NAME, messages=[{"role": "user", "content": f"{i}"}], max_tokens=20)
            )
        peers = [r["peer"] for r in model_server.requests()]  # the client's address and port, per request
        assert len(peers) == 5 and len(set(peers)) == 1, peers
    finally:
        await provider.aclose()
