"""Parley's own endpoints, read by the tests to check what a client did (never through the client under test)."""

from __future__ import annotations

import time
import typing
import uuid
from typing import Any

import httpx
import pytest

from shared.domain.events import Event
from tests.support import TENANTS, auth

ACME = auth("acme")
KEY = TENANTS["acme"]
EVENT_NAMES = [cls.__name__ for cls in typing.get_args(Event)]
"""Every event type: the `event:` names of `/events`, which an EventSource must listen for one by one."""


def marker() -> str:
    return f"m{uuid.uuid4().hex[:8]}"


def create(c: httpx.Client, **body: Any) -> str:
    r = c.post("/sessions", json=body, headers=ACME)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def stored(c: httpx.Client, sid: str) -> list[dict[str, Any]]:
    """The session's messages as Parley stores them (read-your-writes)."""
    r = c.get(f"/sessions/{sid}/messages", params={"limit": 1000}, headers=ACME)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def events(c: httpx.Client, sid: str) -> list[dict[str, Any]]:
    r = c.get(f"/sessions/{sid}/events", params={"limit": 1000}, headers=ACME)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def say(c: httpx.Client, sid: str, text: str) -> dict[str, Any]:
    r = c.post(f"/sessions/{sid}/messages", json={"role": "user", "content": text}, headers=ACME)
    assert r.status_code == 201, r.text
    return r.json()


def job_ended(c: httpx.Client, sid: str, job: str, timeout: float = 30.0) -> dict[str, Any]:
    """The chat job once it has ended (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        r = c.get(f"/sessions/{sid}/chats/{job}", headers=ACME)
        assert r.status_code == 200, r.text
        if r.json()["status"] not in ("queued", "running"):
            return r.json()
        if time.monotonic() > deadline:
            pytest.fail(f"chat {job} still {r.json()['status']} after {timeout:.0f}s")
        time.sleep(0.05)
