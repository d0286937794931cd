"""A model provider that records each call's latency and outcome (`parley_model_call_seconds`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from shared.app.ports import Completion, Delta, ModelError, ModelProvider, ModelRequest
from shared.observability import metrics

__all__ = ["Metered"]


class Metered:
    def __init__(self, inner: ModelProvider) -> None:
        self.inner = inner

    @property
    def models(self) -> list[str]:
        return self.inner.models

    async def stream(self, request: ModelRequest) -> AsyncIterator[Delta | Completion]:
        start = time.perf_counter()
        outcome = "error"
        try:
            async for item in self.inner.stream(request):
                if isinstance(item, Completion):
                    outcome = "ok"
                yield item
        except ModelError as e:
            outcome = e.code
            raise
        except GeneratorExit:  # the caller stopped reading: a cancelled chat
            outcome = "ok" if outcome == "ok" else "cancelled"
            raise
        finally:
            metrics.MODEL_CALL.labels(outcome).observe(time.perf_counter() - start)
