"""Per-tenant limits in memory (the `Limits` port), the same arithmetic as the Redis scripts.

`admit` is GCRA (each request granted moves the tenant's theoretical arrival time on by 1/rate; admitted while that stays
within `burst` requests of now) and counts admitted requests per day; `take` holds one of the tenant's slots per
member until `ttl_s` passes unless renewed, refusing past the limit (0: unlimited); a tenant's own limits override
the deployment's defaults field by field. Chat tokens per day come from the usage counters the read models keep.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from shared.adapters.memory.store import Memory
from shared.adapters.memory.views import USAGE_TTL_S
from shared.app.ports import Admission, Slot
from shared.domain.wire import TenantLimits, UsageDay

__all__ = ["FIELDS", "MemoryLimits"]

FIELDS = TenantLimits.__struct_fields__


class MemoryLimits:
    def __init__(self, memory: Memory, defaults: TenantLimits) -> None:
        self.memory = memory
        self.defaults = defaults
        self._limits: dict[str, tuple[float, TenantLimits]] = {}

    def _today(self) -> str:
        return datetime.fromtimestamp(self.memory.clock(), UTC).date().isoformat()

    def _count_requests(self, tenant: str, day: str, n: int) -> None:
        m, key = self.memory, (tenant, day)
        counted = m.requests.get(key)
        if n < 0 and counted is None:  # taking back from a day whose counter is gone: nothing to take
            return
        m.requests.set(key, max(0, (counted or 0) + n))
        m.requests.expire(key, USAGE_TTL_S)

    async def admit(self, tenant: str, want: int = 1, unused: int = 0, unused_day: str = "") -> Admission:
        m, day = self.memory, self._today()
        now = math.floor(m.clock() * 1000)
        own = m.tenant_limits.get(tenant, {})
        rps = float(own["rps"]) if "rps" in own else self.defaults.rps
        burst = int(float(own["burst"])) if "burst" in own else self.defaults.burst
        if unused > 0:
            self._count_requests(tenant, unused_day or day, -unused)
        if rps <= 0 or burst <= 0:
            if want > 0:
                self._count_requests(tenant, day, want)
            return Admission(want > 0, 0, 0, 0, 0, want, day)
        milli = math.floor(rps * 1000)
        step = 1000 / rps
        span = step * burst
        tat = m.rates.get(tenant) or now
        if unused > 0:
            tat -= unused * step
        tat = max(tat, now)
        granted = min(want, math.floor((span - (tat - now)) / step + 1e-9))
        if granted < 1:
            if unused > 0:
                m.rates.set(tenant, tat)
                m.rates.expire(tenant, (math.ceil(tat - now) + 1) / 1000)
            return Admission(False, burst, 0, math.ceil(tat + step - now - span), milli / 1000, 0, day)
        next_tat = tat + granted * step
        m.rates.set(tenant, next_tat)
        m.rates.expire(tenant, (math.ceil(next_tat - now) + 1) / 1000)
        self._count_requests(tenant, day, granted)
        return Admission(
            True,
            burst,
            math.floor((span - (next_tat - now)) / step),
            math.ceil(next_tat - now),
            milli / 1000,
            granted,
            day,
        )

    def _held(self, tenant: str, kind: str) -> dict[str, float]:
        """The tenant's live slots of `kind`: member → expiry (clock ms); expired ones are dropped."""
        now = self.memory.clock() * 1000
        slots = self.memory.slots.setdefault((tenant, kind), {})
        for member in [mb for mb, until in slots.items() if until <= now]:
            del slots[member]
        return slots

    async def take(self, tenant: str, kind: str, member: str, ttl_s: float) -> Slot:
        field = "concurrent_chats" if kind == "chats" else "streams"
        own = self.memory.tenant_limits.get(tenant, {})
        limit = int(float(own[field])) if field in own else int(getattr(self.defaults, field))
        held = self._held(tenant, kind)
        if limit > 0 and len(held) >= limit and member not in held:
            return Slot(False, limit, len(held))
        held[member] = self.memory.clock() * 1000 + int(ttl_s * 1000)
        return Slot(True, limit, len(held))

    async def renew(self, tenant: str, kind: str, members: Sequence[str], ttl_s: float) -> None:
        """Renew the members still in the set: as in Redis, one past its expiry stays there (and renewable) until
        the next `take` sweeps it."""
        held = self.memory.slots.get((tenant, kind), {})
        until = self.memory.clock() * 1000 + ttl_s * 1000
        for member in members:
            if member in held:
                held[member] = until

    async def give(self, tenant: str, kind: str, *members: str) -> None:
        held = self.memory.slots.get((tenant, kind), {})
        for member in members:
            held.pop(member, None)

    async def limits(self, tenant: str, max_age_s: float = 1.0) -> TenantLimits:
        now = time.monotonic()
        hit = self._limits.get(tenant)
        if hit is not None and now - hit[0] < max_age_s:
            return hit[1]
        own = self.memory.tenant_limits.get(tenant, {})
        merged = msgspec.convert({**msgspec.structs.asdict(self.defaults), **own}, TenantLimits, strict=False)
        self._limits[tenant] = (now, merged)
        return merged

    async def overrides(self, tenant: str) -> dict[str, str]:
        return dict(self.memory.tenant_limits.get(tenant, {}))

    async def set_limits(self, tenant: str, values: dict[str, Any], reset: Sequence[str] = ()) -> None:
        unknown = (set(values) | set(reset)) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown limits: {', '.join(sorted(unknown))}")
        own = self.memory.tenant_limits.setdefault(tenant, {})
        own.update({k: str(v) for k, v in values.items()})
        for name in reset:
            own.pop(name, None)
        self._limits.pop(tenant, None)

    async def report(self, tenant: str, days: int) -> tuple[TenantLimits, list[UsageDay]]:
        return await self.limits(tenant, max_age_s=0), await self.usage(tenant, days)

    async def usage(self, tenant: str, days: int) -> list[UsageDay]:
        m = self.memory
        start = datetime.fromtimestamp(m.clock(), UTC).date()
        out = []
        for i in range(days):
            day = (start - timedelta(days=i)).isoformat()
            u = UsageDay(day=day, requests=m.requests.get((tenant, day)) or 0)
            for p in range(m.partitions):
                counters = m.usage.get((p, tenant, day))
                if counters:
                    u.chats += counters["chats"]
                    u.prompt_tokens += counters["prompt_tokens"]
                    u.completion_tokens += counters["completion_tokens"]
            out.append(u)
        return out
