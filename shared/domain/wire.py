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
Multitask = Literal["enqueue", "reject", "interrupt"]
"""What a chat does while another chat of the session is queued or running."""

ShortText = Annotated[str, Meta(max_length=256)]
MAX_DELAY_S = 30 * 86_400
"""How far ahead a chat can be scheduled."""
ToolName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
TokenBudget = Annotated[int, Meta(ge=1, le=10_000_000)]
Metadata = Annotated[dict[str, Any], Meta(max_length=64)]
Int64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
"""An integer the store can keep (msgpack's range): larger ones answer 422, so the schema says so."""


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


Tools = Annotated[
    list[Tool],
    Meta(max_length=128, description="At most 128 tools, their names unique (a duplicate name answers 422)."),
]


class TextPart(Wire, tag_field="type", tag="text"):
    text: str


class ImageUrl(Wire):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Wire, tag_field="type", tag="image_url"):
    image_url: ImageUrl


ContentPart = TextPart | ImagePart
Content = str | Annotated[list[ContentPart], Meta(min_length=1, max_length=64)]


RetentionAction = Literal["delete", "purge"]


class Retention(Wire):
    """What of a session is kept. `idle_days` after its last change the retention sweeper deletes it (its log is
    kept: history, export and time travel still work) or purges it (the log and everything derived from it are
    erased). `keep_messages`: its message list shows only the newest N messages and the sweeper frees the read
    model's copies of the older ones; the log keeps every message (time travel and export still show them, and a
    chat's context is its token budget's business). At least one of the two."""

    idle_days: Annotated[int, Meta(ge=1, le=36_500)] | None = None
    action: RetentionAction = "delete"
    keep_messages: Annotated[int, Meta(ge=1, le=10_000_000)] | None = None

    def __post_init__(self) -> None:
        if self.idle_days is None and self.keep_messages is None:
            raise ValueError("a retention needs idle_days, keep_messages or both")


class Compaction(Wire):
    """How an `adaptive` session compacts its conversation into a summary. A summary covers the conversation from its
    first message up to a seq (it folds in the one before it); the log keeps every message it covers."""

    model: ShortText | None = None
    """The model that writes the summary (null: the chat's own)."""
    threshold: Annotated[float, Meta(gt=0, le=1)] = 1.0
    """Compact once the prompt plus `max_tokens` would pass this fraction of the token budget, down to it."""
    prompt: Annotated[str, Meta(min_length=1, max_length=8_000)] | None = None
    """The summariser's instruction (null: Parley's own)."""
    keep_last: Annotated[int, Meta(ge=0, le=10_000)] = 0
    """The newest messages never summarised: they stay verbatim in every prompt."""
    on_failure: Literal["fail", "truncate"] = "fail"
    """When the summary cannot be written (the model failed or answered nothing): fail the chat
    (`compaction_failed`), or send the prompt truncated instead. Either way no message is dropped from the
    conversation and no summary recorded."""


class SessionCreate(Wire):
    agent_id: ShortText | None = None
    user_id: ShortText | None = None
    situation: str | None = None
    token_budget: TokenBudget | None = None
    context_overflow: ContextOverflow | None = None
    multitask: Multitask = "enqueue"
    tools: Tools = msgspec.field(default_factory=list)
    metadata: Metadata = msgspec.field(default_factory=dict)
    compaction: Compaction | None = None
    """How `adaptive` compacts (null: at the budget, by the chat's model, keeping no message verbatim)."""
    retention: Retention | None = None
    """This session's own retention; null: the tenant's (`parley tenants set-limits --retention-idle-days`)."""


class SessionPatch(Wire):
    """A partial session: absent fields stay as they are; `null` clears a field."""

    agent_id: ShortText | None | UnsetType = UNSET
    user_id: ShortText | None | UnsetType = UNSET
    situation: str | None | UnsetType = UNSET
    token_budget: TokenBudget | None | UnsetType = UNSET
    context_overflow: ContextOverflow | None | UnsetType = UNSET
    multitask: Multitask | UnsetType = UNSET
    tools: Tools | None | UnsetType = UNSET
    metadata: Metadata | None | UnsetType = UNSET
    compaction: Compaction | None | UnsetType = UNSET
    retention: Retention | None | UnsetType = UNSET


class ForkedFrom(Struct, kw_only=True):
    session_id: str
    version: int
    """The parent's version the fork's history ends at (the fork's own versions are one later)."""


class Session(Struct, kw_only=True):
    id: str
    agent_id: str | None
    user_id: str | None
    situation: str | None
    token_budget: int | None
    context_overflow: ContextOverflow | None
    multitask: Multitask = "enqueue"
    tools: list[Tool]
    metadata: dict[str, Any]
    version: int
    """The version of the session's last event; also its ETag."""
    created_at: datetime
    updated_at: datetime
    compaction: Compaction | None = None
    """How `adaptive` compacts (null: the defaults)."""
    forked_from: ForkedFrom | None = None
    """The session this one was forked from, and at which of its versions (null: not a fork)."""
    retention: Retention | None = None
    """The session's own retention (null: the tenant's applies, if it has one)."""
    expires_at: datetime | None = None
    """When the retention sweeper deletes (or purges) it unless it changes before: `updated_at` plus the idle days
    of its own retention, else of its tenant's; null: kept."""


