"""Any OpenAI-compatible server (OpenAI, vLLM, Ollama, LiteLLM, …) through the official `openai` SDK.

The SDK retries timeouts, connection errors, 429 and 5xx with exponential backoff
(`max_retries`); what still fails becomes a `ModelError` with a stable code.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import openai

from shared.adapters.llm import Completion, Delta, ModelError, ModelRequest
from shared.domain.wire import FunctionCall, ToolCall, Usage


class OpenAICompatible:
    def __init__(
        self, base_url: str, api_key: str, default_model: str, max_retries: int = 3, timeout_s: float = 60.0
    ) -> None:
        self.client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key or "none", max_retries=max_retries, timeout=timeout_s
        )
        self.default_model = default_model

    @property
    def models(self) -> list[str]:
        return [self.default_model]

    async def stream(self, request: ModelRequest) -> AsyncGenerator[Delta | Completion, None]:
        optional = {
            k: v
            for k, v in (
                ("temperature", request.temperature),
                ("top_p", request.top_p),
                ("stop", request.stop),
                ("seed", request.seed),
                ("tools", request.tools),
                ("tool_choice", request.tool_choice if request.tools else None),
                ("response_format", request.response_format),
            )
            if v is not None
        }
        content: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        finish, usage, model = "stop", None, request.model
        try:
            # The prompt goes in `extra_body`: the SDK sends it as is, instead of walking every message
            # through its type-driven transform, which cost ~25 ms on a long conversation in profiles.
            stream = await self.client.chat.completions.create(
                model=request.model,
                messages=[],
                max_tokens=request.max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"messages": request.messages, **optional},
            )
            async with stream:  # leaving early (a cancelled chat) closes the connection, so the provider stops
                async for chunk in stream:
                    model = chunk.model or model
                    if chunk.usage is not None:
                        u = chunk.usage
                        usage = Usage(
                            prompt_tokens=u.prompt_tokens,
                            completion_tokens=u.completion_tokens,
                            total_tokens=u.total_tokens,
                        )
                    for choice in chunk.choices:
                        d = choice.delta
                        if d.content:
                            content.append(d.content)
                            yield Delta(content=d.content)
                        if d.tool_calls:
                            raw = [tc.model_dump(exclude_none=True) for tc in d.tool_calls]
                            for tc in raw:
                                slot = calls.setdefault(tc.get("index", 0), {"id": "", "name": "", "arguments": ""})
                                slot["id"] = tc.get("id") or slot["id"]
                                fn = tc.get("function", {})
                                slot["name"] += fn.get("name", "")
                                slot["arguments"] += fn.get("arguments", "")
                            yield Delta(tool_calls=raw)
                        if choice.finish_reason:
                            finish = choice.finish_reason
        except openai.RateLimitError as e:
            raise ModelError("model_rate_limited", f"the model provider kept answering 429: {e.message}") from e
        except openai.APITimeoutError as e:
            raise ModelError("model_timeout", "the model provider timed out") from e
        except openai.APIConnectionError as e:
            raise ModelError("model_unavailable", f"cannot reach the model provider: {e}") from e
        except openai.APIStatusError as e:
            code = "model_unavailable" if e.status_code >= 500 else "model_error"
            raise ModelError(code, f"the model provider answered {e.status_code}: {e.message}") from e
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
