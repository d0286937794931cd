"""The context builder: exact costs, and what each overflow policy keeps, drops and summarises."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.adapters.tokenizer import Tokenizer
from shared.domain.context import (
    ContextMessage,
    ContextPlan,
    Summary,
    TokenBudgetExceeded,
    message_tokens,
    plan_context,
    prompt_tokens,
    summary_message,
    to_openai,
)
from shared.domain.errors import DomainError
from shared.domain.wire import FunctionDef, ImagePart, ImageUrl, TextPart, Tool

TOK = Tokenizer("o200k_base")
MAX = 50


def user(id: str | None, text: str) -> ContextMessage:
    return ContextMessage(id=id, role="user", content=text)


def assistant(id: str | None, text: str | None, *calls: str) -> ContextMessage:
    tool_calls = [
        {"id": c, "type": "function", "function": {"name": "lookup", "arguments": '{"q":"' + c + '"}'}} for c in calls
    ]
    return ContextMessage(id=id, role="assistant", content=text, tool_calls=tool_calls or None)


def tool(id: str | None, call: str, text: str = "result") -> ContextMessage:
    return ContextMessage(id=id, role="tool", content=text, tool_call_id=call)


def system(id: str | None, text: str) -> ContextMessage:
    return ContextMessage(id=id, role="system", content=text)


def stored(*messages: ContextMessage) -> list[tuple[int, ContextMessage]]:
    return list(enumerate(messages, start=1))


def cost(m: ContextMessage) -> int:
    return message_tokens(TOK, m)


def plan(history, new, *, budget=None, policy=None, situation="Be brief.", summary=None, tools_json=None, **kw):
    return plan_context(
        situation=situation,
        summary=summary,
        history=history,
        new=new,
        tools_json=tools_json,
        budget=budget,
        max_tokens=MAX,
        policy=policy,
        counter=TOK,
        **kw,
    )


def ids(messages: list[ContextMessage]) -> list[str | None]:
    return [m.id for m in messages]


# --- costs -------------------------------------------------------------------------------------


def test_a_message_costs_what_the_cookbook_formula_says():
    # 3 per message + "user" (1) + "hello world" (2) + 1 for a name + "bob" (1)
    assert cost(ContextMessage(id="a", role="user", content="hello world", name="bob")) == 3 + 1 + 2 + 1 + 1
    # 3 + "assistant" (1) + no content + "get_weather" (2) + '{"city":"Paris"}' (5)
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    assert cost(ContextMessage(id="b", role="assistant", content=None, tool_calls=[call])) == 3 + 1 + 2 + 5
    # 3 + "tool" (1) + "Sunny, 21°C" (5); the tool_call_id is not counted
    assert cost(ContextMessage(id="c", role="tool", content="Sunny, 21°C", tool_call_id="call_1")) == 3 + 1 + 5


def test_content_parts_count_their_text_and_a_flat_85_per_image():
    # 3 + "user" (1) + "What is in this image?" (6) + 85
    image = ImagePart(image_url=ImageUrl(url="https://example.com/cat.png"))
    as_structs = ContextMessage(id="a", role="user", content=[TextPart(text="What is in this image?"), image])
    as_dicts = ContextMessage(id="a", role="user", content=to_openai([as_structs])[0]["content"])
    assert cost(as_structs) == cost(as_dicts) == 3 + 1 + 6 + 85


def test_a_prompt_costs_its_messages_the_reply_priming_and_its_tools():
    tools = msgspec.json.encode(
        [Tool(type="function", function=FunctionDef(name="get_weather", parameters={"type": "object"}))]
    )
    assert TOK.count(tools.decode()) == 24
    messages = [system(None, "be brief"), ContextMessage(id="a", role="user", content="hello world", name="bob")]
    # (3 + 1 + 2) + 8 + 3 for the reply + 24 for the tools
    assert prompt_tokens(TOK, messages, tools) == 6 + 8 + 3 + 24
    assert prompt_tokens(TOK, messages, None) == 6 + 8 + 3
    assert prompt_tokens(TOK, [], None) == 3


def test_the_plan_counts_the_prompt_it_answers():
    tools = msgspec.json.encode([Tool(type="function", function=FunctionDef(name="get_weather"))])
    p = plan(stored(user("m1", "hi"), assistant("m2", "hello")), [user(None, "how are you?")], tools_json=tools)
    assert p.prompt_tokens == prompt_tokens(TOK, p.messages, tools)
    assert (p.budget, p.max_tokens) == (None, MAX)


# --- the prompt's shape ---------------------------------------------------------------------


def conversation(n: int) -> list[tuple[int, ContextMessage]]:
    return stored(
        *(user(f"m{i}", f"question {i}?") if i % 2 else assistant(f"m{i}", f"answer {i}.") for i in range(1, n + 1))
    )


NEW = [user("n1", "And what now?")]


def test_without_a_budget_everything_goes_in_in_order():
    history = conversation(6)
    p = plan(history, NEW)
    assert p.messages[0] == system(None, "Be brief.")
    assert ids(p.messages) == [None, "m1", "m2", "m3", "m4", "m5", "m6", "n1"]
    assert p.included == ["m1", "m2", "m3", "m4", "m5", "m6", "n1"]
    assert p.dropped == [] and p.to_summarize == [] and p.summary_up_to_seq is None


def test_unsaved_messages_go_in_but_have_no_id_to_report():
    p = plan(conversation(2), [user(None, "unsaved")], situation=None)
    assert ids(p.messages) == ["m1", "m2", None]
    assert p.included == ["m1", "m2"]


def test_a_summary_replaces_the_history_it_covers_but_not_its_system_messages():
    history = stored(
        user("m1", "a"), system("m2", "Use metric units."), assistant("m3", "b"), user("m4", "c"), assistant("m5", "d")
    )
    p = plan(history, NEW, summary=Summary(content="They said a and b.", up_to_seq=3))
    assert p.messages[1] == summary_message("They said a and b.")
    assert p.messages[1].content == "Summary of the earlier conversation:\nThey said a and b."
    assert ids(p.messages) == [None, None, "m2", "m4", "m5", "n1"]
    assert p.included == ["m2", "m4", "m5", "n1"]
    assert p.dropped == []
    assert p.prompt_tokens == prompt_tokens(TOK, p.messages, None)


# --- no policy -------------------------------------------------------------------------------


def test_no_policy_fits_exactly_at_the_budget():
    history = conversation(4)
    full = plan(history, NEW).prompt_tokens
    p = plan(history, NEW, budget=full + MAX)
    assert p.included == ["m1", "m2", "m3", "m4", "n1"] and p.prompt_tokens == full and p.budget == full + MAX


def test_no_policy_refuses_one_token_over_with_the_numbers():
    history = conversation(4)
    full = plan(history, NEW).prompt_tokens
    with pytest.raises(TokenBudgetExceeded) as e:
        plan(history, NEW, budget=full + MAX - 1)
    assert e.value.code == "token_budget_exceeded"
    assert isinstance(e.value, DomainError)
    assert e.value.details == {"prompt_tokens": full, "max_tokens": MAX, "budget": full + MAX - 1}
    assert str(full) in e.value.message and str(full + MAX - 1) in e.value.message


# --- truncate --------------------------------------------------------------------------------


def test_truncate_keeps_everything_that_fits_exactly():
    history = conversation(4)
    full = plan(history, NEW).prompt_tokens
    p = plan(history, NEW, budget=full + MAX, policy="truncate")
    assert p.dropped == [] and p.prompt_tokens == full


def test_truncate_drops_the_oldest_messages_until_it_fits():
    history = conversation(4)
    m = dict(history)
    full = plan(history, NEW).prompt_tokens

    p = plan(history, NEW, budget=full + MAX - 1, policy="truncate")
    assert p.dropped == ["m1"] and p.included == ["m2", "m3", "m4", "n1"]
    assert p.prompt_tokens == full - cost(m[1])
    assert p.prompt_tokens == prompt_tokens(TOK, p.messages, None)

    tight = full + MAX - cost(m[1]) - cost(m[2])
    assert plan(history, NEW, budget=tight, policy="truncate").dropped == ["m1", "m2"]
    assert plan(history, NEW, budget=tight - 1, policy="truncate").dropped == ["m1", "m2", "m3"]


def test_truncate_drops_older_new_messages_but_never_the_last():
    history = conversation(2)
    new = [user("n1", "first of this request"), user("n2", "last")]
    full = plan(history, new).prompt_tokens
    minimum = full - sum(cost(m) for _, m in history) - cost(new[0])
    p = plan(history, new, budget=minimum + MAX, policy="truncate")
    assert p.dropped == ["m1", "m2", "n1"] and p.included == ["n2"] and p.prompt_tokens == minimum


def test_truncate_never_drops_system_messages():
    history = stored(user("m1", "a"), system("m2", "Use metric units."), assistant("m3", "b"))
    full = plan(history, NEW).prompt_tokens
    p = plan(history, NEW, budget=full + MAX - cost(history[0][1]) - 1, policy="truncate")
    assert p.dropped == ["m1", "m3"] and ids(p.messages) == [None, "m2", "n1"]


TOOL_HISTORY = stored(
    user("m1", "What is the weather in Paris and Rome?"),
    assistant("m2", None, "c1", "c2"),
    tool("m3", "c1", "Sunny"),
    tool("m4", "c2", "Rainy"),
    assistant("m5", "Sunny in Paris, rainy in Rome."),
)


def test_truncate_drops_a_tool_call_together_with_its_results():
    m = dict(TOOL_HISTORY)
    full = plan(TOOL_HISTORY, NEW).prompt_tokens
    assert plan(TOOL_HISTORY, NEW, budget=full + MAX - cost(m[1]), policy="truncate").dropped == ["m1"]
    # One token more to shed: the call and both its results go as one unit.
    p = plan(TOOL_HISTORY, NEW, budget=full + MAX - cost(m[1]) - 1, policy="truncate")
    assert p.dropped == ["m1", "m2", "m3", "m4"] and p.included == ["m5", "n1"]
    assert p.prompt_tokens == full - sum(cost(x) for x in (m[1], m[2], m[3], m[4]))


def test_truncate_keeps_the_call_a_newest_tool_result_answers():
    new = [tool("n1", "c2", "Rainy")]
    history = stored(user("m1", "What is the weather?"), assistant("m2", None, "c1", "c2"), tool("m3", "c1", "Sunny"))
    full = plan(history, new).prompt_tokens
    p = plan(history, new, budget=full + MAX - 1, policy="truncate")
    assert p.dropped == ["m1"] and p.included == ["m2", "m3", "n1"]
    with pytest.raises(TokenBudgetExceeded) as e:  # the call and its results are the newest message's unit
        plan(history, new, budget=full + MAX - cost(history[0][1]) - 1, policy="truncate")
    assert e.value.details["prompt_tokens"] == full - cost(history[0][1])


def test_truncate_drops_a_leading_tool_result_whose_call_is_not_in_the_prompt():
    # The summary covers the call (seq 2) but not its results.
    p = plan(
        TOOL_HISTORY,
        NEW,
        summary=Summary(content="Asked for the weather.", up_to_seq=2),
        budget=10_000,
        policy="truncate",
    )
    assert p.dropped == ["m3", "m4"] and p.included == ["m5", "n1"]
    # A budget alone does not make the builder edit the conversation.
    p = plan(TOOL_HISTORY, NEW, summary=Summary(content="Asked for the weather.", up_to_seq=2), budget=10_000)
    assert p.included == ["m3", "m4", "m5", "n1"]


# --- adaptive --------------------------------------------------------------------------------

RESERVE = 4  # less than any message here costs, so summarising one message frees room


def test_adaptive_changes_nothing_when_it_fits():
    history = conversation(4)
    full = plan(history, NEW).prompt_tokens
    p = plan(history, NEW, budget=full + MAX, policy="adaptive", summary_reserve=RESERVE)
    assert p.to_summarize == [] and p.dropped == [] and p.prompt_tokens == full and p.summary_up_to_seq is None


def test_adaptive_summarises_the_fewest_oldest_messages_with_room_for_the_summary():
    history = conversation(4)
    m = dict(history)
    full = plan(history, NEW).prompt_tokens

    budget = full - cost(m[1]) + RESERVE + MAX
    p = plan(history, NEW, budget=budget, policy="adaptive", summary_reserve=RESERVE)
    assert p.to_summarize == [m[1]] and p.summary_up_to_seq == 1
    assert ids(p.messages) == [None, "m2", "m3", "m4", "n1"] and p.included == ["m2", "m3", "m4", "n1"]
    assert p.dropped == []
    assert p.prompt_tokens == full - cost(m[1]) == prompt_tokens(TOK, p.messages, None)

    p = plan(history, NEW, budget=budget - 1, policy="adaptive", summary_reserve=RESERVE)
    assert p.to_summarize == [m[1], m[2]] and p.summary_up_to_seq == 2
    assert p.prompt_tokens == full - cost(m[1]) - cost(m[2])


def test_adaptive_summarises_a_tool_call_with_its_results():
    m = dict(TOOL_HISTORY)
    full = plan(TOOL_HISTORY, NEW).prompt_tokens
    p = plan(
        TOOL_HISTORY, NEW, budget=full - cost(m[1]) + RESERVE + MAX - 1, policy="adaptive", summary_reserve=RESERVE
    )
    assert ids(p.to_summarize) == ["m1", "m2", "m3", "m4"] and p.summary_up_to_seq == 4
    assert p.included == ["m5", "n1"]


def test_adaptive_summarises_a_prefix_even_when_units_interleave():
    # A result posted after an unrelated message: summarising the call must take that message too,
    # or a summary up to the result's seq would hide it.
    history = stored(assistant("m1", None, "c1"), user("m2", "meanwhile"), tool("m3", "c1", "done"), user("m4", "next"))
    m = dict(history)
    full = plan(history, NEW).prompt_tokens
    p = plan(
        history, NEW, budget=full - cost(m[1]) - cost(m[3]) + RESERVE + MAX, policy="adaptive", summary_reserve=RESERVE
    )
    assert ids(p.to_summarize) == ["m1", "m2", "m3"] and p.summary_up_to_seq == 3


def test_adaptive_counts_the_old_summary_as_replaced_by_the_new_one():
    history = conversation(6)
    m = dict(history)
    old = Summary(content="Earlier they talked about cats.", up_to_seq=2)
    full = plan(history, NEW, summary=old).prompt_tokens
    old_cost = cost(summary_message(old.content))
    # Dropping the old summary and m3 makes room for a new summary.
    p = plan(
        history,
        NEW,
        summary=old,
        budget=full - old_cost - cost(m[3]) + RESERVE + MAX,
        policy="adaptive",
        summary_reserve=RESERVE,
    )
    assert p.to_summarize == [m[3]] and p.summary_up_to_seq == 3
    assert ids(p.messages) == [None, "m4", "m5", "m6", "n1"]
    assert p.prompt_tokens == full - old_cost - cost(m[3]) == prompt_tokens(TOK, p.messages, None)


def test_adaptive_refuses_when_summarising_all_history_is_not_enough():
    history = conversation(2)
    new = [user("n1", "a long message " * 40), user("n2", "short")]
    full = plan(history, new).prompt_tokens
    budget = full - cost(history[0][1]) - cost(history[1][1]) + MAX - 1
    with pytest.raises(TokenBudgetExceeded) as e:
        plan(history, new, budget=budget, policy="adaptive", summary_reserve=RESERVE)
    assert e.value.details["budget"] == budget
    assert e.value.details["prompt_tokens"] == full - cost(history[0][1]) - cost(history[1][1])
    # ...where truncate may drop the older message of the request.
    assert plan(history, new, budget=budget, policy="truncate").dropped == ["m1", "m2", "n1"]


# --- every policy ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [None, "truncate", "adaptive"])
def test_when_even_the_system_messages_and_newest_message_do_not_fit_it_refuses(policy):
    history = conversation(4)
    new = [user("n1", "the newest message")]
    minimum = prompt_tokens(TOK, [system(None, "Be brief."), new[0]], None)
    assert plan(history, new, budget=minimum + MAX, policy="truncate").included == ["n1"]
    with pytest.raises(TokenBudgetExceeded) as e:
        plan(history, new, budget=minimum + MAX - 1, policy=policy)
    assert e.value.details == {"prompt_tokens": minimum, "max_tokens": MAX, "budget": minimum + MAX - 1}


def test_to_openai_renders_chat_completions_messages():
    image = ImagePart(image_url=ImageUrl(url="https://example.com/cat.png"))
    messages = [
        system(None, "Be brief."),
        ContextMessage(id="m1", role="user", content=[TextPart(text="What is this?"), image], name="bob"),
        assistant("m2", None, "c1"),
        tool("m3", "c1", "a cat"),
    ]
    assert to_openai(messages) == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            ],
            "name": "bob",
        },
        {
            "role": "assistant",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q":"c1"}'}}],
        },
        {"role": "tool", "content": "a cat", "tool_call_id": "c1"},
    ]
    msgspec.json.encode(to_openai(messages))  # JSON-ready


# --- property --------------------------------------------------------------------------------

words = st.text(st.sampled_from("abc xyz. 42"), max_size=30)


@st.composite
def conversations(draw):
    """A stored history (some turns with tool calls), a summary maybe, and a request's new messages."""
    out: list[ContextMessage] = []
    n = 0

    def next_id() -> str:
        nonlocal n
        n += 1
        return f"m{n}"

    for kind in draw(st.lists(st.sampled_from(["user", "assistant", "calls", "system", "orphan"]), max_size=14)):
        if kind == "calls":
            calls = [f"c{n}_{k}" for k in range(draw(st.integers(1, 3)))]
            out.append(assistant(next_id(), draw(st.none() | words), *calls))
            out += [tool(next_id(), c, draw(words)) for c in calls]
        elif kind == "orphan":
            out.append(tool(next_id(), "nowhere", draw(words)))
        elif kind == "system":
            out.append(system(next_id(), draw(words)))
        else:
            out.append(ContextMessage(id=next_id(), role=kind, content=draw(words)))
    history = stored(*out)
    summary = draw(st.none() | st.builds(Summary, content=words, up_to_seq=st.integers(0, len(history))))
    calls = [c["id"] for m in out for c in m.tool_calls or ()]
    new = []
    for i in range(draw(st.integers(1, 3))):
        new_id = draw(st.sampled_from([None, f"n{i}"]))
        role = draw(st.sampled_from(["user", "assistant", "tool"] if calls else ["user", "assistant"]))
        call = draw(st.sampled_from(calls)) if role == "tool" else None
        new.append(ContextMessage(id=new_id, role=role, content=draw(words), tool_call_id=call))
    return history, summary, new


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations(), st.one_of(st.none(), st.text(max_size=20)), st.integers(0, 400))
def test_a_truncate_plan_fits_keeps_the_newest_message_and_the_order_and_accounts_for_every_message(
    conv, situation, budget
):
    history, summary, new = conv
    try:
        p: ContextPlan = plan(history, new, budget=budget, policy="truncate", situation=situation, summary=summary)
    except TokenBudgetExceeded as e:
        assert e.details["prompt_tokens"] + MAX > budget
        return
    assert p.prompt_tokens + MAX <= budget
    assert p.prompt_tokens == prompt_tokens(TOK, p.messages, None)
    assert p.messages[-1] is new[-1]
    # The prompt keeps the conversation's order.
    order = {id(m): i for i, m in enumerate([m for _, m in history] + new)}
    positions = [order[id(m)] for m in p.messages if id(m) in order]
    assert positions == sorted(positions)
    # Every stored message the summary does not cover is either in or out.
    covered = summary.up_to_seq if summary else 0
    expected = [m.id for s, m in history if s > covered or m.role == "system"] + [m.id for m in new if m.id]
    assert sorted(p.included + p.dropped) == sorted(expected)
    assert set(p.included).isdisjoint(p.dropped)
    # No tool result without its call; system messages are never dropped.
    answered: set[str] = set()
    for m in p.messages[:-1]:
        answered |= {c["id"] for c in m.tool_calls or ()}
        if m.role == "tool":
            assert m.tool_call_id in answered
    last = new[-1]
    if last.role == "tool":  # the newest message keeps the call it answers, unless a summary stands for it
        caller = next(s for s, m in history if last.tool_call_id in {c["id"] for c in m.tool_calls or ()})
        assert caller <= (summary.up_to_seq if summary else 0) or dict(history)[caller] in p.messages
    assert not any(m.role == "system" for _, m in history if m.id in p.dropped)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations(), st.integers(0, 400))
