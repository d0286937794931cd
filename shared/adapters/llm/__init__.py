"""Model providers: one `ModelProvider` protocol, an OpenAI-compatible adapter and an offline model."""

from __future__ import annotations

from shared.app.ports import Completion, Delta, ModelError, ModelProvider, ModelRequest

__all__ = ["Completion", "Delta", "ModelError", "ModelProvider", "ModelRequest"]
