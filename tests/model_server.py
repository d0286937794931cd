"""A real HTTP server speaking OpenAI's Chat Completions protocol, for tests.

Parley's worker talks to it through the official `openai` SDK exactly as it would talk to
OpenAI, vLLM or Ollama, so the tests exercise the real adapter, its retries and its streaming.

Endpoints
  POST /v1/chat/completions   `chat.completion` JSON, or `chat.completion.chunk` server-sent events
                              ending in `data: [DONE]` (`stream: true`); a usage chunk (`choices: []`)
                              before `[DONE]` when `stream_options.include_usage` is set.
  GET  /v1/models             a one-model list.
  POST /control               change the behaviour (JSON object; see `Behaviour`); answers the behaviour.
  GET  /requests              every chat request received so far, oldest first (see `Recorded`).
  POST /reset                 forget the requests and restore the default behaviour.

Deterministic answers
  * a request that asks for a summary (a system message starting with "Summarize") gets
    `SUMMARY_PREFIX` + "<n> lines, starting: <first 30 characters>";
  * when tools are offered (and `tool_choice` is not "none") and the last message is a user
    message saying "call <tool> <args>", a call of that tool with arguments {"input": "<args>"},
    finish_reason "tool_calls", the call id derived from the prompt; a user message chaining calls
    ("call a x, then call b y") gets one call per round, the next one after each tool result, the
    way an agent loop (the npm SDK's `runTools()`) drives a model through several tools;
  * when the last message is a tool result: "tool said: <content>";
  * otherwise "echo: <text of the last user message>" (or `Behaviour.reply` when set).
  Streamed answers come one word per chunk, each with its leading space, so the deltas
  concatenate to the answer.

Usage reported (when `report_usage`): prompt_tokens = characters of the prompt's text contents,
completion_tokens = number of content chunks (1 for a tool call); recorded with the request so a
test can compare.

Run in a thread of the test process (`ModelServer().start()`), or as a process:
`python -m tests.model_server --port 8123`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

try:  # shared.adapters.redis.server.free_port when run inside Parley's tree
    from shared.adapters.redis.server import free_port
except ImportError:  # pragma: no cover - standalone
    import socket

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]


MODEL_NAME = "echo-1"
SUMMARY_PREFIX = "Summary: "
_CALL = re.compile(r"\b(?:call|use)\s+([A-Za-z0-9_-]{1,64})\b\s*(.*)", re.S)
_PIECES = re.compile(r"\s*\S+|\s+$")
_THEN = re.compile(r",?\s+then\s+(?=(?:call|use)\s)")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Behaviour:
    """What the server does; every field can be set with `POST /control`."""

    FIELDS = {
        "delay_s": float,  # wait this long before answering at all (before the status line)
        "chunk_delay_s": float,  # wait this long before each streamed chunk
        "fail_next": list,  # statuses (500, 429, 503, ...) for the next requests, one each, in order
        "fail_always": (int, type(None)),  # answer every request with this status (None: off)
        "retry_after_ms": (int, type(None)),  # send `retry-after-ms` with failures (None: no header)
        "report_usage": bool,  # report usage (the usage chunk / the `usage` field)
        "reply": (str, type(None)),  # answer this text instead of the echo (tool calls still win)
    }

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.chunk_delay_s = 0.0
        self.fail_next: list[int] = []
        self.fail_always: int | None = None
        self.retry_after_ms: int | None = None
        self.report_usage = True
        self.reply: str | None = None

    def update(self, changes: dict[str, Any]) -> None:
        for key, value in changes.items():
            kind = self.FIELDS.get(key)
            if kind is None:
                raise ValueError(f"unknown control field {key!r}")
            if kind is float and isinstance(value, int):
                value = float(value)
            if not isinstance(value, kind):
                raise ValueError(f"{key}: {value!r} is not {kind}")
            setattr(self, key, list(value) if key == "fail_next" else value)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.FIELDS}


class Recorded:
    """One chat request as the server saw it.

    `outcome`: None while answering, then "completed", "failed:<status>" or "disconnected"
    (the client went away mid-answer), at `ended_at`. `chunks_sent` counts content/tool-call chunks sent.
    """

    def __init__(self, index: int, body: dict[str, Any], headers: dict[str, str], peer: str = "") -> None:
        self.index = index
        self.body = body
        self.headers = headers
        self.peer = peer
        """The client's address and port: requests on one connection share it."""
        self.received_at = time.time()
        self.status: int | None = None
        self.outcome: str | None = None
        self.chunks_sent = 0
        self.answer: dict[str, Any] | None = None
        self.usage: dict[str, int] | None = None
        self.ended_at: float | None = None

    def end(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome, self.ended_at = outcome, time.time()

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "body": self.body,
            "headers": self.headers,
            "peer": self.peer,
            "received_at": self.received_at,
            "status": self.status,
            "outcome": self.outcome,
            "chunks_sent": self.chunks_sent,
            "answer": self.answer,
            "usage": self.usage,
            "ended_at": self.ended_at,
        }


