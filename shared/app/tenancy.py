"""The tenancy use cases: a tenant's limits (its own over the deployment's defaults) and its usage per day."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.app.ports import Limits
from shared.domain.wire import UsageReport

__all__ = ["Tenancy"]


class Tenancy:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    async def usage(self, tenant: str, days: int) -> UsageReport:
        """The tenant's limits as they apply now and its counters per day, newest first: requests admitted, chats
        requested, prompt and completion tokens (counted from the log's `ContextBuilt` and `ChatCompleted`)."""
        limits, counters = await self.limits.report(tenant, days)
        return UsageReport(tenant=tenant, limits=limits, days=counters)

    async def set_limits(self, tenant: str, values: dict[str, Any], reset: Sequence[str] = ()) -> None:
        await self.limits.set_limits(tenant, values, reset)

    async def overrides(self, tenant: str) -> dict[str, str]:
        return await self.limits.overrides(tenant)
