"""`GET /usage`: a tenant's own limits and counters, so it can see what it used and what is left."""

from __future__ import annotations

from typing import Annotated

from litestar import MediaType, Request, Response, get
from litestar.di import Provide
from litestar.params import Parameter

from shared.adapters.codec import json_encode
from shared.domain.wire import UsageReport
from shared.adapters.redis.limits import RedisLimits
from services.api.auth import provide_tenant
from services.api.sessions import _errors

__all__ = ["usage"]

Days = Annotated[int, Parameter(ge=1, le=31, description="How many UTC days, newest first (1..31).")]


@get("/usage", tags=["tenancy"], dependencies={"tenant": Provide(provide_tenant)}, security=[{"bearer": []}, {"apiKey": []}], responses=_errors())
async def usage(request: Request, tenant: str, days: Days = 7) -> Response[UsageReport]:
    """The calling tenant's limits and its usage per day: requests admitted, chats requested, prompt and
    completion tokens (counted from the log's `ContextBuilt` and `ChatCompleted` events)."""
    limits: RedisLimits = request.app.state.limits
    report = UsageReport(tenant=tenant, limits=await limits.limits(tenant, max_age_s=0), days=await limits.usage(tenant, days))
    return Response(content=json_encode(report), media_type=MediaType.JSON)
