"""The OpenAI protocol's use case (`Completions`) on the memory adapters: a resent conversation stores only what is
new, a retry after the answer is stored is answered from it, a conversation that parts from the stored one amends
it."""

from __future__ import annotations

import msgspec
import pytest

from shared.app.completions import Answer, Replay
from shared.bootstrap import Parley
from shared.domain.errors import NotFound
from shared.domain.openai_wire import ChatCompletionRequest
from shared.domain.wire import SessionCreate
from tests.app.conftest import Deployment


def conversation(*turns: tuple[str, str]) -> ChatCompletionRequest:
    return msgspec.convert({"messages": [{"role": r, "content": c} for r, c in turns]}, ChatCompletionRequest)


async def stored(parley: Parley, sid: str) -> list[tuple[str, str]]:
    messages = [msgspec.json.decode(raw) for raw in await parley.sessions.messages("acme", sid, 100, 0)]
    return [(m["role"], m["content"]) for m in messages]


async def answered(parley: Parley, d: Deployment, sid: str, outcome: Answer | Replay) -> str:
    assert isinstance(outcome, Answer)
    await d.settle()
    return str(
        msgspec.json.decode(await parley.chats.wait(sid, outcome.job_id, 10))["choices"][0]["message"]["content"]
    )


async def test_a_resent_conversation_stores_each_message_once(parley: Parley) -> None:
    d = Deployment(parley)
    session, _ = await parley.sessions.create("acme", SessionCreate())
    sid = session.id
    first = await parley.completions.complete("acme", sid, conversation(("user", "hi")))
    assert await answered(parley, d, sid, first) == "You said: hi"
    second = await parley.completions.complete(
        "acme", sid, conversation(("user", "hi"), ("assistant", "You said: hi"), ("user", "more"))
    )
    assert await answered(parley, d, sid, second) == "You said: more"
    assert await stored(parley, sid) == [
        ("user", "hi"),
        ("assistant", "You said: hi"),
        ("user", "more"),
        ("assistant", "You said: more"),
    ]
    assert len(await parley.chats.list("acme", sid, 10, 0)) == 2


async def test_a_retry_after_the_answer_is_stored_is_answered_from_it(parley: Parley) -> None:
    d = Deployment(parley)
    session, _ = await parley.sessions.create("acme", SessionCreate())
    first = await parley.completions.complete("acme", session.id, conversation(("user", "hi")))
    await answered(parley, d, session.id, first)
    again = await parley.completions.complete("acme", session.id, conversation(("user", "hi")))
    assert isinstance(again, Replay) and isinstance(first, Answer)
    assert again.completion.id == first.job_id
    assert again.completion.choices[0].message.content == "You said: hi"
    assert len(await parley.chats.list("acme", session.id, 10, 0)) == 1  # nothing ran


async def test_a_conversation_that_parts_from_the_stored_one_amends_it(parley: Parley) -> None:
    d = Deployment(parley)
    session, _ = await parley.sessions.create("acme", SessionCreate())
    sid = session.id
    await answered(parley, d, sid, await parley.completions.complete("acme", sid, conversation(("user", "hi"))))
    edited = conversation(
        ("user", "hi"), ("assistant", "You said: h"), ("user", "go on")
    )  # the client stopped the answer early
    assert await answered(parley, d, sid, await parley.completions.complete("acme", sid, edited)) == "You said: go on"
    assert await stored(parley, sid) == [
        ("user", "hi"),
        ("assistant", "You said: h"),
        ("user", "go on"),
        ("assistant", "You said: go on"),
    ]


async def test_a_missing_or_deleted_session_is_not_found(parley: Parley) -> None:
    session, _ = await parley.sessions.create("acme", SessionCreate())
    with pytest.raises(NotFound):
        await parley.completions.complete("globex", session.id, conversation(("user", "hi")))
    await parley.sessions.delete("acme", session.id, expected=None)
    with pytest.raises(NotFound):
        await parley.completions.complete("acme", session.id, conversation(("user", "hi")))
