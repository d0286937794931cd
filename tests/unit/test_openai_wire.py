"""The OpenAI wire rule, pure: message equality, the prefix digests, and which turns of a request are new."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.domain.openai_wire import (
    IGNORED,
    ChatCompletionRequest,
    Key,
    TurnPlan,
    WireRejected,
    chain,
    max_tokens_of,
    message_key,
    plan_turns,
    stored_to_read,
    to_message,
    without_situation,
)
from shared.domain.wire import FunctionCall, ImagePart, ImageUrl, Message, MessageCreate, TextPart, ToolCall

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def mc(role: str, content: Any = None, **kw: Any) -> MessageCreate:
    return MessageCreate(role=role, content=content, **kw)  # type: ignore[arg-type]


def call(id_: str, args: str, name: str = "f") -> ToolCall:
    return ToolCall(id=id_, function=FunctionCall(name=name, arguments=args))


def key(role: str, content: Any = None, **kw: Any) -> Key:
    return message_key(mc(role, content, **kw))


# -- equality -----------------------------------------------------------------------------------------------------------
def test_a_stored_message_equals_the_message_it_was_stored_from() -> None:
    sent = mc("assistant", None, tool_calls=[call("c1", '{"a": 1}')])
    stored = Message(
        id="x",
        session_id="s",
        role="assistant",
        content=None,
        name=None,
        tool_call_id=None,
        tool_calls=[call("c1", '{"a": 1}')],
        seq=3,
        created_at=NOW,
    )
    assert message_key(sent) == message_key(stored)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (key("user", "hi"), key("user", [TextPart(text="hi")])),  # one text part is its text
        (key("assistant", "", tool_calls=[call("c", "{}")]), key("assistant", None, tool_calls=[call("c", "{}")])),
        (
            key("assistant", None, tool_calls=[call("c", '{"a":1,"b":[2]}')]),
            key("assistant", None, tool_calls=[call("c", '{ "b": [2], "a": 1 }')]),
        ),
        (key("system", "s"), message_key(msgspec.structs.replace(mc("system", "s"), role="developer"))),  # type: ignore[arg-type]
        (key("user", "hi", name=None), key("user", "hi")),
        (key("assistant", "ok", tool_calls=[]), key("assistant", "ok")),
    ],
)
def test_equal_turns(a: Key, b: Key) -> None:
    assert a == b


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (key("user", "hi"), key("assistant", "hi")),
        (key("user", "hi"), key("user", "hi ")),
        (key("user", "hi"), key("user", "hi", name="bob")),
        (key("tool", "r", tool_call_id="a"), key("tool", "r", tool_call_id="b")),
        (key("assistant", None, tool_calls=[call("c1", "{}")]), key("assistant", None, tool_calls=[call("c2", "{}")])),
        (
            key("assistant", None, tool_calls=[call("c", '{"a":1}')]),
            key("assistant", None, tool_calls=[call("c", '{"a":2}')]),
        ),
        (
            key("assistant", None, tool_calls=[call("c", "not json")]),
            key("assistant", None, tool_calls=[call("c", "not  json")]),
        ),
        (key("user", [TextPart(text="a"), TextPart(text="b")]), key("user", "ab")),
        (key("user", [ImagePart(image_url=ImageUrl(url="u"))]), key("user", [ImagePart(image_url=ImageUrl(url="v"))])),
        (key("user", ""), key("user", None)),  # only an assistant's "" is null
    ],
)
def test_different_turns(a: Key, b: Key) -> None:
    assert a != b


def test_a_request_message_echoed_by_the_sdk_decodes_and_matches() -> None:
    """What `messages.append(completion.choices[0].message)` sends: refusal, annotations… ignored."""
    raw = {
        "messages": [
            {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "annotations": [],
                "audio": None,
                "function_call": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            }
        ],
        "model": "m",
    }
    req = msgspec.json.decode(json.dumps(raw).encode(), type=ChatCompletionRequest)
    assert message_key(to_message(req.messages[0], 0)) == key("assistant", None, tool_calls=[call("c1", "{}")])


def test_unsupported_content_parts_are_refused_with_their_path() -> None:
    raw = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "file", "file": {"file_id": "f"}}]}
        ]
    }
    req = msgspec.json.decode(json.dumps(raw).encode(), type=ChatCompletionRequest)
    with pytest.raises(WireRejected) as e:
        to_message(req.messages[0], 4)
    assert e.value.param == "messages[4].content[1]" and e.value.status == 422


def test_every_documented_field_of_the_sdk_is_accepted() -> None:
    import typing

    from openai.types.chat import completion_create_params as p

    documented = set(typing.get_type_hints(p.CompletionCreateParamsBase)) | {"stream"}
    assert documented <= set(ChatCompletionRequest.__struct_fields__), documented - set(
        ChatCompletionRequest.__struct_fields__
    )
    assert "user" in IGNORED and "temperature" not in IGNORED


def test_max_tokens() -> None:
    def req(**kw: Any) -> ChatCompletionRequest:
        return ChatCompletionRequest(messages=[], **kw)

    assert max_tokens_of(req(max_tokens=10, max_completion_tokens=20), None) == 20
    assert max_tokens_of(req(max_tokens=10), 5) == 10
    assert max_tokens_of(req(), None) == 4096
    assert max_tokens_of(req(), 1000) == 500


def test_without_situation() -> None:
    msgs = [mc("system", "Be brief."), mc("user", "hi")]
    assert without_situation(msgs, "Be brief.") == msgs[1:]
    assert without_situation(msgs, "Be long.") == msgs
    assert without_situation(msgs, None) == msgs
    assert without_situation([mc("system", [TextPart(text="Be brief.")])], "Be brief.") == []
    assert without_situation([mc("user", "Be brief.")], "Be brief.") == [mc("user", "Be brief.")]


# -- digests -----------------------------------------------------------------------------------------------------------------
keys_st = st.lists(
    st.tuples(
        st.sampled_from(["user", "assistant"]), st.sampled_from(["a", "b", None]), st.none(), st.none(), st.just(())
    ),
    max_size=8,
)


@given(keys_st, keys_st)
def test_equal_digests_mean_equal_prefixes(a: list[Key], b: list[Key]) -> None:
    da, db = chain(a), chain(b)
    assert len(da) == len(a) + 1
    for i in range(min(len(a), len(b)) + 1):
        assert (da[i] == db[i]) == (a[:i] == b[:i])


# -- the rule ------------------------------------------------------------------------------------------------------------------
U = [("user", f"u{i}", None, None, ()) for i in range(10)]
A = [("assistant", f"a{i}", None, None, ()) for i in range(10)]


def plan(request: list[Key], stored: list[Key]) -> Any:
    return plan_turns(request, stored[: stored_to_read(len(request), len(stored))], len(stored))


def test_rules() -> None:
    s = [U[0], A[0], U[1], A[1]]
    assert plan(s + [U[2]], s).kind == "append" and plan(s + [U[2]], s).start == 4  # whole history + new turn
    assert plan(s, s).kind == "current"  # nothing new
    assert (
        plan(s[:3], s) == plan_turns(s[:3], s, 4) and plan(s[:3], s).kind == "replay" and plan(s[:3], s).index == 3
    )  # retry
    assert plan([U[5]], s).kind == "append" and plan([U[5]], s).start == 0  # only the new turn
    assert plan(s[:1], s).kind == "append" and plan(s[:1], s).start == 0  # an older prefix: a new turn that repeats one
    assert plan([], s).kind == "current" and plan([], []).kind == "current"
    assert plan([U[0]], []).kind == "append"


def test_a_conversation_that_parts_from_the_stored_one_amends_it_instead_of_storing_it_again() -> None:
    s = [U[0], A[0], U[1], A[1]]
    cut = ("assistant", "a1 (cut off)", None, None, ())
    assert plan([U[0], A[0], U[1], cut, U[2]], s) == TurnPlan(kind="amend", at=3, edit=True, start=4)  # stopped answer
    assert plan([U[0], A[0], U[1], cut], s) == TurnPlan(kind="amend", at=3, edit=True, start=4)  # kept, nothing new
    assert plan([U[0], A[0], U[2]], s) == TurnPlan(kind="amend", at=2, edit=False, start=2)  # an edited question
    assert plan(s[:3] + [U[1]], s) == TurnPlan(
        kind="amend", at=3, edit=False, start=3
    )  # the answer dropped, asked again
    # the stored conversation holds a turn the client never had: it goes
    assert plan([U[0], A[0], U[1]], [U[0], A[0], U[1], U[2]]) == TurnPlan(kind="amend", at=3, edit=False, start=3)
    called = ("assistant", None, None, None, (("c1", "function", "f", ("json", "{}")),))
    other_call = ("assistant", None, None, None, (("c2", "function", "f", ("json", "{}")),))
    assert plan([U[0], other_call], [U[0], called]).edit is False  # tool calls differ: not an edit of that turn


def test_the_stored_conversation_is_read_no_further_than_the_request_reaches() -> None:
    assert stored_to_read(1, 3) == 2 and stored_to_read(5, 0) == 0 and stored_to_read(0, 7) == 0
    assert stored_to_read(1, 2) == 2 and stored_to_read(5, 5) == 5 and stored_to_read(5, 100) == 6
    with pytest.raises(ValueError):
        plan_turns([U[0]], [], 2)


def serve(stored: list[Key], request: list[Key]) -> Key:
    """A session: what the endpoint does with `request`, the model's answer appended as a new assistant turn."""
    p = plan(request, stored)
    if p.kind == "replay":
        return stored[p.index]
    if p.kind == "amend":
        del stored[p.at :]
        if p.edit:
            stored.append(request[p.at])
    stored.extend(request[p.start :])
    answer = ("assistant", f"answer {len(stored)}", None, None, ())
    stored.append(answer)
    return answer


