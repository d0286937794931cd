"""What every controller reaches through `request.app.state.api`: the wired `Parley` and the API process's own
parts, typed (one attribute, not nine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from litestar import Request

if TYPE_CHECKING:
    from services.api.auth import Authenticator
    from services.api.sse import StreamSlots
    from shared.bootstrap import Parley

__all__ = ["Api", "Readiness", "api"]


class Readiness(Protocol):
    @property
    def redis(self) -> bool: ...

    @property
    def projector(self) -> bool: ...


@dataclass
class Api:
    parley: Parley
    auth: Authenticator
    streams: StreamSlots
    health: Readiness


def api(request: Request[Any, Any, Any]) -> Api:
    return request.app.state.api  # type: ignore[no-any-return]