class SessionFields(Struct, kw_only=True):
    """A session as a list answers it: every field of `Session`, or with `fields=` only those named (and `id`)."""

    id: str
    agent_id: str | None = None
    user_id: str | None = None
    situation: str | None = None
    token_budget: int | None = None
    context_overflow: ContextOverflow | None = None
    multitask: Multitask | None = None
    tools: list[Tool] | None = None
    metadata: dict[str, Any] | None = None
    version: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    compaction: Compaction | None = None
    forked_from: ForkedFrom | None = None
    retention: Retention | None = None
    expires_at: datetime | None = None


class SessionList(Struct):
    """A page of sessions; `next` is an opaque cursor to pass as `after`, null on the last page."""

    items: list[SessionFields]
    next: str | None


class SessionCount(Struct, kw_only=True):
    count: int
    exact: bool
    """False: a filter combination no single index serves walked more index entries than a count may, and `count`
    is a lower bound (narrow the filter, e.g. by a time range)."""


class SessionDeletion(Struct, kw_only=True):
    id: str
    deleted_at: datetime
    purged: bool = False
    """True: the log and everything derived from it were erased too (`?purge=true`)."""


class FunctionCall(Wire):
    name: ToolName
    arguments: str
    """The arguments as a JSON string, as the model wrote them."""


class ToolCall(Wire, kw_only=True):
    id: Annotated[str, Meta(min_length=1, max_length=128)]
    type: Literal["function"] = "function"
    function: FunctionCall


class MessageCreate(Wire, omit_defaults=True):
    """A message as a client sends it; encoded (a chat's unsaved messages, a schedule's) without its unset fields,
    so it reads back as the per-role schema the document gives it."""

    role: Role
    content: Content | None = None
    """Required, except on an assistant message that carries `tool_calls`."""
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None = None
    tool_call_id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    tool_calls: Annotated[list[ToolCall], Meta(min_length=1, max_length=64)] | None = None


class Message(Struct, kw_only=True):
    id: str
    session_id: str
    role: Role
    content: Content | None
    name: str | None
    tool_call_id: str | None
    tool_calls: list[ToolCall] | None = None
    seq: int
    """The message's 1-based position in its session."""
    created_at: datetime
    edited_at: datetime | UnsetType = UNSET
    """When the message was last edited (absent: never); its past text stays in the log (time travel)."""


class MessagePatch(Wire):
    """An edit of a message: its `content` (null only on an assistant message with tool calls) or `name`."""

    content: Content | None | UnsetType = UNSET
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | None | UnsetType = UNSET


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


# -- chat -------------------------------------------------------------------------------
ChatStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ChatTemplate(Wire):
    """What a chat asks the model: the fields a chat request and a schedule's chats share."""

    messages: Annotated[list[MessageCreate], Meta(max_length=256)] = msgspec.field(default_factory=list)
    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] = 150
    model: ShortText | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    seed: Int64 | None = None
    tools: Tools | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    save: bool = True
    """False: neither the request's messages nor the answer are stored (the job and its events still are)."""
    multitask: Multitask | None = None
    """Overrides the session's `multitask` for this request."""


class ChatRequest(ChatTemplate):
    stream: bool = False
    run_at: Annotated[str, Meta(max_length=64, extra_json_schema={"format": "date-time"})] | None = None
    """Run the chat at this time (RFC 3339), not before (a past time runs it at once). A scheduled chat answers 202
    with its job, which shows `run_at` and stays `queued` until then. Text, parsed by `commands.parse_time`: every
    RFC 3339 time is taken (a leap second, year 0000), which a `datetime` field would refuse."""
    delay_s: Annotated[float, Meta(ge=0, le=MAX_DELAY_S)] | None = None
    """Run the chat this many seconds from now (or after `run_at`, when both are given)."""


class ForkRequest(Wire):
    version: Annotated[int, Meta(ge=1, le=2**63 - 1)] | None = None
    """The parent's version the fork's history ends at (null: its latest)."""
    metadata: Metadata | None = None
    """The fork's metadata (null: the parent's at that version)."""


# -- schedules ----------------------------------------------------------------------------
Cron = Annotated[
    str,
    Meta(
        min_length=9,
        max_length=128,
        pattern=r"^[0-9A-Za-z*/,#? -]+$",
        description="A cron expression: 5 fields (minute hour day-of-month month day-of-week), or 6 with seconds "
        "first; names (MON, JAN), ranges, steps, lists, L and # as Debian cron and cronsim read them. An expression "
        "without ticks (`61 * * * *`, `0 0 30 2 *`) or ticking more often than the deployment allows is a 422.",
        examples=["0 9 * * MON-FRI"],
    ),
]
TimeZone = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$",
        description="An IANA time zone (an unknown one is a 422).",
        examples=["Europe/Paris"],
    ),
]


class ScheduleCreate(ChatTemplate, kw_only=True):
    """A chat to run at every tick of `cron` in `timezone`, with these messages and parameters."""

    cron: Cron
    timezone: TimeZone = "UTC"
    paused: bool = False


