"""The chat use cases on the memory adapters: a request is decided and queued, the job runs on the offline model
(`ChatRunner`), its answer streams through the chunk stream and is recorded once; multitask policies, cancelling,
the tenant's limits, a failing model."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

import msgspec
import pytest

from shared import bootstrap
from shared.app.ports import Completion, Delta, ModelError, ModelRequest
from shared.app.service import Idempotency
from shared.bootstrap import Parley
from shared.domain.errors import ChatInProgress, ChatNotActive, ChatUnanswered, QuotaExceeded, RateLimited
from shared.domain.wire import ChatRequest, MessageCreate, SessionCreate
from tests.app.conftest import Deployment, settings


def ask(text: str, **fields: object) -> ChatRequest:
    return ChatRequest(messages=[MessageCreate(role="user", content=text)], **fields)  # type: ignore[arg-type]


def answer_text(raw: bytes) -> str:
    return str(msgspec.json.decode(raw)["choices"][0]["message"]["content"])


async def job(parley: Parley, sid: str, job_id: str) -> dict:
    return msgspec.json.decode(await parley.chats.job("acme", sid, job_id))


async def new_session(parley: Parley, **fields: object) -> str:
    session, _ = await parley.sessions.create("acme", SessionCreate(**fields))  # type: ignore[arg-type]
    return session.id


async def test_a_chat_is_requested_run_on_the_model_and_answered(parley: Parley) -> None:
    d = Deployment(parley)
    sid = await new_session(parley)
    requested = await parley.chats.request("acme", sid, ask("hello there"))
    assert requested.job.status == "queued" and requested.last_message_id is not None
    assert (await job(parley, sid, requested.job.id))["status"] == "queued"
    await d.settle()
    answer = await parley.chats.wait(sid, requested.job.id, 10)
    assert answer_text(answer) == "You said: hello there"
    record = await job(parley, sid, requested.job.id)
    assert record["status"] == "succeeded" and record["attempts"] == 1 and record["context"]["prompt_tokens"] > 0
    messages = [msgspec.json.decode(m) for m in await parley.sessions.messages("acme", sid, 10, 0)]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "hello there"),
        ("assistant", "You said: hello there"),
    ]
    [listed] = await parley.chats.list("acme", sid, 10, 0)
    assert msgspec.json.decode(listed)["id"] == requested.job.id
    usage = await parley.tenancy.usage("acme", 1)
    assert usage.days[0].chats == 1 and usage.days[0].prompt_tokens == record["context"]["prompt_tokens"]


async def test_the_answer_streams_chunk_by_chunk_to_a_follower(parley: Parley) -> None:
    d = Deployment(parley)
    sid = await new_session(parley)
    requested = await parley.chats.request("acme", sid, ask("one two three four five", stream=True))
    kinds: list[str] = []
    text = ""

    async def follow() -> None:
        nonlocal text
        async with contextlib.aclosing(parley.chats.follow_chunks(sid, requested.job.id, keepalive_s=30)) as batches:
            async for batch in batches:
                for _, kind, data in batch:
                    kinds.append(kind)
                    if kind == "chunk":
                        text += msgspec.json.decode(data)["choices"][0]["delta"].get("content") or ""
                    if kind in ("done", "error"):
                        return

    following = asyncio.ensure_future(follow())
    await asyncio.sleep(0.01)
    await d.settle()
    await asyncio.wait_for(following, 10)
    assert kinds[-1] == "done" and kinds.count("chunk") > 2
    assert text == "You said: one two three four five"
    entries = await parley.jobs.streamed(sid, requested.job.id)
    assert await parley.chats.was_last(sid, requested.job.id, entries[-1][0])
    assert await parley.chats.past_the_end(sid, requested.job.id, "99999999999999-0")
    assert not await parley.chats.past_the_end(sid, requested.job.id, entries[0][0])


async def test_chats_of_one_session_run_one_after_another(parley: Parley) -> None:
    d = Deployment(parley)
    sid = await new_session(parley)
    first = await parley.chats.request("acme", sid, ask("first"))
    second = await parley.chats.request("acme", sid, ask("second"))
    assert parley.memory is not None and list(parley.memory.queued) == [first.job.id]  # the second waits its turn
    await d.settle()  # the projector queues the second when the first ends
    assert answer_text(await parley.chats.wait(sid, first.job.id, 10)) == "You said: first"
    assert answer_text(await parley.chats.wait(sid, second.job.id, 10)) == "You said: second"
    contents = [msgspec.json.decode(m)["content"] for m in await parley.sessions.messages("acme", sid, 10, 0)]
    assert contents == ["first", "second", "You said: first", "You said: second"]


async def test_the_multitask_policies_reject_and_interrupt(parley: Parley) -> None:
    d = Deployment(parley)
    strict = await new_session(parley, multitask="reject")
    await parley.chats.request("acme", strict, ask("a"))
    with pytest.raises(ChatInProgress):
        await parley.chats.request("acme", strict, ask("b"))
    eager = await new_session(parley, multitask="interrupt")
    old = await parley.chats.request("acme", eager, ask("old"))
    new = await parley.chats.request("acme", eager, ask("new"))
    assert new.cancelled == [old.job.id]
    with pytest.raises(ChatUnanswered) as refused:
        await parley.chats.wait(eager, old.job.id, 10)
    assert refused.value.code == "cancelled"
    await d.settle()
    assert (await job(parley, eager, old.job.id))["status"] == "cancelled"
    assert answer_text(await parley.chats.wait(eager, new.job.id, 10)) == "You said: new"


async def test_a_cancelled_chat_ends_and_stays_ended(parley: Parley) -> None:
    d = Deployment(parley)
    sid = await new_session(parley)
    requested = await parley.chats.request("acme", sid, ask("never mind"))
    record = msgspec.json.decode(await parley.chats.cancel("acme", sid, requested.job.id))
    assert record["status"] == "cancelled"
    with pytest.raises(ChatUnanswered):
        await parley.chats.wait(sid, requested.job.id, 10)
    with pytest.raises(ChatNotActive):
        await parley.chats.cancel("acme", sid, requested.job.id)
    await d.settle()  # its queued run finds it ended and does nothing
    assert (await job(parley, sid, requested.job.id))["status"] == "cancelled"
    assert [msgspec.json.decode(m)["role"] for m in await parley.sessions.messages("acme", sid, 10, 0)] == ["user"]


async def test_a_job_run_again_answers_once(parley: Parley) -> None:
    d = Deployment(parley)
    sid = await new_session(parley)
    requested = await parley.chats.request("acme", sid, ask("once"))
    await d.settle()
    assert await parley.chat_runner().run("acme", sid, requested.job.id) == "ended"
    await parley.queue.enqueue("acme", sid, [requested.job.id])
    await d.settle()
    assert len(await parley.sessions.messages("acme", sid, 10, 0)) == 2
    assert (await job(parley, sid, requested.job.id))["attempts"] == 1


async def test_an_idempotent_request_records_one_job(parley: Parley) -> None:
    sid = await new_session(parley)
    idem = Idempotency.of("k", "POST", f"/sessions/{sid}/chat", b"x")
    first = await parley.chats.request("acme", sid, ask("hi"), idem)
    again = await parley.chats.request("acme", sid, ask("hi"), idem)
    assert again.job.id == first.job.id
    assert len(await parley.chats.list("acme", sid, 10, 0)) == 1
    assert (await parley.limits.take("acme", "chats", "probe", 60)).held == 2  # the replay gave its slot back


async def test_concurrent_chats_are_limited_per_tenant_until_one_ends() -> None:
    parley = await bootstrap.in_memory(settings(tenant_concurrent_chats=1))
    d = Deployment(parley)
    one, two = await new_session(parley), await new_session(parley)
    first = await parley.chats.request("acme", one, ask("a"))
    with pytest.raises(RateLimited):
        await parley.chats.request("acme", two, ask("b"))
    await d.settle()  # the projector gives the slot back when the chat ends
    await parley.chats.wait(one, first.job.id, 10)
    await parley.chats.request("acme", two, ask("b"))


async def test_a_retried_request_is_replayed_even_when_the_tenant_is_at_its_chat_limit() -> None:
    """The retry of an acknowledged chat (its answer was lost) must get that chat back, not 429: it asks for no
    new slot."""
    parley = await bootstrap.in_memory(settings(tenant_concurrent_chats=1))
    sid = await new_session(parley)
    idem = Idempotency.of("k", "POST", f"/sessions/{sid}/chat", b"x")
    first = await parley.chats.request("acme", sid, ask("hi"), idem)
    again = await parley.chats.request("acme", sid, ask("hi"), idem)  # the one slot is the first request's
    assert again.job.id == first.job.id
    assert len(await parley.chats.list("acme", sid, 10, 0)) == 1


async def test_chat_tokens_per_day_are_a_quota() -> None:
    parley = await bootstrap.in_memory(settings(tenant_chat_tokens_per_day=1))
    d = Deployment(parley)
    sid = await new_session(parley)
    await parley.chats.request("acme", sid, ask("spend"))
    await d.settle()
    parley.chats._tokens.clear()  # the one-second cache of today's tokens
    with pytest.raises(QuotaExceeded):
        await parley.chats.request("acme", sid, ask("more"))


class Broken:
    """A model that fails for good, as a provider does after its retries."""

    @property
    def models(self) -> list[str]:
        return ["broken"]

    async def stream(self, request: ModelRequest) -> AsyncGenerator[Delta | Completion, None]:
        raise ModelError("model_unavailable", "the model is down")
        yield Delta()  # pragma: no cover - makes this an async generator


async def test_a_model_that_fails_fails_the_chat(parley: Parley) -> None:
    d = Deployment(parley, provider=Broken())
    sid = await new_session(parley)
    requested = await parley.chats.request("acme", sid, ask("hi"))
    await d.settle()
    with pytest.raises(ChatUnanswered) as failed:
        await parley.chats.wait(sid, requested.job.id, 10)
    assert failed.value.code == "model_unavailable"
    record = await job(parley, sid, requested.job.id)
    assert record["status"] == "failed" and record["error"]["code"] == "model_unavailable"


async def test_a_budget_chat_on_a_long_session_reads_about_what_the_budget_holds(parley: Parley) -> None:
    """With a `truncate` budget holding about 300 of 3,000 messages, the chat reads from the newest backwards a
    first page, then what the budget has left, then one page more: a few hundred messages, never the session. The
    prompt is the newest messages that fit, as if everything had been read."""
    d = Deployment(parley)

    def note(i: int) -> MessageCreate:
        return MessageCreate(role="user", content=f"note {i:04d} " + "word " * 20)

    async def prompt_tokens(notes: int) -> int:
        small = await new_session(parley)
        for i in range(notes):
            await parley.sessions.add_message("acme", small, note(i))
        requested = await parley.chats.request("acme", small, ask("and now?"))
        await d.settle()
        return int((await job(parley, small, requested.job.id))["context"]["prompt_tokens"])

    per_note = await prompt_tokens(2) - await prompt_tokens(1)
    sid = await new_session(parley, token_budget=per_note * 300 + 20, context_overflow="truncate")
    for i in range(3_000):
        await parley.sessions.add_message("acme", sid, note(i))
    requested = await parley.chats.request("acme", sid, ask("and now?"))
    await d.settle()
    ctx = (await job(parley, sid, requested.job.id))["context"]
    total = 3_000 + 1  # and the question
    first_dropped, last_dropped = ctx["dropped_range"]
    read = total - last_dropped
    assert first_dropped == 1 and 300 < read < 300 * 1.25 + 2 * 100, read
    newest = await parley.sessions.messages("acme", sid, len(ctx["included"]), total - len(ctx["included"]))
    assert ctx["included"] == [msgspec.json.decode(m)["id"] for m in newest]  # the newest, exactly those that fit
    assert 290 < len(ctx["included"]) <= 301


class Endless:
    """A model that streams until it is closed, counting what it sent: a superseded attempt must stop reading it."""

    def __init__(self) -> None:
        self.sent = 0
        self.closed = asyncio.Event()

    @property
    def models(self) -> list[str]:
        return ["endless"]

    async def stream(self, request: ModelRequest) -> AsyncGenerator[Delta | Completion, None]:
        try:
            while True:
                self.sent += 1
                yield Delta(content="la ")
                await asyncio.sleep(0.001)
        finally:
            self.closed.set()


async def test_a_superseded_attempt_stops_reading_its_model(parley: Parley) -> None:
    model = Endless()
    d = Deployment(parley)
    sid = await new_session(parley)
    requested = await parley.chats.request("acme", sid, ask("sing"))
    await d.project()
    running = asyncio.create_task(parley.chat_runner(model).run("acme", sid, requested.job.id))
    while model.sent < 5:
        await asyncio.sleep(0.001)
    await parley.jobs.mark_running(sid, requested.job.id)  # its lease lapsed: a later attempt starts
    assert await asyncio.wait_for(running, 10) == "superseded"
    assert model.closed.is_set() and model.sent < 50  # the stream was closed at the refusal, not read on


async def test_a_synchronous_chat_of_a_session_deleted_while_its_model_streams_hears_the_end(
    parley: Parley, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delete writes the stream's `error` while the worker still streams; the worker's next chunks are refused
    (the end stays the last entry), so a waiter reading the last entry after them still hears `session_deleted`
    instead of waiting out its time."""
    model = Endless()
    d = Deployment(parley)
    sid = (await parley.sessions.create("acme", SessionCreate()))[0].id
    job = (await parley.chats.request("acme", sid, ChatRequest(messages=[MessageCreate(role="user", content="x")]))).job
    await d.project()
    last_entry = parley.jobs.last_entry

    async def over_the_network(session_id: str, job_id: str) -> tuple[str, str, bytes] | None:
        await asyncio.sleep(0.02)  # a Redis round trip, while the model streams on
        return await last_entry(session_id, job_id)

    monkeypatch.setattr(parley.jobs, "last_entry", over_the_network)
    running = asyncio.create_task(parley.chat_runner(model).run("acme", sid, job.id))
    waiting = asyncio.create_task(parley.chats.wait(sid, job.id, 3.0))
    while model.sent < 5:
        await asyncio.sleep(0.001)
    await parley.sessions.delete("acme", sid, None)
    await asyncio.sleep(0.05)
    await d.project()
    assert await asyncio.wait_for(running, 10) in ("superseded", "cancelled")
    with pytest.raises(ChatUnanswered) as ended:
        await waiting
    assert ended.value.code == "session_deleted"
    [(_, kind, _)] = [e for e in await parley.jobs.streamed(sid, job.id) if e[1] != "chunk"]
    assert kind == "error" and (await parley.jobs.streamed(sid, job.id))[-1][1] == "error"
