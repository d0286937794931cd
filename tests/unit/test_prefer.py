"""`Prefer: respond-async` is a preference of the header (RFC 7240), not text anywhere in it."""

from __future__ import annotations

import pytest

from services.api.chats import _respond_async


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
