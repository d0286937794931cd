"""The context builder: which messages go into a model's prompt under a token budget.

Pure: it takes the conversation and a token counter and answers a plan; loading the
history, calling the model and writing summaries are the caller's. Costs follow the
OpenAI cookbook's formula for chat models, so a plan that fits here fits the model.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import msgspec

from shared.domain.errors import DomainError

SUMMARY_PREFIX = "Summary of the earlier conversation:\n"
IMAGE_TOKENS = 85
"""What an image part costs: OpenAI's flat price for a low-detail image."""
PER_MESSAGE = 3
PER_NAME = 1
REPLY_PRIMING = 3
"""Every reply is primed with `<|start|>assistant<|message|>`."""

Policy = Literal["truncate", "adaptive"] | None


class TokenCounter(Protocol):
    def count(self, text: str) -> int: ...


class ContextMessage(msgspec.Struct, kw_only=True):
    id: str | None
    """The stored message's id; None for one not stored (the situation, the summary, an unsaved message)."""
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[Any] | None
    """Text, or content parts (`TextPart`/`ImagePart` or their dict forms)."""
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """OpenAI-shaped: `{"id", "type": "function", "function": {"name", "arguments"}}`."""


class Summary(msgspec.Struct, kw_only=True):
    content: str
    up_to_seq: int
    """The summary stands for the history messages with seq ≤ this (system messages excepted)."""


class ContextPlan(msgspec.Struct, kw_only=True):
    messages: list[ContextMessage]
    """The prompt, in order."""
    included: list[str]
    """Ids of the stored messages in the prompt, in prompt order."""
    dropped: list[str]
    """Ids of the stored messages truncation left out, oldest first."""
    to_summarize: list[ContextMessage]
    """Adaptive only: the history messages the new summary must stand for, oldest first.
    The new summary replaces the current one, which is then left out of `messages` too:
    summarise it together with these."""
    prompt_tokens: int
    """Tokens of `messages` (and the tools); without the summary still to be written."""
    budget: int | None
    max_tokens: int
    summary_up_to_seq: int | None = None
    """Adaptive only: the `up_to_seq` of the summary of `to_summarize`."""


class TokenBudgetExceeded(DomainError):
    """The prompt cannot be made to fit the session's token budget."""

    code = "token_budget_exceeded"


def message_tokens(counter: TokenCounter, m: ContextMessage) -> int:
    """A message's cost: 3 + role + content + (1 + name) + each tool call's name and arguments."""
    n = PER_MESSAGE + counter.count(m.role) + _content_tokens(counter, m.content)
    if m.name is not None:
        n += PER_NAME + counter.count(m.name)
    for call in m.tool_calls or ():
        fn = call.get("function") or {}
        n += counter.count(str(fn.get("name") or ""))
        args = fn.get("arguments") or ""
        n += counter.count(args if isinstance(args, str) else msgspec.json.encode(args).decode())
    return n


def prompt_tokens(counter: TokenCounter, messages: list[ContextMessage], tools_json: bytes | None) -> int:
    """A prompt's cost: its messages, the reply priming, and the JSON of the tools offered."""
    return sum(message_tokens(counter, m) for m in messages) + REPLY_PRIMING + _tools_tokens(counter, tools_json)


def summary_message(content: str) -> ContextMessage:
    """How a summary appears in the prompt."""
    return ContextMessage(id=None, role="system", content=SUMMARY_PREFIX + content)


