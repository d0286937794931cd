"""Wire types: the one definition of every body the API accepts or answers.

msgspec validates requests against these, the OpenAPI document is generated from
them, and event payloads reuse them, so the three can never disagree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

Role = Literal["system", "user", "assistant", "tool"]
ContextOverflow = Literal["truncate", "adaptive"]

ShortText = Annotated[str, Meta(max_length=256)]
ToolName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
TokenBudget = Annotated[int, Meta(ge=1, le=10_000_000)]
Metadata = Annotated[dict[str, Any], Meta(max_length=64)]


class Wire(Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of request bodies: unknown fields are an error, not silently dropped."""


class FunctionDef(Wire):
    name: ToolName
    description: Annotated[str, Meta(max_length=4096)] | None = None
    parameters: dict[str, Any] | None = None
    """A JSON Schema object describing the function's arguments."""


class Tool(Wire):
    """An OpenAI-style function tool."""

    type: Literal["function"]
    function: FunctionDef


Tools = Annotated[list[Tool], Meta(max_length=128)]


class TextPart(Wire, tag_field="type", tag="text"):
    text: str


class ImageUrl(Wire):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Wire, tag_field="type", tag="image_url"):
    image_url: ImageUrl


ContentPart = TextPart | ImagePart
Content = str | Annotated[list[ContentPart], Meta(min_length=1, max_length=64)]


class SessionCreate(Wire):
    agent_id: ShortText | None = None
    user_id: ShortText | None = None
    situation: str | None = None
    token_budget: TokenBudget | None = None
    context_overflow: ContextOverflow | None = None
    tools: Tools = msgspec.field(default_factory=list)
    metadata: Metadata = msgspec.field(default_factory=dict)


class SessionPatch(Wire):
    """A partial session: absent fields stay as they are; `null` clears a field."""

    agent_id: ShortText | None | UnsetType = UNSET
    user_id: ShortText | None | UnsetType = UNSET
    situation: str | None | UnsetType = UNSET
    token_budget: TokenBudget | None | UnsetType = UNSET
    context_overflow: ContextOverflow | None | UnsetType = UNSET
    tools: Tools | None | UnsetType = UNSET
    metadata: Metadata | None | UnsetType = UNSET


class Session(Struct, kw_only=True):
    id: str
    agent_id: str | None
    user_id: str | None
    situation: str | None
    token_budget: int | None
    context_overflow: ContextOverflow | None
    tools: list[Tool]
    metadata: dict[str, Any]
    version: int
    """The version of the session's last event; also its ETag."""
    created_at: datetime
    updated_at: datetime


class SessionList(Struct):
    items: list[Session]


class SessionDeletion(Struct, kw_only=True):
    id: str
    deleted_at: datetime


class MessageCreate(Wire):
    role: Role
    content: Content
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    tool_call_id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None


class Message(Struct, kw_only=True):
    id: str
    session_id: str
    role: Role
    content: Content
    name: str | None
    tool_call_id: str | None
    seq: int
    """The message's 1-based position in its session."""
    created_at: datetime


class MessageList(Struct):
    items: list[Message]


class ToolList(Struct):
    items: list[Tool]


class ErrorDetail(Struct, kw_only=True, omit_defaults=True):
    status: int
    code: str
    message: str
    details: Any = None


class ErrorBody(Struct):
    """The one shape of every 4xx and 5xx answer."""

    error: ErrorDetail


class Health(Struct):
    status: str


class Readiness(Struct, kw_only=True):
    status: Literal["ready", "not_ready"]
    redis: bool
    projector: bool
