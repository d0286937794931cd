"""OpenTelemetry traces, off unless `PARLEY_OTEL=true` (and the `otel` extra is installed).

One trace follows a chat: the API's request span → the append of its events → the chat job's span in a worker
(the request's trace context travels with the queued job) → the model call → the append of the answer. The
exporter is OTLP over HTTP, configured by the standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_SERVICE_NAME`, `OTEL_BSP_*`…).

Spans are made here, not by an ASGI instrumentation: those record the raw URL, whose query may carry a stream
token. Parley's spans carry route templates, statuses, tenants and ids only.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

__all__ = ["configure", "detached_span", "enabled", "inject", "server_span", "shutdown", "span", "traced"]

_tracer: Any = None
_provider: Any = None
T = TypeVar("T")


def enabled() -> bool:
    return _tracer is not None


def configure(on: bool, service: str) -> None:
    """Set up the tracer provider once per process (`service`: the default `service.name`)."""
    global _tracer, _provider
    if not on or _tracer is not None:
        return
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        raise SystemExit(f"PARLEY_OTEL=true needs the otel extra (pip install 'parley[otel]'): {e}") from e
    resource = Resource.create({"service.name": service}).merge(OTELResourceDetector().detect())
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(_provider)
    _tracer = trace.get_tracer("parley")
    atexit.register(shutdown)


def shutdown() -> None:
    """Send what is buffered (a stopping process)."""
    if _provider is not None:
        _provider.shutdown()


@contextlib.contextmanager
def span(name: str, parent: Mapping[str, str] | None = None, **attributes: Any) -> Iterator[Any]:
    """A span for the block (a no-op when tracing is off); `parent`: a carrier from `inject` (W3C traceparent)."""
    if _tracer is None:
        yield None
        return
    from opentelemetry import propagate

    context = propagate.extract(dict(parent)) if parent else None
    with _tracer.start_as_current_span(
        name, context=context, attributes={k: v for k, v in attributes.items() if v is not None}
    ) as s:
        yield s


@contextlib.contextmanager
def server_span(headers: Any, method: str) -> Iterator[Any]:
    """The span of an HTTP request (named `method` until the route is known), continuing the caller's trace when
    it sent `traceparent`."""
    if _tracer is None:
        yield None
        return
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    carrier = {n.decode("latin-1"): v.decode("latin-1") for n, v in headers if n in (b"traceparent", b"tracestate")}
    with _tracer.start_as_current_span(method, context=propagate.extract(carrier), kind=SpanKind.SERVER) as s:
        yield s


@contextlib.contextmanager
def detached_span(name: str, **attributes: Any) -> Iterator[Any]:
    """A child of the current span that is not made current itself: for an async generator, whose steps may run
    in other contexts than the one it started in."""
    if _tracer is None:
        yield None
        return
    s = _tracer.start_span(name, attributes={k: v for k, v in attributes.items() if v is not None})
    try:
        yield s
    finally:
        s.end()


def inject() -> dict[str, str] | None:
    """The current trace context as a carrier to send along (None when tracing is off)."""
    if _tracer is None:
        return None
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def traced(name: str, fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """`fn` with a span around each call."""

    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> T:
        with span(name):
            return await fn(*args, **kwargs)

    return call