class SchedulePatch(Wire):
    """Absent fields stay as they are. A schedule changed or resumed ticks from now on (ticks missed while it was
    paused are not run)."""

    cron: Cron | UnsetType = UNSET
    timezone: TimeZone | UnsetType = UNSET
    paused: bool | UnsetType = UNSET


class Schedule(ScheduleCreate, kw_only=True):
    id: str
    session_id: str
    created_at: datetime
    updated_at: datetime
    next_run_at: datetime | None
    """The next tick (null: paused)."""
    last_tick_at: datetime | None = None
    """The last tick run or skipped."""
    last_job_id: str | None = None
    """The chat job of the last tick run."""
    runs: int = 0
    """Ticks that requested a chat."""
    skipped: int = 0
    """Ticks not run: missed (no worker ran within `PARLEY_SCHEDULE_GRACE_S`) or refused (the multitask policy
    `reject` while a chat ran, the tenant's chat limits)."""


class ScheduleList(Struct):
    items: list[Schedule]


class ChatParams(Struct, kw_only=True):
    """What the worker needs of a chat request; recorded in `ChatRequested`."""

    model: str
    max_tokens: int
    stream: bool = False
    save: bool = True
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    run_at: datetime | None = None
    """Not before this time (a scheduled chat)."""
    compact: bool = False
    """A compaction (`POST /sessions/{id}/compact`): the job summarises the conversation and answers the summary;
    no chat model is called and nothing is stored as a message."""


class Usage(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(Struct, kw_only=True):
    index: int = 0
    finish_reason: str
    message: AssistantMessage


class ChatResponse(Struct, kw_only=True):
    id: str
    """The chat job's id."""
    session_id: str
    created_at: datetime
    model: str
    choices: list[ChatChoice]
    usage: Usage


class JobAccepted(Struct, kw_only=True):
    """A queued chat (`Prefer: respond-async`)."""

    id: str
    session_id: str
    status: str
    created_at: datetime
    run_at: datetime | None = None
    """A scheduled chat: not run before this time."""


class ChatError(Struct, kw_only=True):
    code: str
    message: str


class ContextReport(Struct, kw_only=True, omit_defaults=True):
    """What went into the prompt, and why the model may not have seen a message."""

    included: list[str]
    dropped: list[str]
    summarized: list[str]
    prompt_tokens: int
    budget: int | None
    max_tokens: int
    dropped_range: tuple[int, int] | None = None
    """First and last seq of stored messages left out without being read: the conversation older than what the
    token budget reached (every message shown in that range; system messages are never left out). Those in
    `dropped` were read and left out."""


class ChatJob(Struct, kw_only=True):
    id: str
    session_id: str
    status: ChatStatus
    model: str
    stream: bool
    attempts: int = 0
    created_at: datetime
    run_at: datetime | None = None
    """A scheduled chat: not run before this time."""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    context: ContextReport | None = None
    response: ChatResponse | None = None
    error: ChatError | None = None


class ChatJobList(Struct):
    items: list[ChatJob]


# -- tenancy ------------------------------------------------------------------------------
class TenantLimits(Struct, kw_only=True, frozen=True):
    """A tenant's limits; 0 means unlimited."""

    rps: float = 0
    """Requests per second, sustained, across every API process."""
    burst: int = 0
    """Requests admitted at once after a quiet spell."""
    concurrent_chats: int = 0
    """Chats queued or running at once."""
    chat_tokens_per_day: int = 0
    """Prompt plus completion tokens per UTC day."""
    streams: int = 0
    """Open event streams (and waiting synchronous chats)."""
    retention_idle_days: int = 0
    """Sessions without a retention of their own go this many days after their last change (0: kept)."""
    retention_action: RetentionAction = "delete"
    """What the sweeper does to them: `delete` (the log stays) or `purge` (erased)."""
    retention_keep_messages: int = 0
    """Sessions without a retention of their own list only their newest this many messages (0: all)."""


class UsageDay(Struct, kw_only=True):
    day: str
    """YYYY-MM-DD (UTC)."""
    requests: int = 0
    """Requests admitted."""
    chats: int = 0
    """Chats requested."""
    prompt_tokens: int = 0
    """Tokens of every prompt sent to a model (`ContextBuilt`)."""
    completion_tokens: int = 0
    """Tokens of the answers (their usage)."""


class UsageReport(Struct, kw_only=True):
    """`GET /usage`: the tenant's limits as they apply now, and its counters per day, newest first."""

    tenant: str
    limits: TenantLimits
    days: list[UsageDay]


# -- stream tokens --------------------------------------------------------------------------------------------------
class StreamTokenRequest(Wire):
    ttl_s: Annotated[int, Meta(ge=10, le=3600)] | None = None
    """Seconds the token lasts (10..3600; absent: `PARLEY_STREAM_TOKEN_TTL_S`)."""


class StreamToken(Struct, kw_only=True):
    token: str
    """Pass it as `?token=` to this session's `/events` (with `Accept: text/event-stream`) or a chat's `/stream`."""
    session_id: str
    expires_at: datetime