class ModelApp:
    """The ASGI application; its state lives on its event loop."""

    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.requests: list[Recorded] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"]
        body = await _read_body(receive)
        try:
            if method == "POST" and path == "/v1/chat/completions":
                await self._chat(scope, body, receive, send)
            elif method == "GET" and path == "/v1/models":
                await _json(
                    send,
                    200,
                    {
                        "object": "list",
                        "data": [{"id": MODEL_NAME, "object": "model", "created": 0, "owned_by": "tests"}],
                    },
                )
            elif method == "POST" and path == "/control":
                try:
                    self.behaviour.update(json.loads(body or b"{}"))
                except (ValueError, TypeError) as e:
                    await _json(send, 400, {"error": str(e)})
                    return
                await _json(send, 200, self.behaviour.as_dict())
            elif method == "GET" and path == "/requests":
                await _json(send, 200, {"items": [r.as_dict() for r in self.requests]})
            elif method == "POST" and path == "/reset":
                self.behaviour = Behaviour()
                self.requests = []
                await _json(send, 200, self.behaviour.as_dict())
            else:
                await _json(
                    send, 404, {"error": {"message": f"no route {method} {path}", "type": "invalid_request_error"}}
                )
        except _Disconnected:
            pass

    # -- chat completions ----------------------------------------------------------------------
    async def _chat(self, scope: Scope, raw: bytes, receive: Receive, send: Send) -> None:
        try:
            body = json.loads(raw)
            assert isinstance(body, dict) and isinstance(body.get("messages"), list)
        except (ValueError, AssertionError):
            await _json(
                send, 400, {"error": {"message": "invalid body", "type": "invalid_request_error", "code": None}}
            )
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        rec = Recorded(
            len(self.requests),
            body,
            {k: v for k, v in headers.items() if k in ("authorization", "content-type", "user-agent")},
            "%s:%s" % tuple(scope.get("client") or ("", "")),
        )
        self.requests.append(rec)
        b = self.behaviour
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, gone))
        try:
            if b.delay_s:
                if await _sleep_or_gone(b.delay_s, gone):
                    rec.end("disconnected")
                    return
            status = b.fail_next.pop(0) if b.fail_next else b.fail_always
            if status is not None:
                rec.status = status
                rec.end(f"failed:{status}")
                extra = {"retry-after-ms": str(b.retry_after_ms)} if b.retry_after_ms is not None else {}
                kind = "rate_limit_exceeded" if status == 429 else "server_error"
                await _json(
                    send,
                    status,
                    {"error": {"message": f"injected failure {status}", "type": kind, "code": None}},
                    extra,
                )
                return
            rec.status = 200
            content, call, finish = _answer(body, b.reply)
            pieces = _PIECES.findall(content) if content else []
            rec.answer = {"content": content, "tool_calls": [call] if call else None, "finish_reason": finish}
            usage = {
                "prompt_tokens": _prompt_chars(body),
                "completion_tokens": len(pieces) if content else 1,
            }
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            if body.get("stream"):
                include = bool((body.get("stream_options") or {}).get("include_usage"))
                rec.usage = usage if include and b.report_usage else None
                await self._stream(rec, body, pieces, call, finish, rec.usage, include, send, gone)
            else:
                rec.usage = usage if b.report_usage else None
                message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
                if call:
                    message["tool_calls"] = [call]
                out: dict[str, Any] = {
                    "id": f"chatcmpl-{rec.index}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model") or MODEL_NAME,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
                }
                if rec.usage is not None:
                    out["usage"] = rec.usage
                rec.chunks_sent = max(len(pieces), 1 if call else 0)
                rec.end("completed")
                await _json(send, 200, out)
        finally:
            watcher.cancel()

    async def _stream(
        self,
        rec: Recorded,
        body: dict[str, Any],
        pieces: list[str],
        call: dict[str, Any] | None,
        finish: str,
        usage: dict[str, int] | None,
        include_usage: bool,
        send: Send,
        gone: asyncio.Event,
    ) -> None:
        base = {
            "id": f"chatcmpl-{rec.index}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model") or MODEL_NAME,
            "system_fingerprint": None,
        }

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            c = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            if include_usage:
                c["usage"] = None
            return b"data: " + json.dumps(c).encode() + b"\n\n"

        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")],
            }
        )

        async def emit(data: bytes, counts: bool = True) -> None:
            if counts and self.behaviour.chunk_delay_s:
                if await _sleep_or_gone(self.behaviour.chunk_delay_s, gone):
                    raise _Disconnected()
            if gone.is_set():
                raise _Disconnected()
            await send({"type": "http.response.body", "body": data, "more_body": True})
            if counts:
                rec.chunks_sent += 1

        try:
            await emit(chunk({"role": "assistant", "content": ""}), counts=False)
            if call is not None:
                fn = call["function"]
                await emit(
                    chunk(
                        {
                            "tool_calls": [
                                {
                                    "index": 0,
                                    "id": call["id"],
                                    "type": "function",
                                    "function": {"name": fn["name"], "arguments": ""},
                                }
                            ]
                        }
                    )
                )
                args = fn["arguments"]
                for i in range(0, len(args), 8):
                    await emit(chunk({"tool_calls": [{"index": 0, "function": {"arguments": args[i : i + 8]}}]}))
            for piece in pieces:
                await emit(chunk({"content": piece}))
            await emit(chunk({}, finish), counts=False)
            if include_usage and usage is not None:
                await emit(
                    b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n", counts=False
                )
            await emit(b"data: [DONE]\n\n", counts=False)
            rec.end("completed")  # the client has the whole answer
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except _Disconnected:
            rec.end("disconnected")
            raise


