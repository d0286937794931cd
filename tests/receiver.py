"""A webhook receiver for the tests: a real HTTP server on a loopback port, in a thread, that records every request
and answers what the test says (per path: fail the first N attempts of each delivery, or always)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from shared.domain.webhooks import verify

__all__ = ["Received", "Receiver", "receiving"]


@dataclass
class Received:
    path: str
    msg_id: str
    timestamp: int
    signature: str
    body: bytes
    status: int
    """What the receiver answered."""

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)  # type: ignore[no-any-return]

    @property
    def event(self) -> dict[str, Any]:
        return self.payload["data"]  # type: ignore[no-any-return]

    def verified(self, secret: str) -> bool:
        return verify(secret, self.msg_id, self.timestamp, self.body, self.signature)


@dataclass
class Receiver:
    url: str
    requests: list[Received] = field(default_factory=list)
    fail_first: dict[str, int] = field(default_factory=dict)
    """path → how many attempts of each delivery (by `webhook-id`) answer 500 before one answers 200."""
    delay_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def taken(self, path: str) -> list[Received]:
        """The requests at `path` the receiver answered 2xx."""
        return [r for r in self.at(path) if r.status == 200]


class _Handler(BaseHTTPRequestHandler):
    receiver: Receiver

    def do_POST(self) -> None:
        r = self.receiver
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        msg_id = self.headers.get("webhook-id", "")
        with r.lock:
            tries = sum(1 for x in r.requests if x.path == self.path and x.msg_id == msg_id)
            status = 500 if tries < r.fail_first.get(self.path, 0) else 200
            r.requests.append(
                Received(
                    self.path,
                    msg_id,
                    int(self.headers.get("webhook-timestamp", "0")),
                    self.headers.get("webhook-signature", ""),
                    body,
                    status,
                )
            )
        if r.delay_s:  # recorded on arrival: a sender killed meanwhile never hears the answer
            time.sleep(r.delay_s)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def receiving() -> Iterator[Receiver]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    receiver = Receiver(f"http://127.0.0.1:{server.server_address[1]}")
    _Handler.receiver = receiver
    thread = threading.Thread(target=server.serve_forever, name="webhook-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
