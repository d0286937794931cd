"""The HTTP server's protocol: uvicorn's httptools protocol with read deadlines.

uvicorn bounds only the idle time between requests (`timeout_keep_alive`). A client that trickles its headers
or its body a byte at a time (slowloris), or connects and sends nothing, holds a connection and a parser for
ever; a few hundred of them exhaust a process. This protocol gives every connection:

- `header_timeout_s` from accepting it, or from a request's first byte, until the request's headers are complete;
- `body_timeout_s` from the headers until the body is complete.

A request that misses a deadline is answered 408 `request_timeout` (if nothing was answered yet) and its
connection is closed. A request the parser refuses is answered 400 `bad_request` in the same error shape. Requests that are being *answered* are not bounded here: a synchronous chat may wait for its
model as long as `PARLEY_CHAT_WAIT_S`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["guarded_protocol"]

def _closing_answer(status: bytes, code: bytes, message: bytes) -> bytes:
    body = b'{"error":{"status":%s,"code":"%s","message":"%s"}}' % (status.split()[0], code, message)
    head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
    return head % (status, len(body)) + body


_REQUEST_TIMEOUT = _closing_answer(b"408 Request Timeout", b"request_timeout", b"the request was not received in time")
_BAD_REQUEST = _closing_answer(b"400 Bad Request", b"bad_request", b"the request is not valid HTTP")


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout_s = 10.0
    body_timeout_s = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

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
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


def guarded_protocol(header_timeout_s: float, body_timeout_s: float) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to give uvicorn (`Config(http=...)`), with these deadlines."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s},
    )