class _Disconnected(Exception):
    pass


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise _Disconnected()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(chunks)


async def _watch_disconnect(receive: Receive, gone: asyncio.Event) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            gone.set()
            return


async def _sleep_or_gone(seconds: float, gone: asyncio.Event) -> bool:
    """Sleep; True if the client went away meanwhile."""
    try:
        await asyncio.wait_for(gone.wait(), seconds)
        return True
    except TimeoutError:
        return gone.is_set()


async def _json(send: Send, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    hs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    hs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hs})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def _prompt_chars(body: dict[str, Any]) -> int:
    return sum(len(text_of(m.get("content"))) for m in body["messages"])


def _answer(body: dict[str, Any], reply: str | None) -> tuple[str | None, dict[str, Any] | None, str]:
    """(content, tool call, finish_reason) for a request."""
    messages: list[dict[str, Any]] = body["messages"]
    if any(m.get("role") == "system" and text_of(m.get("content")).startswith("Summarize") for m in messages):
        lines = text_of(messages[-1].get("content")).splitlines()
        return f"{SUMMARY_PREFIX}{len(lines)} lines, starting: {(lines[0] if lines else '')[:30]}", None, "stop"
    last = messages[-1] if messages else {}
    tools = {t.get("function", {}).get("name") for t in body.get("tools") or []}
    step = _next_call(messages) if tools and body.get("tool_choice") != "none" else None
    if step is not None:
        m = _CALL.search(step)
        if m and m.group(1) in tools:
            digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
            call = {
                "id": f"call_{digest}",
                "type": "function",
                "function": {"name": m.group(1), "arguments": json.dumps({"input": m.group(2).strip()})},
            }
            return None, call, "tool_calls"
    if last.get("role") == "tool":
        return f"tool said: {text_of(last.get('content'))}", None, "stop"
    if reply is not None:
        return reply, None, "stop"
    for msg in reversed(messages):
        if msg.get("role") == "user":
            return f"echo: {text_of(msg.get('content'))}", None, "stop"
    return "echo: (nothing)", None, "stop"