@settings(max_examples=300)
@given(st.lists(st.booleans(), min_size=1, max_size=12))
def test_a_client_resending_its_history_with_retries_stores_each_turn_once(retries: list[bool]) -> None:
    stored: list[Key] = []
    client: list[Key] = []
    for i, retry in enumerate(retries):
        request = client + [("user", f"q{i}", None, None, ())]
        answer = serve(stored, request)
        if retry:  # the answer was lost: the same request again
            assert serve(stored, request) == answer
        client = request + [answer]
        assert stored == client


@settings(max_examples=300)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 8)), min_size=1, max_size=12))
def test_a_client_that_stops_answers_half_way_stores_each_turn_once(steps: list[tuple[bool, int]]) -> None:
    """ "Stop generating": the client keeps the part it got and sends its conversation on. The session then holds
    the client's conversation exactly — the cut answer as the client has it, every turn once."""
    stored: list[Key] = []
    client: list[Key] = []
    for i, (stop, kept) in enumerate(steps):
        request = client + [("user", f"q{i}", None, None, ())]
        answer = serve(stored, request)
        assert stored == request + [answer]
        client = request + [("assistant", (answer[1] or "")[:kept], None, None, ()) if stop else answer]


@settings(max_examples=300)
@given(st.lists(st.sampled_from(["hello", "yes", "again", "call f"]), min_size=1, max_size=12))
def test_a_client_sending_only_new_turns_gets_each_turn_stored(texts: list[str]) -> None:
    """Repeated texts too, except the one case a retry cannot be told apart from: the same single turn as the whole
    conversation so far (then the stored answer comes back)."""
    stored: list[Key] = []
    expected: list[Key] = []
    for t in texts:
        turn = ("user", t, None, None, ())
        before = list(stored)
        answer = serve(stored, [turn])
        if before == [turn, answer]:
            continue  # a retry of the first exchange: nothing stored
        expected += [turn, answer]
        assert stored == expected


