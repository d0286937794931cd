"""Any OpenAI-compatible server (OpenAI, vLLM, Ollama, LiteLLM, …): its streamed Chat Completions over aiohttp.

Not the official SDK: in profiles it spent ~3.8 ms of CPU per call building typed objects for every streamed
chunk, three quarters of a chat job's CPU against a fast model (docs/performance.md, P4cpu). Here a chunk is one
msgspec decode into the few fields Parley reads. And not httpx (which the SDK uses): against the zero-latency model
of the benchmark, httpx merely reading one streamed answer's lines cost 669 µs of CPU and 0.68 ms of wall time,
this client on aiohttp (whose HTTP parser is C), decoding them too, 200 µs and 0.26 ms (medians of 5 × 300 calls,
`python -m tests.bench.profile_chat --model-client`).

What the SDK did and this keeps: timeouts, connection errors, 408, 409, 429 and 5xx are retried `max_retries`
times with exponential backoff (0.5 s doubling, jittered, at most 8 s, or the server's `Retry-After` up to 60 s),
before anything was streamed; what still fails becomes a `ModelError` with a stable code. Leaving the stream early
(a cancelled chat) closes the connection, so the provider stops generating.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import msgspec
from aiohttp.http_exceptions import HttpProcessingError

from shared.adapters.llm import Completion, Delta, ModelError, ModelRequest
from shared.domain.wire import FunctionCall, ToolCall, Usage

__all__ = ["OpenAICompatible"]

RETRIED_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _Chunk(msgspec.Struct):
    """One `chat.completion.chunk`, or an error a server sends inside the stream."""

    model: str | None = None
    choices: list[_Choice] = msgspec.field(default_factory=list)
    usage: _Usage | None = None
    error: dict[str, Any] | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_encode = msgspec.json.Encoder().encode


class _Retry(Exception):
    """A failure worth another try; `error` is what the chat fails with once the tries are spent."""

    def __init__(self, error: ModelError, after_s: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.after_s = after_s


class OpenAICompatible:
    def __init__(
        self, base_url: str, api_key: str, default_model: str, max_retries: int = 3, timeout_s: float = 60.0
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        # each step has the deadline, not the whole answer: a long answer streams as long as chunks keep coming
        self.timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_connect=timeout_s, sock_read=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self.default_model = default_model
        self.max_retries = max_retries

    @property
    def models(self) -> list[str]:
        return [self.default_model]

    def _client(self) -> aiohttp.ClientSession:
        """The session, made on first use: aiohttp binds it to the running event loop."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self.headers,
                timeout=self.timeout,
                # an idle connection is dropped before the server would drop it (uvicorn-based servers, vLLM's
                # among them, after 5 s), so a call never races the server's close
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
                read_bufsize=1 << 20,  # a line (one chunk) may be up to twice this: a long tool call's arguments
                raise_for_status=False,
                trust_env=True,  # HTTP(S)_PROXY / NO_PROXY, as httpx and the SDK honour them
            )
        return self._session

    async def stream(self, request: ModelRequest) -> AsyncGenerator[Delta | Completion, None]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for name, value in (
            ("temperature", request.temperature),
            ("top_p", request.top_p),
            ("stop", request.stop),
            ("seed", request.seed),
            ("tools", request.tools),
            ("tool_choice", request.tool_choice if request.tools else None),
            ("response_format", request.response_format),
        ):
            if value is not None:
                body[name] = value
        payload = _encode(body)
        started = False
        client = self._client()
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                async with client.post(self.url, data=payload) as response:
                    if response.status >= 400:
                        raise await _refusal(response)
                    async for item in _items(response, request.model):
                        started = True
                        yield item
                    return
            except _Retry as retry:
                if last:
                    raise retry.error from None
                await asyncio.sleep(retry.after_s if retry.after_s is not None else _backoff(attempt))
            except TimeoutError as e:  # aiohttp's timeouts are TimeoutErrors (ServerTimeoutError, ConnectionTimeout…)
                if last or started:
                    raise ModelError("model_timeout", "the model provider timed out") from e
                await asyncio.sleep(_backoff(attempt))
            except aiohttp.ClientError as e:  # connection refused or reset, a stream cut short
                if last or started:
                    raise ModelError("model_unavailable", f"cannot reach the model provider: {e!r}") from e
                await asyncio.sleep(_backoff(attempt))
            except HttpProcessingError as e:  # a line of the stream longer than 2 MiB: the server's, not retried
                raise ModelError("model_error", f"the model provider sent an event Parley cannot read: {e!r}") from e

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


async def _items(response: aiohttp.ClientResponse, model: str) -> AsyncGenerator[Delta | Completion, None]:
    """The deltas of one streamed answer, then its `Completion`. Once a delta is out, nothing is retried: a
    failure now fails the chat (the caller cannot take back what it relayed)."""
    content: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    finish, usage, done = "stop", None, False
    async for line in response.content:
        # read to the end of the body even after [DONE]: a response left unread closes its connection, and the
        # next call would open (and, to a provider, TLS-handshake) a new one
        if done or not line.startswith(b"data:"):
            continue  # comments, `event:` and `id:` fields, blank lines between events
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            continue
        try:
            chunk = _decode_chunk(data)
        except msgspec.DecodeError as e:
            text = data[:200].decode("utf-8", "replace")
            raise ModelError("model_error", f"the model provider sent a chunk that is not JSON: {text}") from e
        if chunk.error is not None:
            raise ModelError("model_error", f"the model provider failed: {chunk.error.get('message', chunk.error)}")
        model = chunk.model or model
        if chunk.usage is not None:
            u = chunk.usage
            usage = Usage(
                prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens
            )
        for choice in chunk.choices:
            d = choice.delta
            if d.content:
                content.append(d.content)
                yield Delta(content=d.content)
            if d.tool_calls:
                raw = [_without_nulls(tc) for tc in d.tool_calls]
                for tc in raw:
                    slot = calls.setdefault(tc.get("index", 0), {"id": "", "name": "", "arguments": ""})
                    slot["id"] = tc.get("id") or slot["id"]
                    fn = tc.get("function", {})
                    slot["name"] += fn.get("name", "")
                    slot["arguments"] += fn.get("arguments", "")
                yield Delta(tool_calls=raw)
            if choice.finish_reason:
                finish = choice.finish_reason
    tool_calls = [
        ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"]))
        for _, c in sorted(calls.items())
    ] or None
    yield Completion(
        content="".join(content) if content or not tool_calls else None,
        tool_calls=tool_calls,
        finish_reason=finish,
        model=model,
        usage=usage,
    )


async def _refusal(response: aiohttp.ClientResponse) -> Exception:
    """The error an answer >= 400 stands for: a `_Retry` where another try may succeed, else the `ModelError`."""
    raw = await response.read()
    try:
        message = str(msgspec.json.decode(raw)["error"]["message"])
    except (msgspec.DecodeError, KeyError, TypeError):
        message = raw[:200].decode("utf-8", "replace") or (response.reason or "")
    status = response.status
    if status == 429:
        error = ModelError("model_rate_limited", f"the model provider kept answering 429: {message}")
    else:
        code = "model_unavailable" if status >= 500 else "model_error"
        error = ModelError(code, f"the model provider answered {status}: {message}")
    if status not in RETRIED_STATUSES:
        return error
    return _Retry(error, _retry_after(response.headers.get("Retry-After")))


def _retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 < seconds <= 60 else None


def _backoff(attempt: int) -> float:
    return min(0.5 * 2**attempt, 8.0) * (1 - 0.25 * random.random())


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value