def _next_call(messages: list[dict[str, Any]]) -> str | None:
    """The step of the last user message to call now: its first step right after it, the next one after each
    round of tool results (None when the last message is neither, or every step was called)."""
    last = messages[-1] if messages else {}
    if last.get("role") not in ("user", "tool"):
        return None
    asked = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if asked is None:
        return None
    steps = _THEN.split(text_of(messages[asked].get("content")))
    called = sum(1 for m in messages[asked + 1 :] if m.get("role") == "assistant" and m.get("tool_calls"))
    if last.get("role") == "tool" and len(steps) == 1:
        return None  # a single call was answered: report its result (below)
    return steps[called] if called < len(steps) else None


# -- running it ------------------------------------------------------------------------------------
class ModelServer:
    """The server on a free loopback port, in a background thread of this process, with a control client."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.app = ModelApp()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._client = httpx.Client(base_url=self.url, timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """What PARLEY_MODEL_BASE_URL should be."""
        return self.url + "/v1"

    def start(self, timeout: float = 10.0) -> ModelServer:
        import uvicorn

        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            loop="asyncio",
            http="h11",
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"model-server-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the model server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._client.close()

    # -- control ---------------------------------------------------------------------------------
    def control(self, **changes: Any) -> dict[str, Any]:
        r = self._client.post("/control", json=changes)
        r.raise_for_status()
        return r.json()

    def reset(self) -> None:
        self._client.post("/reset").raise_for_status()

    def requests(self, containing: str | None = None) -> list[dict[str, Any]]:
        """The chat requests received, oldest first; only those whose prompt contains `containing` if given."""
        r = self._client.get("/requests")
        r.raise_for_status()
        items = r.json()["items"]
        if containing is not None:
            items = [i for i in items if containing in json.dumps(i["body"]["messages"])]
        return items


# -- server-sent events, for reading both this server's and Parley's streams ---------------------------
class SSE:
    """One server-sent event (`comment` set for a `: ...` line block without data)."""

    def __init__(self, id: str | None, event: str | None, data: str | None, comment: str | None = None) -> None:
        self.id, self.event, self.data, self.comment = id, event, data, comment

    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)

    def __repr__(self) -> str:
        return f"SSE(id={self.id!r}, event={self.event!r}, data={self.data!r}, comment={self.comment!r})"


def parse_sse_block(block: str) -> SSE:
    id_ = event = comment = None
    data: list[str] = []
    for line in block.split("\n"):
        if line.startswith(":"):
            comment = line[1:].strip()
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            id_ = value
        elif field == "event":
            event = value
        elif field == "data":
            data.append(value)
    return SSE(id_, event, "\n".join(data) if data else None, comment)


def iter_sse(lines: Any) -> Any:
    """Events from an iterator of text lines (httpx's `iter_lines()`), one per blank-line-terminated block."""
    block: list[str] = []
    for line in lines:
        if line == "":
            if block:
                yield parse_sse_block("\n".join(block))
                block = []
            continue
        block.append(line)
    if block:
        yield parse_sse_block("\n".join(block))


def parse_sse(text: str) -> list[SSE]:
    return list(iter_sse(text.replace("\r\n", "\n").split("\n")))


def main() -> None:  # pragma: no cover - manual use
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = ModelServer(args.port or None).start()
    print(f"model server on {server.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
