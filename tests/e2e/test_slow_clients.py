"""Slow clients are timed out: 400 connections that trickle their headers or bodies, or send nothing, are
answered 408 and closed once they miss the header / body deadline, while ordinary requests keep being served.

The API here runs with 1 s deadlines (`PARLEY_HEADER_TIMEOUT_S`, `PARLEY_BODY_TIMEOUT_S`); the bound below only
says "closed by the server, not left open", it is not a speed target.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.helpers import ACME, Stack, running_stack

pytestmark = pytest.mark.slow

SLOW = 400
CLOSED_WITHIN_S = 6.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"PARLEY_HEADER_TIMEOUT_S": "1", "PARLEY_BODY_TIMEOUT_S": "1"}
    with running_stack(tmp_path_factory.mktemp("e2e-slow"), env) as stack:
        yield stack


async def trickle(
    port: int, head: bytes, step_s: float = 0.25, until_s: float = CLOSED_WITHIN_S + 2
) -> tuple[float, bytes]:
    """Send `head` a byte per `step_s`; answer (seconds until the server closed the connection, what it sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    answer = b""
    try:
        for i in range(len(head)):
            if reader.at_eof() or time.monotonic() - started > until_s:
                break
            try:
                writer.write(head[i : i + 1])
                await writer.drain()
            except ConnectionError:
                break
            try:
                answer += await asyncio.wait_for(reader.read(4096), step_s)
            except TimeoutError:
                continue
        answer += await asyncio.wait_for(reader.read(4096), until_s)
        while chunk := await asyncio.wait_for(reader.read(4096), until_s):
            answer += chunk
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
    return time.monotonic() - started, answer


async def test_trickled_headers_and_silent_connections_are_closed_while_others_are_served(stack: Stack):
    port = stack.api.port
    assert port is not None
    head = (
        b"GET /sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer acme-key\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    )
    slow = [asyncio.create_task(trickle(port, head)) for _ in range(SLOW // 2)]
    silent = [asyncio.create_task(trickle(port, b"")) for _ in range(SLOW // 2)]
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient(base_url=stack.api.url, timeout=10) as c:
        served = [(await c.get("/sessions", headers=ACME)).status_code for _ in range(20)]
    results = await asyncio.gather(*slow, *silent)
    assert served == [200] * 20
    assert all(took < CLOSED_WITHIN_S for took, _ in results), max(took for took, _ in results)
    answered = [a for _, a in results]
    assert all(a.startswith(b"HTTP/1.1 408 ") and b'"code":"request_timeout"' in a for a in answered), answered[:3]


async def test_a_trickled_body_is_answered_408_and_writes_nothing(stack: Stack):
    port = stack.api.port
    assert port is not None
    async with httpx.AsyncClient(base_url=stack.api.url, timeout=10) as c:
        sid = (await c.post("/sessions", json={}, headers=ACME)).json()["id"]
        body = b'{"role":"user","content":"' + b"x" * 100 + b'"}'
        head = (
            b"POST /sessions/%s/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer acme-key\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (sid.encode(), len(body))
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        await writer.drain()
        took, answer = await trickle_body(reader, writer, body)
        assert took < CLOSED_WITHIN_S and answer.startswith(b"HTTP/1.1 408 "), (took, answer)
        assert (await c.get(f"/sessions/{sid}/messages", headers=ACME)).json()["items"] == []


async def trickle_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> tuple[float, bytes]:
    started = time.monotonic()
    answer = b""
    try:
        for i in range(len(body)):
            writer.write(body[i : i + 1])
            await writer.drain()
            try:
                answer += await asyncio.wait_for(reader.read(4096), 0.25)
            except TimeoutError:
                continue
            if answer:
                break
    except ConnectionError:
        pass
    finally:
        writer.close()
    return time.monotonic() - started, answer
