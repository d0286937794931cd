"""Headers read as their RFCs say: `Prefer: respond-async` is a preference of the header (RFC 7240), not text anywhere in
it; `Accept` negotiates an event stream (RFC 9110), case-insensitive, `q=0` meaning "not this"."""

from __future__ import annotations

import pytest

from services.api.chats import _respond_async
from services.api.params import wants_event_stream


@pytest.mark.parametrize(
    "prefer", ["respond-async", "Respond-Async", "respond-async, wait=10", "return=minimal, respond-async; x=1"]
)
def test_respond_async_is_named(prefer: str) -> None:
    assert _respond_async(prefer)


@pytest.mark.parametrize(
    "prefer", [None, "", "respond-asyncx", "notrespond-async", "wait=respond-async", "return=minimal"]
)
def test_anything_else_waits_for_the_answer(prefer: str | None) -> None:
    assert not _respond_async(prefer)


@pytest.mark.parametrize(
    "accept",
    [
        "text/event-stream",
        "TEXT/Event-Stream",
        "text/event-stream; charset=utf-8",
        "application/json;q=0.5, text/event-stream",
        "text/event-stream, */*",
        "*/*;q=0.1, text/event-stream;q=0.2",
    ],
)
def test_an_event_stream_is_wanted(accept: str) -> None:
    assert wants_event_stream(accept)


@pytest.mark.parametrize(
    "accept",
    [
        None,
        "",
        "application/json",
        "*/*",
        "text/event-stream;q=0",
        "text/event-stream;q=0.5, application/json",
        "text/plain",
    ],
)
def test_json_is_wanted(accept: str | None) -> None:
    assert not wants_event_stream(accept)
