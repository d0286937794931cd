"""The offline model: deterministic, no network, so `parley dev` and the walk-through work anywhere.

It echoes the last user message ("You said: …"), reports a tool's result, or calls a tool when
asked ("call lookup_order 1234" with a tool `lookup_order` offered, or a forced `tool_choice`).
It streams word by word and honours `max_tokens` with the real tokenizer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncGenerator
from typing import Any

from shared.adapters.llm import Completion, Delta, ModelRequest
from shared.adapters.tokenizer import Tokenizer
from shared.domain.wire import FunctionCall, ToolCall

NAME = "parley-offline"


class OfflineModel:
    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    @property
    def models(self) -> list[str]:
        return [NAME]

    async def aclose(self) -> None:
        """Nothing to release (the OpenAI-compatible provider closes its connections)."""

    async def stream(self, request: ModelRequest) -> AsyncGenerator[Delta | Completion, None]:
        """Usage is left to the caller, which counts the prompt it built with the same tokenizer."""
        tokenizer = Tokenizer.for_model(request.model)
        call = _tool_call(request)
        if call is not None:
            yield Delta(
                tool_calls=[
                    {
                        "index": 0,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": call.function.arguments},
                    }
                ]
            )
            yield Completion(content=None, tool_calls=[call], finish_reason="tool_calls", model=request.model)
            return
        text, finish = _truncate(_answer(request), request.max_tokens, tokenizer)
        words = text.split(" ")
        for i in range(0, len(words), 2):
            piece = " ".join(words[i : i + 2]) + (" " if i + 2 < len(words) else "")
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            yield Delta(content=piece)
        yield Completion(content=text, tool_calls=None, finish_reason=finish, model=request.model)


def _answer(request: ModelRequest) -> str:
    last = request.messages[-1] if request.messages else {}
    if last.get("role") == "tool":
        return f"The tool returned: {_text(last.get('content'))}"
    for m in reversed(request.messages):
        if m.get("role") == "user":
            return f"You said: {_text(m.get('content'))}"
    return "Hello from Parley's offline model."


def _tool_call(request: ModelRequest) -> ToolCall | None:
    tools = {t["function"]["name"] for t in request.tools or []}
    if not tools or request.tool_choice == "none" or not request.messages or request.messages[-1].get("role") != "user":
        return None
    text = _text(request.messages[-1].get("content"))
    words = text.split()
    name, args = None, ""
    if isinstance(request.tool_choice, dict):
        name = request.tool_choice.get("function", {}).get("name")
    for i, w in enumerate(words[:-1]):
        if w.lower() in ("call", "use") and words[i + 1] in tools:
            name, args = words[i + 1], " ".join(words[i + 2 :])
            break
    if name is None and request.tool_choice == "required":
        name = sorted(tools)[0]
    if name is None:
        return None
    digest = hashlib.sha256(json.dumps(request.messages, sort_keys=True).encode()).hexdigest()[:20]
    return ToolCall(id=f"call_{digest}", function=FunctionCall(name=name, arguments=json.dumps({"input": args})))


def _truncate(text: str, max_tokens: int, tokenizer: Tokenizer) -> tuple[str, str]:
    if tokenizer.count(text) <= max_tokens:
        return text, "stop"
    words = text.split(" ")
    lo, hi = 0, len(words)
    while lo < hi:  # the most words that fit
        mid = (lo + hi + 1) // 2
        if tokenizer.count(" ".join(words[:mid])) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo]), "length"


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
