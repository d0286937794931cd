"""Upcasters: old event payloads brought to today's shape, so an old log still replays.

The log is never rewritten: each entry keeps the schema it was written under, and
readers upgrade the payload one schema step at a time as they read it. A change of
an event's shape adds `SCHEMA_VERSION` and one function here per changed type;
types not listed for a step are unchanged by it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shared.domain.events import SCHEMA_VERSION

Payload = dict[str, Any]


def _chat_requested_1(data: Payload) -> Payload:
    """Schema 2 dropped `up_to_seq`: the worker reads the conversation the fold counted."""
    data.pop("up_to_seq", None)
    return data


def _chat_failed_1(data: Payload) -> Payload:
    """Schema 2 nests `code` and `message` under `error`, the shape of the chat job's `error`."""
    return {"job_id": data["job_id"], "error": {"code": data["code"], "message": data["message"]}}


UPCASTERS: dict[tuple[str, int], Callable[[Payload], Payload]] = {
    ("ChatRequested", 1): _chat_requested_1,
    ("ChatFailed", 1): _chat_failed_1,
}
"""(event type, schema it was written under) → the step to the next schema."""


def upcast(event_type: str, schema: int, data: Payload) -> Payload:
    if schema > SCHEMA_VERSION:
        raise ValueError(f"{event_type} was written under schema {schema}, newer than this code's {SCHEMA_VERSION}")
    while schema < SCHEMA_VERSION:
        if step := UPCASTERS.get((event_type, schema)):
            data = step(data)
        schema += 1
    return data
