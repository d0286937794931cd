"""A model provider that records each call: its latency and outcome (`parley_model_call_seconds`) and, with
tracing on, a `model call` span."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator

from shared.app.ports import Completion, Delta, ModelError, ModelProvider, ModelRequest
from shared.observability import metrics, tracing

__all__ = ["Metered"]


class Metered:
    def __init__(self, inner: ModelProvider) -> None:
        self.inner = inner

    @property
    def models(self) -> list[str]:
        return self.inner.models

    async def stream(self, request: ModelRequest) -> AsyncGenerator[Delta | Completion, None]:
        start = time.perf_counter()
        outcome = "error"
        with tracing.detached_span("model call", **{"gen_ai.request.model": request.model}) as span:
            try:
                # closed with this generator: a caller that stops reading (a cancelled chat) ends the call at once
                async with contextlib.aclosing(self.inner.stream(request)) as items:
                    async for item in items:
                        if isinstance(item, Completion):
                            outcome = "ok"
                        yield item
            except ModelError as e:
                outcome = e.code
                raise
            except GeneratorExit:
                outcome = "ok" if outcome == "ok" else "cancelled"
                raise
            finally:
                metrics.MODEL_CALL.labels(outcome).observe(time.perf_counter() - start)
                if span is not None:
                    span.set_attribute("parley.outcome", outcome)