def plan_context(
    *,
    situation: str | None,
    summary: Summary | None,
    history: list[tuple[int, ContextMessage]],
    new: list[ContextMessage],
    tools_json: bytes | None,
    budget: int | None,
    max_tokens: int,
    policy: Policy,
    counter: TokenCounter,
    summary_reserve: int = 256,
    threshold: float = 1.0,
    keep_last: int = 0,
    compact: bool = False,
) -> ContextPlan:
    """The prompt for a chat request: situation, summary, the history it does not cover, then `new`.

    Without a budget everything goes in. With one, prompt + `max_tokens` must fit it:
    `truncate` drops the oldest units (and tool results whose call is not in the prompt),
    `adaptive` picks the oldest history units to summarise, and no policy refuses. A unit
    is a message, or an assistant message with tool calls together with the tool messages
    answering them, so a result never loses its call. System messages and the newest
    message's unit are never dropped; if they alone do not fit, every policy refuses.

    `adaptive` compacts once the prompt would pass `threshold` × the budget, down to it, never summarising the
    newest `keep_last` stored messages; `compact` (a compaction job) summarises every stored unit it may, budget
    or none.
    """
    head: list[ContextMessage] = []
    if situation is not None:
        head.append(ContextMessage(id=None, role="system", content=situation))
    summary_msg = summary_message(summary.content) if summary is not None else None
    covered = summary.up_to_seq if summary is not None else None
    # A summary stands for conversation, not instructions: system messages stay.
    kept = [(s, m) for s, m in history if covered is None or s > covered or m.role == "system"]
    conv = [m for _, m in kept] + list(new)
    seqs: list[int | None] = [s for s, _ in kept] + [None] * len(new)
    n_hist = len(kept)

    head_cost = sum(message_tokens(counter, m) for m in head)
    summary_cost = message_tokens(counter, summary_msg) if summary_msg is not None else 0
    costs = [message_tokens(counter, m) for m in conv]
    fixed = REPLY_PRIMING + _tools_tokens(counter, tools_json)
    total = fixed + head_cost + summary_cost + sum(costs)

    def plan(keep: list[int], dropped: list[int] | None = None, summarize: list[int] | None = None) -> ContextPlan:
        old = [summary_msg] if summary_msg is not None else []
        to_summarize = [conv[i] for i in summarize or ()]
        up_to = max(s for i in summarize if (s := seqs[i]) is not None) if summarize else None
        msgs = head + ([] if summarize else old) + [conv[i] for i in keep]
        tokens = fixed + head_cost + (0 if summarize else summary_cost) + sum(costs[i] for i in keep)
        return ContextPlan(
            messages=msgs,
            included=[i for i in (conv[k].id for k in keep) if i is not None],
            dropped=[i for i in (conv[k].id for k in dropped or ()) if i is not None],
            to_summarize=to_summarize,
            prompt_tokens=tokens,
            budget=budget,
            max_tokens=max_tokens,
            summary_up_to_seq=up_to,
        )

    everything = list(range(len(conv)))
    units = _units(conv)
    # the newest `keep_last` stored non-system messages stay verbatim: no unit holding one is summarised
    stored = [i for i in range(n_hist) if conv[i].role != "system"]
    verbatim = set(stored[len(stored) - keep_last :]) if keep_last else set()
    if compact:
        eligible: list[int] = []
        for u in units:
            if max(u) >= n_hist or verbatim.intersection(u):
                break
            if conv[u[0]].role != "system":
                eligible += u
        if not eligible:
            return plan(everything)
        folded = set(eligible)
        return plan([i for i in everything if i not in folded], summarize=eligible)
    if budget is None:
        return plan(everything)

    last = len(conv) - 1
    pinned = {i for u in units if last in u for i in u} | {i for i, m in enumerate(conv) if m.role == "system"}
    droppable = [u for u in units if last not in u and conv[u[0]].role != "system"]
    minimum = fixed + head_cost + summary_cost + sum(costs[i] for i in pinned)
    if minimum + max_tokens > budget:
        raise TokenBudgetExceeded(
            f"the system messages and the newest message need {minimum} tokens, plus max_tokens {max_tokens}: "
            f"over the token budget of {budget}",
            {"prompt_tokens": minimum, "max_tokens": max_tokens, "budget": budget},
        )

    if policy == "truncate":
        gone: set[int] = set()
        for u in droppable:
            if total + max_tokens <= budget:
                break
            gone.update(u)
            total -= sum(costs[i] for i in u)
        # A tool message whose call is not in the prompt (covered by the summary, say) would be
        # refused by the model's API: drop it too, unless it is the newest message.
        calls: set[str] = set()
        for i in everything:
            if i in gone:
                continue
            m = conv[i]
            calls.update(c["id"] for c in m.tool_calls or () if isinstance(c.get("id"), str))
            if m.role == "tool" and m.tool_call_id not in calls and i not in pinned:
                gone.add(i)
        return plan([i for i in everything if i not in gone], sorted(gone))

    target = int(budget * threshold) if policy == "adaptive" else budget
    if total + max_tokens <= target:
        return plan(everything)

    if policy == "adaptive":
        room = target - max_tokens - summary_reserve
        rest = total - summary_cost  # the summary to come replaces the one there is
        # How many non-system messages lie at or before each position: a set of chosen messages
        # can be summarised up to the seq of its last one only if none of those is left out.
        before: list[int] = []
        for m in conv:
            before.append((before[-1] if before else 0) + (m.role != "system"))
        chosen: list[int] = []
        for u in droppable:
            if max(u) >= n_hist or verbatim.intersection(u):
                break  # only stored history is summarised (a summary is a record up to a seq), and not the newest
            chosen += u
            rest -= sum(costs[i] for i in u)
            if rest <= room and before[max(chosen)] == len(chosen):
                gone = set(chosen)
                return plan([i for i in everything if i not in gone], summarize=sorted(chosen))
        # under the threshold was out of reach (the newest messages stay verbatim): within the budget will do
        if chosen and before[max(chosen)] == len(chosen) and rest <= budget - max_tokens - summary_reserve:
            gone = set(chosen)
            return plan([i for i in everything if i not in gone], summarize=sorted(chosen))
        if total + max_tokens <= budget:
            return plan(everything)
        raise TokenBudgetExceeded(
            f"even with the oldest messages summarised the prompt needs {rest} tokens, plus {summary_reserve} "
            f"for the summary and max_tokens {max_tokens}: over the token budget of {budget}",
            {"prompt_tokens": rest, "max_tokens": max_tokens, "budget": budget, "summary_reserve": summary_reserve},
        )

    raise TokenBudgetExceeded(
        f"the prompt needs {total} tokens, plus max_tokens {max_tokens}: over the token budget of {budget}",
        {"prompt_tokens": total, "max_tokens": max_tokens, "budget": budget},
    )


