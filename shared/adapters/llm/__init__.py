"""Model providers: one `ModelProvider` protocol, an OpenAI-compatible adapter and an offline model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from msgspec import Struct

from shared.domain.wire import ToolCall, Usage


class ModelRequest(Struct, kw_only=True):
    model: str
    messages: list[dict[str, Any]]
    """Chat Completions `messages`, as OpenAI's API takes them."""
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class Delta(Struct, kw_only=True, omit_defaults=True):
    """One streamed piece of the answer, in OpenAI's delta shape."""

    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class Completion(Struct, kw_only=True):
    """The whole answer; a provider's stream ends with exactly one."""

    content: str | None
    tool_calls: list[ToolCall] | None
    finish_reason: str
    model: str
    usage: Usage | None = None


class ModelError(Exception):
    """The provider failed for good (after its retries). `code` becomes the chat job's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ModelProvider(Protocol):
    def stream(self, request: ModelRequest) -> AsyncIterator[Delta | Completion]: ...

    @property
    def models(self) -> list[str]:
        """The model names this deployment serves by default."""
        ...