def test_an_adaptive_plan_fits_with_its_reserve_and_summarises_a_whole_prefix(conv, budget):
    history, summary, new = conv
    try:
        p = plan(history, new, budget=budget, policy="adaptive", summary=summary, summary_reserve=RESERVE)
    except TokenBudgetExceeded:
        return
    if not p.to_summarize:
        assert p.prompt_tokens + MAX <= budget
        return
    assert p.prompt_tokens + RESERVE + MAX <= budget
    assert p.prompt_tokens == prompt_tokens(TOK, p.messages, None)
    # After the summary, re-planning with it covers exactly what was summarised.
    summarised = {m.id for m in p.to_summarize}
    covered = summary.up_to_seq if summary else 0
    assert {m.id for s, m in history if covered < s <= p.summary_up_to_seq and m.role != "system"} == summarised
    again = plan(history, new, summary=Summary(content="x", up_to_seq=p.summary_up_to_seq))
    assert ids(again.messages)[2:] == ids(p.messages)[1:]


def test_truncate_drops_a_tool_result_whose_call_is_not_in_the_prompt_wherever_it_is():
    history = stored(
        assistant("m1", None, "c1"), tool("m2", "c1"), user("m3", "next"), tool("m4", "c1", "late"), tool("m5", "c9")
    )
    p = plan(history, NEW, summary=Summary(content="A lookup.", up_to_seq=1), budget=10_000, policy="truncate")
    assert p.dropped == ["m2", "m4", "m5"] and p.included == ["m3", "n1"]
