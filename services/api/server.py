"""The HTTP server's protocol: uvicorn's httptools protocol with read deadlines.

uvicorn bounds only the idle time between requests (`timeout_keep_alive`). A client that trickles its headers
or its body a byte at a time (slowloris), or connects and sends nothing, holds a connection and a parser for
ever; a few hundred of them exhaust a process. This protocol gives every connection:

- `header_timeout_s` from accepting it, or from a request's first byte, until the request's headers are complete;
- `body_timeout_s` from the headers until the body is complete.

It also sheds load at the cheapest point there is: a request whose headers arrive while the process holds
`PARLEY_MAX_INFLIGHT` requests (waiting for the event loop or being worked on) is answered 503 `overloaded`
without ever becoming a task of Parley's, and so is one whose tenant this process is refusing (429), in one
write (`services.api.guard.Gate`).

A request that misses a deadline is answered 408 `request_timeout` (if nothing was answered yet) and its
connection is closed. A request the parser refuses is answered 400 `bad_request` in the same error shape. Requests that are being *answered* are not bounded here: a synchronous chat may wait for its
model as long as `PARLEY_CHAT_WAIT_S`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.api.guard import EXEMPT, OVERLOADED_RESPONSE, Gate

__all__ = ["guarded_protocol"]

EXEMPT_PREFIXES = tuple(p.encode() for p in EXEMPT)
"""Never shed: the probes (a load balancer must learn the truth from them under load too)."""


def _closing_answer(status: bytes, code: bytes, message: bytes) -> bytes:
    body = b'{"error":{"status":%s,"code":"%s","message":"%s"}}' % (status.split()[0], code, message)
    head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
    return head % (status, len(body)) + body


_REQUEST_TIMEOUT = _closing_answer(b"408 Request Timeout", b"request_timeout", b"the request was not received in time")
_BAD_REQUEST = _closing_answer(b"400 Bad Request", b"bad_request", b"the request is not valid HTTP")


def _answering(raw: bytes) -> Any:
    """An ASGI app that answers `raw` (a whole HTTP answer), for a refused request uvicorn must keep in order."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]

    async def answer(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return answer


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0
    body_timeout_s = 30.0
    gate: Gate | None = None
    """The process's work in flight and the tenants it refuses: a request is counted in when its headers are
    parsed, or refused right there."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._refusal: tuple[bytes, bool] | None = None
        """The request being parsed is refused: (the whole answer, keep the connection?)."""

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._missed_deadline)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _missed_deadline(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn answers a request its parser refuses (a control character in a header, say) in plain text:
        this answers in Parley's one error shape."""
        self.transport.write(_BAD_REQUEST)
        self.transport.close()

    # uvicorn's protocol callbacks, with the deadlines around them
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s)  # a connection that never sends a request

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._arm(self.body_timeout_s)
        gate = self.gate
        if gate is None or self.url.startswith(EXEMPT_PREFIXES):
            super().on_headers_complete()
            return
        answer = gate.early_answer(self.headers)
        if answer is None:
            if gate.admit():
                self.scope["state"]["parley.parsed_at"] = time.monotonic()  # type: ignore[index]
                super().on_headers_complete()
                return
            answer = OVERLOADED_RESPONSE
        if self.cycle is None or self.cycle.response_complete:
            # Nothing else is in flight on this connection: answer ourselves once the request is complete (its body
            # is dropped), in one write, without a task: the cheapest refusal there is.
            keep = self.parser.should_keep_alive() and self.parser.get_http_version() == "1.1"
            self._refusal = (answer, keep)
        else:  # a pipelined request behind one still answering: uvicorn must keep the answers in order
            app, self.app = self.app, _answering(answer)
            try:
                super().on_headers_complete()
            finally:
                self.app = app

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        refusal, self._refusal = self._refusal, None
        if refusal is None:
            super().on_message_complete()
            return
        answer, keep = refusal
        self.transport.write(answer)
        if not keep:
            self.transport.close()
            return
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)


def guarded_protocol(
    header_timeout_s: float, body_timeout_s: float, gate: Gate | None = None
) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to give uvicorn (`Config(http=...)`), with these deadlines and this gate."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s, "gate": gate},
    )
