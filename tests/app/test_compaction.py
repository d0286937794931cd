"""Compaction on the memory adapters: a session's `compaction` says which model summarises, from what fraction of
the budget, with which instruction, keeping how many newest messages verbatim; a failed summary drops nothing and
fails the chat or truncates its prompt, as configured; `compact` runs it on demand as a job whose answer is the
summary."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import msgspec
import pytest

from shared.app.ports import Completion, Delta, ModelError, ModelRequest
from shared.bootstrap import Parley
from shared.domain.errors import ChatUnanswered
from shared.domain.events import ContextBuilt, MessageAdded, SummaryAdded
from shared.domain.wire import ChatRequest, Compaction, MessageCreate, SessionCreate, Usage
from tests.app.conftest import Deployment

WORDS = "the quick brown fox jumps over the lazy dog while the cat watches from a sunny window sill"


class Recording:
    """A model that records every request: summaries (a system instruction first) answer `SUMMARY`, chats `ok`;
    `broken_summaries`: a summary request fails (`model_unavailable`), or with "empty" answers nothing."""

    def __init__(self, broken_summaries: str | None = None) -> None:
        self.requests: list[ModelRequest] = []
        self.broken = broken_summaries

    @property
    def models(self) -> list[str]:
        return ["recording"]

    def summaries(self) -> list[ModelRequest]:
        return [r for r in self.requests if r.messages[0]["role"] == "system" and len(r.messages) == 2]

    def chats(self) -> list[ModelRequest]:
        return [r for r in self.requests if r not in self.summaries()]

    async def stream(self, request: ModelRequest) -> AsyncGenerator[Delta | Completion, None]:
        self.requests.append(request)
        summary = request in self.summaries()
        if summary and self.broken == "error":
            raise ModelError("model_unavailable", "the summariser is down")
        text = "" if summary and self.broken == "empty" else ("SUMMARY" if summary else "ok")
        usage = Usage(prompt_tokens=10, completion_tokens=1, total_tokens=11)
        yield Completion(content=text, tool_calls=None, finish_reason="stop", model=request.model, usage=usage)


async def long_session(parley: Parley, n: int = 40, **fields: object) -> str:
    sid = (await parley.sessions.create("acme", SessionCreate(context_overflow="adaptive", **fields)))[0].id  # type: ignore[arg-type]
    for i in range(n):
        role = "user" if i % 2 == 0 else "assistant"
        await parley.sessions.add_message("acme", sid, MessageCreate(role=role, content=f"{i}: {WORDS}"))
    return sid


def ask(text: str) -> ChatRequest:
    return ChatRequest(messages=[MessageCreate(role="user", content=text)], max_tokens=50)


async def events(parley: Parley, sid: str, kind: type) -> list:
    return [e for e in await parley.log.read(sid, 0, 10_000) if isinstance(e, kind)]


async def test_the_sessions_compaction_picks_model_threshold_instruction_and_verbatim_tail(parley: Parley) -> None:
    model = Recording()
    d = Deployment(parley, provider=model)
    compaction = Compaction(model="small-summariser", threshold=0.5, prompt="Be brief.", keep_last=4)
    sid = await long_session(parley, token_budget=2_000, compaction=compaction)
    stored = [e.data for e in await events(parley, sid, MessageAdded)]
    requested = await parley.chats.request("acme", sid, ask("and now?"))
    await d.settle()
    assert b'"succeeded"' in await parley.chats.job("acme", sid, requested.job.id)

    [summary_call] = model.summaries()
    assert summary_call.model == "small-summariser" and summary_call.messages[0]["content"] == "Be brief."
    [summary] = await events(parley, sid, SummaryAdded)
    assert summary.data.model == "small-summariser" and summary.data.content == "SUMMARY"
    newest = {m.id for m in stored[-4:]}
    assert newest.isdisjoint(summary.data.summarized)  # the verbatim tail stays out of the summary
    assert summary.data.summarized == [m.id for m in stored[: len(summary.data.summarized)]]
    [built] = await events(parley, sid, ContextBuilt)
    assert built.data.prompt_tokens + 50 <= 1_000  # down to half the budget, not just under it
    [chat_call] = model.chats()
    sent = [m.get("content") for m in chat_call.messages]
    assert any("SUMMARY" in str(c) for c in sent) and all(f"{m.seq - 1}: {WORDS}" in sent for m in stored[-4:])

    # without a threshold the same conversation fits the budget: nothing is summarised
    plain = await long_session(parley, token_budget=2_000)
    await parley.chats.request("acme", plain, ask("and now?"))
    await d.settle()
    assert await events(parley, plain, SummaryAdded) == []


@pytest.mark.parametrize("broken", ["error", "empty"])
async def test_a_failed_summary_drops_nothing_and_fails_or_truncates_as_configured(parley: Parley, broken: str) -> None:
    model = Recording(broken_summaries=broken)
    d = Deployment(parley, provider=model)
    failing = await long_session(parley, token_budget=800)
    requested = await parley.chats.request("acme", failing, ask("and now?"))
    await d.settle()
    with pytest.raises(ChatUnanswered) as failed:
        await parley.chats.wait(failing, requested.job.id, 5)
    assert failed.value.code == "compaction_failed"
    assert await events(parley, failing, SummaryAdded) == []
    assert len(await parley.sessions.messages("acme", failing, 100, 0)) == 41  # the request's message is kept too

    truncating = await long_session(parley, token_budget=800, compaction=Compaction(on_failure="truncate"))
    requested = await parley.chats.request("acme", truncating, ask("and now?"))
    await d.settle()
    record = msgspec.json.decode(await parley.chats.job("acme", truncating, requested.job.id))
    assert record["status"] == "succeeded" and record["context"]["dropped"]  # sent truncated
    assert await events(parley, truncating, SummaryAdded) == []
    assert len(await parley.sessions.messages("acme", truncating, 100, 0)) == 42


async def test_compact_on_demand_answers_the_summary_and_later_chats_send_it(parley: Parley) -> None:
    model = Recording()
    d = Deployment(parley, provider=model)
    sid = await long_session(parley, n=10, compaction=Compaction(keep_last=2, model="small"))  # no budget at all
    job = await parley.chats.compact("acme", sid)
    await d.settle()
    record = msgspec.json.decode(await parley.chats.job("acme", sid, job.job.id))
    assert record["status"] == "succeeded" and record["model"] == "small"
    assert record["response"]["choices"][0]["message"]["content"] == "SUMMARY"
    [summary] = await events(parley, sid, SummaryAdded)
    assert summary.data.up_to_seq == 8 and len(summary.data.summarized) == 8
    assert len(await parley.sessions.messages("acme", sid, 100, 0)) == 10  # nothing stored, nothing removed
    assert model.chats() == []  # no chat model was called

    await parley.chats.request("acme", sid, ask("go on"))
    await d.settle()
    [chat_call] = model.chats()
    sent = [str(m.get("content")) for m in chat_call.messages]
    assert any("SUMMARY" in c for c in sent) and not any(c.startswith("0: ") for c in sent)
    assert sum(c.startswith(("8: ", "9: ")) for c in sent) == 2

    broken = Recording(broken_summaries="error")
    d2 = Deployment(parley, provider=broken)
    failed = await parley.chats.compact("acme", sid)
    await d2.settle()
    record = msgspec.json.decode(await parley.chats.job("acme", sid, failed.job.id))
    assert record["status"] == "failed" and record["error"]["code"] == "compaction_failed"
    assert len(await events(parley, sid, SummaryAdded)) == 1
