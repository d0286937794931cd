"""OpenAI Chat Completions on the wire, and the rule that stores each message of a resent conversation once.

`POST /sessions/{id}/chat/completions` takes and answers these types exactly as the official `openai` SDK
sends and parses them. OpenAI clients send the whole conversation on every call; `plan_turns` decides which of
the request's messages are new to the session. Pure: no I/O, so it is unit-tested on its own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from shared.domain.wire import (
    ContentPart,
    FunctionCall,
    FunctionDef,
    ImagePart,
    ImageUrl,
    Int64,
    MessageCreate,
    ShortText,
    TextPart,
    Tool,
    ToolCall,
    Usage,
    Wire,
)

# -- the request ------------------------------------------------------------------------------------------------
# Inside messages, content parts and tool calls the endpoint is lenient, as OpenAI is: SDK helpers echo back what
# they parsed (`parsed`, `parsed_arguments`, a leftover stream `index`, `refusal`, `annotations`, `audio`…) and a
# future SDK will add more. Such fields are accepted and not stored. The top level stays a known set (README).
OpenAIRole = Literal["system", "developer", "user", "assistant", "tool"]


class Lenient(Struct, kw_only=True):
    """Base of the inbound OpenAI types inside a request: unknown fields are ignored, never stored."""


class OpenAIImageUrl(Lenient, kw_only=True):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class OpenAITextPart(Lenient, kw_only=True, tag_field="type", tag="text"):
    text: str


class OpenAIImagePart(Lenient, kw_only=True, tag_field="type", tag="image_url"):
    image_url: OpenAIImageUrl


class InputAudioPart(Lenient, kw_only=True, tag_field="type", tag="input_audio"):
    input_audio: dict[str, Any]


class FilePart(Lenient, kw_only=True, tag_field="type", tag="file"):
    file: dict[str, Any]


class RefusalPart(Lenient, kw_only=True, tag_field="type", tag="refusal"):
    refusal: str


OpenAIContentPart = OpenAITextPart | OpenAIImagePart | InputAudioPart | FilePart | RefusalPart
"""What the protocol allows in `content`. Parley stores `text` and `image_url` parts; `refusal` parts (an
assistant message echoed back) are dropped like the `refusal` field; `input_audio` and `file` parts → 422."""


class OpenAIFunctionCall(Lenient, kw_only=True):
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    arguments: str


class OpenAIToolCall(Lenient, kw_only=True):
    id: Annotated[str, Meta(min_length=1, max_length=128)]
    type: Literal["function"] = "function"
    function: OpenAIFunctionCall


class OpenAIMessage(Lenient, kw_only=True):
    """Any message of a Chat Completions request (system, developer, user, assistant, tool)."""

    role: OpenAIRole
    content: str | Annotated[list[OpenAIContentPart], Meta(min_length=1, max_length=64)] | None = None
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    tool_calls: Annotated[list[OpenAIToolCall], Meta(max_length=64)] | None = None
    tool_call_id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None


class OpenAIFunctionDef(Wire):
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: Annotated[str, Meta(max_length=4096)] | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    """Accepted; not forwarded (Parley's tools have no `strict`)."""


class OpenAITool(Wire):
    type: Literal["function"]
    function: OpenAIFunctionDef


class StreamOptions(Wire):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None
    """Accepted and ignored (Parley adds no obfuscation field)."""


class ChatCompletionRequest(Wire):
    """OpenAI's `POST /chat/completions` body. Fields Parley cannot honour are accepted and ignored (see README)."""

    messages: Annotated[list[OpenAIMessage], Meta(min_length=1, max_length=100_000)]
    model: ShortText | None = None
    """Any name; passed to the provider. Absent: the deployment's default model."""
    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    """Wins over `max_tokens` when both are set."""
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    seed: Int64 | None = None
    tools: Annotated[list[OpenAITool], Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    n: int | None = None
    """Only 1 (or absent): one session has one conversation. Anything else → 400."""
    user: Annotated[str, Meta(max_length=256)] | None = None
    metadata: Annotated[dict[str, str], Meta(max_length=16)] | None = None
    # Accepted and ignored: the provider interface carries none of these.
    frequency_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[int, Meta(ge=-100, le=100)]] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    parallel_tool_calls: bool | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    service_tier: str | None = None
    store: bool | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = None
    moderation: Any = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None


FORWARDED = (
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "tools",
    "tool_choice",
    "response_format",
)
"""Request fields that reach the provider (as Parley's `ChatParams`)."""
IGNORED = tuple(
    f
    for f in ChatCompletionRequest.__struct_fields__
    if f not in (*FORWARDED, "messages", "stream", "stream_options", "n")
)
"""Accepted so any client's request validates, then ignored (`stream_options.include_usage` is honoured)."""


# -- the answer --------------------------------------------------------------------------------------------------
class CompletionMessage(Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class CompletionChoice(Struct, kw_only=True):
    index: int = 0
    message: CompletionMessage
    finish_reason: str
    """`stop`, `length`, `tool_calls` or `content_filter`, as the model ended."""
    logprobs: None = None


class ChatCompletion(Struct, kw_only=True):
    id: str
    """The chat job's id: `GET /sessions/{id}/chats/{job}` shows what went into its context."""
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    """Unix seconds."""
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChunkDelta(Struct, kw_only=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """OpenAI's tool call deltas: `{index, id?, type?, function: {name?, arguments?}}`."""


class ChunkChoice(Struct, kw_only=True):
    index: int = 0
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(Struct, kw_only=True):
    """One `data:` event of a streamed completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None | UnsetType = UNSET
    """With `stream_options.include_usage`: null on every chunk but the last, which has `choices: []`."""


class ModelCard(Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(Struct, kw_only=True, omit_defaults=True):
    """Parley's error fields plus OpenAI's `type` and `param`, which the SDK reads into its exceptions."""

    status: int
    code: str
    message: str
    type: str
    param: str | None
    details: Any = None


class OpenAIErrorBody(Struct):
    error: OpenAIErrorDetail


def error_type(status: int) -> str:
    """OpenAI's `error.type` for a status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


# -- from the wire into Parley --------------------------------------------------------------------------------------
class WireRejected(Exception):
    """A well-formed request Parley cannot take; `param` names the field, as OpenAI's errors do."""

    def __init__(self, message: str, param: str | None, code: str = "unsupported_value", status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def to_message(m: OpenAIMessage, index: int) -> MessageCreate:
    """One request message as Parley stores it, without the fields it ignores. `developer` is stored as `system`
    (OpenAI treats them alike); `refusal` parts are dropped (an assistant message echoed back with its refusal)."""
    content: Any = m.content
    if isinstance(content, list):
        parts: list[ContentPart] = []
        for j, p in enumerate(content):
            if isinstance(p, OpenAITextPart):
                parts.append(TextPart(text=p.text))
            elif isinstance(p, OpenAIImagePart):
                parts.append(ImagePart(image_url=ImageUrl(url=p.image_url.url, detail=p.image_url.detail)))
            elif not isinstance(p, RefusalPart):
                raise WireRejected(
                    f"content parts of type {type(p).__struct_config__.tag!r} are not supported; send text or image_url parts",
                    f"messages[{index}].content[{j}]",
                    "unsupported_content",
                    422,
                )
        content = parts or (None if m.role == "assistant" and m.tool_calls else "")
    calls = [
        ToolCall(id=c.id, type=c.type, function=FunctionCall(name=c.function.name, arguments=c.function.arguments))
        for c in m.tool_calls or ()
    ]
    return MessageCreate(
        role="system" if m.role == "developer" else m.role,
        content=content,
        name=m.name,
        tool_call_id=m.tool_call_id,
        tool_calls=calls or None,
    )


def to_tools(tools: list[OpenAITool] | None) -> list[Tool] | None:
    if tools is None:
        return None
    return [
        Tool(
            type="function",
            function=FunctionDef(
                name=t.function.name, description=t.function.description, parameters=t.function.parameters
            ),
        )
        for t in tools
    ]


def max_tokens_of(request: ChatCompletionRequest, token_budget: int | None, default: int = 4096) -> int:
    """The answer's token limit: the request's, else `default` (at most half the session's budget, if it has one)."""
    if request.max_completion_tokens is not None:
        return request.max_completion_tokens
    if request.max_tokens is not None:
        return request.max_tokens
    return max(1, min(default, token_budget // 2)) if token_budget else default


def without_situation(messages: list[MessageCreate], situation: str | None) -> list[MessageCreate]:
    """Drop a leading system message whose text is the session's situation: Parley sends the situation itself."""
    if (
        situation is not None
        and messages
        and messages[0].role == "system"
        and _content_key(messages[0].content) == situation
    ):
        return messages[1:]
    return messages


# -- message equality -------------------------------------------------------------------------------------------------
Key = tuple[Any, ...]


def message_key(m: Any) -> Key:
    """What makes two messages the same turn, for a `MessageCreate` or a stored `Message`.

    role (`developer` = `system`), content, name, tool_call_id and tool_calls (id, type, function name and
    arguments). Null and absent are the same; `[{"type":"text","text":t}]` equals `t`; an assistant's `""` equals
    null; tool call arguments compare as JSON values (whitespace and key order aside). Message ids, `seq`, times,
    and the ignored `refusal`/`annotations` do not count.
    """
    role = "system" if m.role == "developer" else m.role
    content = _content_key(m.content)
    if role == "assistant" and content == "":
        content = None
    calls = tuple((c.id, c.type, c.function.name, _arguments_key(c.function.arguments)) for c in m.tool_calls or ())
    return (role, content, m.name, m.tool_call_id, calls)


def _content_key(content: Any) -> Any:
    if content is None or isinstance(content, str):
        return content
    parts = tuple(_part_key(p) for p in content)
    if len(parts) == 1 and parts[0][0] == "text":
        return parts[0][1]
    return parts


def _part_key(p: Any) -> tuple[Any, ...]:
    if isinstance(p, TextPart | OpenAITextPart):
        return ("text", p.text)
    if isinstance(p, ImagePart | OpenAIImagePart):
        return ("image_url", p.image_url.url, p.image_url.detail)
    if isinstance(p, dict):  # not reached through the typed paths; kept total for callers with plain data
        if p.get("type") == "text":
            return ("text", p.get("text"))
        url = p.get("image_url") or {}
        return ("image_url", url.get("url"), url.get("detail"))
    raise TypeError(f"unknown content part {p!r}")


def _arguments_key(arguments: str) -> Any:
    try:
        return ("json", json.dumps(json.loads(arguments), sort_keys=True, separators=(",", ":"), ensure_ascii=False))
    except ValueError:
        return ("text", arguments)


def chain(keys: Sequence[Key], start: bytes = b"") -> list[bytes]:
    """Rolling digests: `out[i]` stands for `keys[:i]` (`out[0]` is `start`), so equal digests mean equal prefixes."""
    out = [start]
    d = start
    for k in keys:
        d = hashlib.blake2b(d + msgspec.msgpack.encode(k), digest_size=16).digest()
        out.append(d)
    return out


# -- the rule ---------------------------------------------------------------------------------------------------------
class TurnPlan(Struct, frozen=True, kw_only=True):
    kind: Literal["append", "current", "replay", "amend"]
    """append: store `request[start:]` and answer; current: store nothing and answer the stored conversation
    (or join the chat already answering it); replay: store nothing, run nothing, answer the stored reply
    `stored[index]` (a retry whose answer was stored); amend: the request shares the stored conversation up to
    `at` and then goes its own way: record the client's version of stored message `at` as an edit (`edit`), or
    remove it, remove the stored messages after it, and store `request[start:]`."""
    start: int = 0
    index: int | None = None
    at: int | None = None
    edit: bool = False


def stored_to_read(request_len: int, stored_count: int) -> int:
    """How many of the stored messages (from the first) planning needs: never more than the request has, plus one
    (so a client that sends only new turns costs a read as long as its request, not as long as the session)."""
    return min(request_len + 1, stored_count) if request_len else 0


def plan_turns(request: Sequence[Key], stored: Sequence[Key], stored_count: int) -> TurnPlan:
    """Which of the request's messages (the situation already removed) are new to the session.

    `stored` holds the first `stored_to_read(len(request), stored_count)` stored messages' keys.
    1. The request starts with the whole stored conversation: its rest is new (`append` from there); if there is
       no rest, nothing is new (`current`).
    2. The request is the stored conversation less its last message, and that message is an assistant's: a
       retry whose answer was stored (`replay` it).
    3. The request starts like the stored conversation (an assistant turn among what they share, or where they
       part) and then differs (a client that stopped an answer half-way and kept what it got, or edited a turn): `amend` from
       where they part. If there both hold an
       assistant message with the same tool calls, the client's is recorded as an edit of the stored one;
       otherwise the stored one is removed. The stored messages after it are removed, the request's stored.
       No second copy of the conversation is ever stored, and the log keeps what was there (time travel).
    4. It starts otherwise: every message of the request is a new turn (`append` from 0) — a client that sends
       only new turns.
    """
    m, n = len(request), stored_count
    if len(stored) != stored_to_read(m, n):
        raise ValueError(f"{len(stored)} stored messages given, {stored_to_read(m, n)} expected")
    shared = next((i for i, (a, b) in enumerate(zip(request, stored)) if a != b), min(m, len(stored)))
    if shared == n:
        return TurnPlan(kind="append", start=n) if n < m else TurnPlan(kind="current", start=m)
    if m == n - 1 and shared == m and stored[m][0] == "assistant":
        return TurnPlan(kind="replay", index=m)
    if shared == 0 or all(k[0] != "assistant" for k in request[: shared + 1]):
        # nothing shared, or only turns a new message may repeat ("hi" again): the request holds new turns only
        return TurnPlan(kind="append", start=0) if m else TurnPlan(kind="current", start=0)
    mine = request[shared] if shared < m else None
    theirs = stored[shared]
    edit = mine is not None and mine[0] == theirs[0] == "assistant" and mine[3:] == theirs[3:]
    return TurnPlan(kind="amend", at=shared, edit=edit, start=shared + 1 if edit else shared)
