"""What the end-to-end modules share: a module's own stack of real processes, and the small HTTP helpers."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from shared.adapters.redis.server import RedisServer
from tests.support import ParleyProcess, auth, wait_ready

ACME = auth("acme")
GLOBEX = auth("globex")
JSON = {"Content-Type": "application/json"}
UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")


@dataclass
class Stack:
    redis: RedisServer
    api: ParleyProcess
    worker: ParleyProcess


@contextmanager
def running_stack(root: Path, env: dict[str, str]) -> Iterator[Stack]:
    """A redis-server of the module's own (other modules flush the session-wide one), one `parley api` and one
    `parley worker`, stopped in reverse order whatever happens."""
    server = RedisServer(root / "redis").start()
    procs: list[ParleyProcess] = []
    try:
        api = ParleyProcess("api", server.url, root, env)
        procs.append(api)
        api.start()
        worker = ParleyProcess("worker", server.url, root, env)
        procs.append(worker)
        worker.start()
        wait_ready(api.url)
        yield Stack(server, api, worker)
    finally:
        for p in reversed(procs):
            p.stop()
        server.stop()


def create(c: httpx.Client, body: dict[str, Any] | None = None, headers: dict[str, str] = ACME) -> dict[str, Any]:
    resp = c.post("/sessions", json=body or {}, headers=headers)
    assert resp.status_code == 201, resp.text
    return resp.json()


def add_message(c: httpx.Client, sid: str, body: dict[str, Any], headers: dict[str, str] = ACME) -> dict[str, Any]:
    resp = c.post(f"/sessions/{sid}/messages", json=body, headers=headers)
    assert resp.status_code == 201, resp.text
    return resp.json()


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """The one error shape: {"error": {status, code, message, details?}} with status == the HTTP status."""
    assert resp.status_code == status, f"expected {status} {code}, got {resp.status_code}: {resp.text}"
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"status", "code", "message"} <= set(err) <= {"status", "code", "message", "details"}, err
    assert err["status"] == status and type(err["status"]) is int
    assert isinstance(err["code"], str) and err["code"]
    if code is not None:
        assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    return err


def ts(text: str) -> datetime:
    assert RFC3339_UTC.match(text), text
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def tool(name: str, description: str = "does a thing") -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        },
    }


def unknown_id() -> str:
    """A well-formed UUIDv7 no session has."""
    return str(uuid.UUID(int=uuid.uuid4().int & ~(0xF << 76) | (0x7 << 76)))
