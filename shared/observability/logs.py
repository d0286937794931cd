"""Logging: one handler on the root logger, as text for people or one JSON object per line for a log pipeline.

Fields that belong to the work at hand (the request id in the API, the session and job ids in a chat job) live in a
context variable, so every line logged while doing that work carries them without being passed around; `bind` sets
them for a block. Nothing here logs headers, query strings or bodies: the callers choose the fields, and API keys,
stream tokens and message contents are never among them (tests/e2e/test_observability.py checks it).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import msgspec

__all__ = ["ACCESS", "JsonFormatter", "TextFormatter", "bind", "bind_request", "configure", "current", "unbind"]

ACCESS = logging.getLogger("parley.access")
"""One INFO line per HTTP request (request id, method, route, path, status, duration, tenant)."""

_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "parley_log_context", default=MappingProxyType({})
)


def current() -> Mapping[str, Any]:
    """The fields bound to the work at hand."""
    return _context.get()


@contextlib.contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add `fields` to every line logged inside the block (and in tasks it starts)."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def bind_request(request_id: str) -> contextvars.Token[Mapping[str, Any]]:
    """`bind(request_id=…)` without the context manager, for the per-request path; undo with `unbind`."""
    return _context.set({"request_id": request_id})


def unbind(token: contextvars.Token[Mapping[str, Any]]) -> None:
    _context.reset(token)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    """The bound context, then the record's own `extra={"fields": {...}}`."""
    own = getattr(record, "fields", None)
    return {**_context.get(), **own} if own else dict(_context.get())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `ts` (UTC, ms), `level`, `logger`, `msg`, then the fields (and `exc`)."""

    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime per second, not per line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        line: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _encode(line).decode()


_encode = msgspec.json.Encoder(enc_hook=str).encode


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _fields(record)
        if not fields:
            return text
        head, sep, tail = text.partition("\n")  # a traceback stays below the line
        return head + "".join(f" {k}={v}" for k, v in fields.items()) + sep + tail


def configure(level: str, fmt: str = "text") -> None:
    """Log to stderr at `level`, as `fmt` (`text` or `json`), replacing whatever handlers the root logger had."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Parley's lines never show these; not looking them up makes each record cheaper (the access line is per request)
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