# -- the API's comparison reads only what it must ----------------------------------------------------------------------------------
class _CountingService:
    """Just enough of SessionService for `_stored`: the read models' message pages, counting the messages read."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        self.read_count = 0
        outer = self

        class Views:
            async def messages(self, tenant: str, sid: str, limit: int, offset: int) -> Any:
                from shared.app.ports import View

                page = outer.messages[offset : offset + limit]
                outer.read_count += len(page)
                return View(1, 1, b"live", [msgspec.json.encode(m) for m in page])

        self.views = Views()

    async def read(self, session_id: str, fetch: Any) -> Any:
        return await fetch()


def _stored_message(i: int, role: str, text: str) -> Message:
    return Message(
        id=f"id-{i}", session_id="s", role=role, content=text, name=None, tool_call_id=None, seq=i + 1, created_at=NOW
    )  # type: ignore[arg-type]


async def test_a_resent_conversation_reads_only_the_messages_stored_since_the_last_call() -> None:
    from shared.app.completions import Completions

    convo = [_stored_message(i, "user" if i % 2 == 0 else "assistant", f"t{i}") for i in range(40)]
    service = _CountingService(convo)
    completions = Completions(service, None, None, "m")  # type: ignore[arg-type]
    _stored, PREFIXES = completions._stored, completions.prefixes
    keys = [message_key(m) for m in convo]

    request = keys[:38] + [("user", "new", None, None, ())]
    stored, ids = await _stored("t", "sess-prefix", 38, 0, request, chain(request))  # type: ignore[arg-type]
    assert stored == keys[:38] and ids[-1] == "id-37" and service.read_count == 38  # cold: the whole conversation
    PREFIXES.put("t", "sess-prefix", 38, chain(request)[38], "id-37", 0)

    service.read_count = 0
    request = keys[:40] + [("user", "newer", None, None, ())]
    stored, ids = await _stored("t", "sess-prefix", 40, 0, request, chain(request))  # type: ignore[arg-type]
    assert stored == keys[:40] and service.read_count == 3  # message 38 (to check its id), 39 and 40

    service.read_count = 0
    other = [("user", "something else", None, None, ())] + keys[1:40]  # a different history: the digest does not match
    stored, _ = await _stored("t", "sess-prefix", 40, 0, other, chain(other))  # type: ignore[arg-type]
    assert stored == keys[:40] and service.read_count == 40

    service.read_count = 0  # an amendment since the prefix was cached: it no longer counts
    stored, _ = await _stored("t", "sess-prefix", 40, 7, request, chain(request))  # type: ignore[arg-type]
    assert stored == keys[:40] and service.read_count == 40

    service.read_count = 0
    only_new = [("user", "only new", None, None, ())]
    stored, _ = await _stored("t", "sess-prefix", stored_to_read(1, 40), 0, only_new, chain(only_new))  # type: ignore[arg-type]
    assert stored == keys[:2] and service.read_count == 2  # a request of one turn reads two stored messages, not 40
