"""A TCP proxy between a client and the API that a test can cut, to drop a live stream the way a network does.

Parley's streams resume with `Last-Event-ID`; the only honest way to show a client does that is to take its
connection away mid-stream. The proxy forwards bytes unchanged, counts the connections it accepted, keeps the
head of each request (method, path, headers) and, on `cut()`, closes every open connection on both sides.
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass, field

from shared.adapters.redis.server import free_port

_HEAD = re.compile(rb"(GET|POST|PUT|PATCH|DELETE|OPTIONS|HEAD) (\S+) HTTP/1\.1\r\n(.*?)\r\n\r\n", re.S)


@dataclass(frozen=True)
class Request:
    connection: int
    """Which connection (0-based, in the order accepted) carried it."""
    method: str
    path: str
    headers: dict[str, str]


@dataclass(eq=False)
class Connection:
    client: socket.socket
    upstream: socket.socket
    sent: bytearray = field(default_factory=bytearray)
    """What the client sent (the first 256 KiB): the request heads are read from it."""


class CutProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.connections: list[Connection] = []
        self._open: set[Connection] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True, name=f"cut-proxy-{self.port}").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self, path_part: str = "") -> list[Request]:
        """Every request sent through the proxy whose path contains `path_part`, in order."""
        with self._lock:
            sent = [bytes(c.sent) for c in self.connections]
        found = []
        for i, data in enumerate(sent):
            for m in _HEAD.finditer(data):
                headers = {}
                for line in m.group(3).decode("latin-1").split("\r\n"):
                    key, _, value = line.partition(":")
                    headers[key.strip().lower()] = value.strip()
                found.append(Request(i, m.group(1).decode(), m.group(2).decode("latin-1"), headers))
        return [r for r in found if path_part in r.path]

    def cut(self) -> int:
        """Close every open connection (both sides) at once; how many there were."""
        with self._lock:
            victims = list(self._open)
        for conn in victims:
            for s in (conn.client, conn.upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        return len(victims)

    def close(self) -> None:
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            conn = Connection(client, upstream)
            with self._lock:
                self.connections.append(conn)
                self._open.add(conn)
            threading.Thread(target=self._pump, args=(conn, client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(conn, upstream, client, False), daemon=True).start()

    def _pump(self, conn: Connection, src: socket.socket, dst: socket.socket, request: bool) -> None:
        try:
            while data := src.recv(65536):
                if request and len(conn.sent) < 262144:
                    conn.sent += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                if conn in self._open:
                    self._open.discard(conn)
                    src.close()
                    dst.close()
