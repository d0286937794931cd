"""OpenTelemetry traces end to end, into a local OTLP/HTTP receiver: one trace from the client's `traceparent`
through the API's request span, its append, the chat job in the worker, the model call and the answer's append;
no span holds a key or a stream token. Off by default: without PARLEY_OTEL nothing is sent."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from shared.adapters.redis.server import RedisServer
from tests.e2e.helpers import ACME, JSON, create
from tests.support import TENANTS, ParleyProcess, wait_for, wait_ready

pytestmark = pytest.mark.slow

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class Receiver:
    """An OTLP/HTTP trace receiver on loopback: keeps every request body and every span."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.spans: list = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                receiver.bodies.append(body)
                receiver.spans += [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def traced_stack(tmp_path: Path) -> Iterator[tuple[str, Receiver]]:
    receiver = Receiver()
    server = RedisServer(tmp_path / "redis").start()
    env = {"PARLEY_OTEL": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    procs = [ParleyProcess("api", server.url, tmp_path, env), ParleyProcess("worker", server.url, tmp_path, env)]
    try:
        for p in procs:
            p.start()
        wait_ready(procs[0].url)
        yield procs[0].url, receiver
    finally:
        for p in reversed(procs):
            p.stop()
        server.stop()
        receiver.stop()


def test_a_chat_is_one_trace_from_the_request_to_the_answer(traced_stack: tuple[str, Receiver]):
    url, receiver = traced_stack
    with httpx.Client(base_url=url, timeout=30) as c:
        sid = create(c)["id"]
        chat = c.post(
            f"/sessions/{sid}/chat",
            headers={**ACME, **JSON, "traceparent": TRACEPARENT},
            json={"messages": [{"role": "user", "content": "trace me"}]},
        )
        assert chat.status_code == 200, chat.text
        job = chat.json()["id"]
        token = c.post(f"/sessions/{sid}/stream-tokens", headers={**ACME, **JSON}, json={}).json()["token"]
        with c.stream(
            "GET", f"/sessions/{sid}/events", params={"token": token}, headers={"Accept": "text/event-stream"}
        ) as events:
            assert events.status_code == 200
            next(events.iter_lines())

    def ours() -> list:
        return [s for s in receiver.spans if s.trace_id.hex() == TRACE_ID]

    async def complete() -> list | None:
        names = {s.name for s in ours()}
        return ours() if {"POST /sessions/{session_id}/chat", "chat job", "model call"} <= names else None

    spans = asyncio.run(wait_for(complete, 20, "the chat's spans"))
    by_id = {s.span_id: s for s in spans}
    [request] = [s for s in spans if s.name == "POST /sessions/{session_id}/chat"]
    assert request.parent_span_id.hex() == "00f067aa0ba902b7"  # the client's span
    attributes = {a.key: (a.value.string_value or a.value.int_value) for a in request.attributes}
    assert attributes["http.route"] == "/sessions/{session_id}/chat" and attributes["http.response.status_code"] == 200
    assert attributes["parley.tenant"] == "acme"
    [job_span] = [s for s in spans if s.name == "chat job"]
    assert {a.key: a.value.string_value for a in job_span.attributes}["parley.job_id"] == job
    [model] = [s for s in spans if s.name == "model call"]
    assert by_id[model.parent_span_id] is job_span
    appends = [s for s in spans if s.name == "append"]
    assert any(by_id.get(s.parent_span_id) is request for s in appends)  # the request's messages and ChatRequested
    assert any(by_id.get(s.parent_span_id) is job_span for s in appends)  # the context record and the answer

    async def token_request_exported() -> bool:
        return any(s.name == "GET /sessions/{session_id}/events" for s in receiver.spans)

    asyncio.run(wait_for(token_request_exported, 20, "the stream's span"))
    sent = b"".join(receiver.bodies)
    for secret in (*TENANTS.values(), token):
        assert secret.encode() not in sent


def test_nothing_is_sent_unless_tracing_is_on(tmp_path: Path):
    receiver = Receiver()
    server = RedisServer(tmp_path / "redis").start()
    api = ParleyProcess(
        "api", server.url, tmp_path, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    )
    try:
        api.start()
        with httpx.Client(base_url=api.url) as c:
            for _ in range(5):
                assert c.get("/sessions", headers=ACME).status_code in (200, 503)
        api.stop()  # a process with tracing on would flush its spans as it stops
        assert receiver.bodies == []
    finally:
        api.stop()
        server.stop()
        receiver.stop()
