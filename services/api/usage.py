"""`GET /usage`: a tenant's own limits and counters, so it can see what it used and what is left."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Request, Response, get
from litestar.di import Provide
from litestar.params import Parameter

from services.api.auth import provide_tenant
from services.api.context import api
from services.api.params import errors, json_response
from shared.domain.wire import UsageReport

__all__ = ["usage"]

Days = Annotated[int, Parameter(ge=1, le=31, description="How many UTC days, newest first (1..31).")]


@get(
    "/usage",
    tags=["tenancy"],
    dependencies={"tenant": Provide(provide_tenant)},
    security=[{"bearer": []}, {"apiKey": []}],
    responses=errors(),
)
async def usage(request: Request, tenant: str, days: Days = 7) -> Response[UsageReport]:
    """The calling tenant's limits and its usage per day: requests admitted, chats requested, prompt and
    completion tokens (counted from the log's `ContextBuilt` and `ChatCompleted` events)."""
    return json_response(msgspec.json.encode(await api(request).parley.tenancy.usage(tenant, days)))