def to_openai(messages: list[ContextMessage]) -> list[dict[str, Any]]:
    """The prompt as Chat Completions `messages`, without the fields that are None."""
    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role}
        if m.content is not None:
            d["content"] = m.content if isinstance(m.content, str) else [_part_dict(p) for p in m.content]
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.tool_calls is not None:
            d["tool_calls"] = m.tool_calls
        out.append(d)
    return out


def _units(conv: list[ContextMessage]) -> list[list[int]]:
    """The conversation in units, ordered by their first message: an assistant message with tool
    calls and the later tool messages answering them form one; every other message is its own."""
    units: list[list[int]] = []
    owner: dict[str, list[int]] = {}
    for i, m in enumerate(conv):
        if m.role == "tool" and m.tool_call_id is not None and m.tool_call_id in owner:
            owner[m.tool_call_id].append(i)
            continue
        unit = [i]
        units.append(unit)
        if m.role == "assistant":
            for call in m.tool_calls or ():
                if isinstance(call.get("id"), str):
                    owner[call["id"]] = unit
    return units


def _content_tokens(counter: TokenCounter, content: str | list[Any] | None) -> int:
    if content is None:
        return 0
    if isinstance(content, str):
        return counter.count(content)
    n = 0
    for part in content:
        p = _part_dict(part)
        kind = p.get("type")
        if kind == "text":
            n += counter.count(str(p.get("text", "")))
        elif kind == "image_url":
            n += IMAGE_TOKENS
        else:  # a part we do not know: count what would be sent
            n += counter.count(msgspec.json.encode(p).decode())
    return n


def _part_dict(part: Any) -> dict[str, Any]:
    """A content part as a JSON object, without None fields (`detail`)."""
    d = msgspec.to_builtins(part) if isinstance(part, msgspec.Struct) else part
    if not isinstance(d, dict):
        return {"type": "text", "text": str(d)}
    return _drop_none(d)


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


def _tools_tokens(counter: TokenCounter, tools_json: bytes | None) -> int:
    return counter.count(tools_json.decode()) if tools_json else 0
