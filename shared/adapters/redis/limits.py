"""Per-tenant limits, kept in Redis so that every API process enforces the same ones.

Each tenant's limiter keys share the tenant's hash tag (`{t:<tenant>}`): the rate (GCRA, one script call per
request or per lease of several, `shared.app.admission`), the concurrent chats and open streams (sorted sets of
slots that expire if their holder dies), the limits themselves (a hash `parley tenants set-limits` writes; a field absent: the deployment's default) and the
requests per day. Chat tokens per day are read from the usage counters APPLY keeps per partition (so the usage
ledger is the log itself).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from shared.adapters.redis.cluster import Client
from shared.adapters.redis.keys import PREFIX, USAGE_TTL_S, Keys
from shared.adapters.redis.scripts import ADMIT, SET_LIMITS, TAKE_SLOT
from shared.app.ports import Admission, Slot
from shared.config import Settings
from shared.domain.wire import TenantLimits, UsageDay

__all__ = ["Admission", "RedisLimits", "Slot", "tenant_defaults", "today"]

FIELDS = (
    "rps",
    "burst",
    "concurrent_chats",
    "chat_tokens_per_day",
    "streams",
    "retention_idle_days",
    "retention_action",
    "retention_keep_messages",
)


def tenant_defaults(settings: Settings) -> TenantLimits:
    return TenantLimits(
        rps=settings.tenant_rps,
        burst=settings.tenant_burst,
        concurrent_chats=settings.tenant_concurrent_chats,
        chat_tokens_per_day=settings.tenant_chat_tokens_per_day,
        streams=settings.tenant_streams,
        retention_idle_days=settings.retention_idle_days,
        retention_action=settings.retention_action,
        retention_keep_messages=settings.retention_keep_messages,
    )


def today() -> str:
    return datetime.now(UTC).date().isoformat()


class RedisLimits:
    def __init__(self, redis: Client, keys: Keys, defaults: TenantLimits) -> None:
        self.redis = redis
        self.keys = keys
        self.defaults = defaults
        self._limits: dict[str, tuple[float, TenantLimits]] = {}

    @staticmethod
    def _tag(tenant: str) -> str:
        return f"{PREFIX}:{{t:{tenant}}}"

    # -- requests per second ---------------------------------------------------------------
    async def admit(self, tenant: str, want: int = 1, unused: int = 0, unused_day: str = "") -> Admission:
        tag, d, day = self._tag(tenant), self.defaults, today()
        reply = await ADMIT(
            self.redis,
            [f"{tag}:rate", f"{tag}:limits", f"{tag}:requests:{day}", f"{tag}:requests:{unused_day or day}"],
            [d.rps, d.burst, USAGE_TTL_S, want, unused],
        )
        granted, burst, remaining, wait_ms, milli_rps = (int(x) for x in reply)
        return Admission(granted > 0, burst, remaining, wait_ms, milli_rps / 1000, granted, day)

    # -- slots: concurrent chats, open streams ------------------------------------------------
    async def take(self, tenant: str, kind: str, member: str, ttl_s: float) -> Slot:
        """Take one of the tenant's `kind` slots ("chats" or "streams") for `member`, held `ttl_s` unless renewed."""
        tag = self._tag(tenant)
        field = "concurrent_chats" if kind == "chats" else "streams"
        default = getattr(self.defaults, field)
        reply = await TAKE_SLOT(
            self.redis, [f"{tag}:{kind}", f"{tag}:limits"], [field, default, member, int(ttl_s * 1000)]
        )
        return Slot(bool(reply[0]), int(reply[1]), int(reply[2]))

    async def renew(self, tenant: str, kind: str, members: Sequence[str], ttl_s: float) -> None:
        if not members:
            return
        key = f"{self._tag(tenant)}:{kind}"
        until = int(time.time() * 1000 + ttl_s * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(key, {m: until for m in members}, xx=True)
        pipe.pexpire(key, int(ttl_s * 1000) + 1000)
        await pipe.execute()

    async def give(self, tenant: str, kind: str, *members: str) -> None:
        if members:
            await self.redis.zrem(f"{self._tag(tenant)}:{kind}", *members)

    # -- configuration -------------------------------------------------------------------------
    async def limits(self, tenant: str, max_age_s: float = 1.0) -> TenantLimits:
        """The tenant's limits (its own, else the defaults), cached in this process for `max_age_s`."""
        now = time.monotonic()
        hit = self._limits.get(tenant)
        if hit is not None and now - hit[0] < max_age_s:
            return hit[1]
        return self._merged(tenant, await self.redis.hgetall(f"{self._tag(tenant)}:limits"), now)

    def _merged(self, tenant: str, raw: dict[bytes, bytes], now: float) -> TenantLimits:
        """The tenant's own limits (`raw`, its hash) over the defaults; cached as of `now`."""
        own = {k.decode(): v.decode() for k, v in raw.items()}
        merged = msgspec.convert({**msgspec.structs.asdict(self.defaults), **own}, TenantLimits, strict=False)
        self._limits[tenant] = (now, merged)
        return merged

    async def overrides(self, tenant: str) -> dict[str, str]:
        raw = await self.redis.hgetall(f"{self._tag(tenant)}:limits")
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def set_limits(self, tenant: str, values: dict[str, Any], reset: Sequence[str] = ()) -> None:
        """Set some of the tenant's limits (`FIELDS`); `reset` ones go back to the deployment's defaults."""
        unknown = (set(values) | set(reset)) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown limits: {', '.join(sorted(unknown))}")
        pairs = [x for k, v in values.items() for x in (k, str(v))]
        await SET_LIMITS(self.redis, [f"{self._tag(tenant)}:limits"], [len(values), *pairs, *reset])
        self._limits.pop(tenant, None)  # this process sees its own change at once; the others within `max_age_s`

    # -- usage -------------------------------------------------------------------------------------
    async def usage(self, tenant: str, days: int) -> list[UsageDay]:
        """The tenant's counters for the last `days` UTC days, newest first."""
        pipe = self.redis.pipeline(transaction=False)
        names = self._queue_usage(pipe, tenant, days)
        return self._usage_days(names, await pipe.execute())

    async def report(self, tenant: str, days: int) -> tuple[TenantLimits, list[UsageDay]]:
        """The tenant's limits as they apply now and its counters for the last `days` days, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(f"{self._tag(tenant)}:limits")
        names = self._queue_usage(pipe, tenant, days)
        raw, *replies = await pipe.execute()
        return self._merged(tenant, raw, time.monotonic()), self._usage_days(names, replies)

    def _queue_usage(self, pipe: Any, tenant: str, days: int) -> list[str]:
        start = datetime.now(UTC).date()
        names = [(start - timedelta(days=i)).isoformat() for i in range(days)]
        tag = self._tag(tenant)
        for day in names:
            pipe.get(f"{tag}:requests:{day}")
            for p in range(self.keys.partitions):
                pipe.hmget(self.keys.usage(p, tenant, day), "chats", "prompt_tokens", "completion_tokens")
        return names

    def _usage_days(self, names: list[str], replies: list[Any]) -> list[UsageDay]:
        out = []
        step = 1 + self.keys.partitions
        for i, day in enumerate(names):
            block = replies[i * step : (i + 1) * step]
            u = UsageDay(day=day, requests=int(block[0] or 0))
            for chats, prompt, completion in block[1:]:
                u.chats += int(chats or 0)
                u.prompt_tokens += int(prompt or 0)
                u.completion_tokens += int(completion or 0)
            out.append(u)
        return out
