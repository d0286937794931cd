"""Webhook subscriptions in Redis (the `Webhooks` port): every subscription key shares the `{wh}` hash tag, so each
change is one script in one slot; the outbox they read is the partitions' own stream, which `APPLY` writes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from shared.adapters.redis.cluster import Client
from shared.adapters.redis.keys import Keys
from shared.adapters.redis.scripts import (
    WEBHOOK_ADVANCE,
    WEBHOOK_CREATE,
    WEBHOOK_DELETE,
    WEBHOOK_LEASE,
    WEBHOOK_RECORD,
    WEBHOOK_RELEASE,
    WEBHOOK_REPLAY,
    WEBHOOK_UPDATE,
)
from shared.app.ports import Cursor
from shared.domain.webhooks import OutboxEntry, Subscription

__all__ = ["RedisWebhooks"]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Subscription).decode


class RedisWebhooks:
    def __init__(self, redis: Client, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def create(self, sub: Subscription, change: bytes) -> None:
        k = self.keys
        keys = [k.webhook(sub.id), k.webhooks_of(sub.tenant), k.webhooks, k.webhook_changes(sub.tenant)]
        await WEBHOOK_CREATE(self.redis, keys, [sub.id, _encode(sub), change])

    async def get(self, tenant: str, sub_id: str) -> Subscription | None:
        raw = await self.redis.hget(self.keys.webhook(sub_id), "j")
        sub = _decode(raw) if raw else None
        return sub if sub is not None and sub.tenant == tenant else None

    async def of(self, tenant: str) -> list[Subscription]:
        ids = await self.redis.zrange(self.keys.webhooks_of(tenant), 0, -1)
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for sub_id in ids:
            pipe.hget(self.keys.webhook(sub_id.decode()), "j")
        return [s for raw in await pipe.execute() if raw and (s := _decode(raw)).tenant == tenant]

    async def ids(self) -> list[str]:
        return sorted(i.decode() for i in await self.redis.smembers(self.keys.webhooks))

    async def load(self, sub_id: str) -> tuple[Subscription, Cursor] | None:
        fields: dict[bytes, bytes] = await self.redis.hgetall(self.keys.webhook(sub_id))
        if b"j" not in fields:
            return None
        partitions = {int(f[1:]): v.decode() for f, v in fields.items() if f.startswith(b"c")}
        cursor = Cursor(epoch=int(fields[b"epoch"]), start=fields[b"start"].decode(), partitions=partitions)
        return _decode(fields[b"j"]), cursor

    async def update(self, sub: Subscription, change: bytes, was: datetime) -> bool | None:
        keys = [self.keys.webhook(sub.id), self.keys.webhook_changes(sub.tenant)]
        done = int(await WEBHOOK_UPDATE(self.redis, keys, [_encode(sub), change, _encode(was)[1:-1]]))
        return None if done == -1 else bool(done)

    async def delete(self, tenant: str, sub_id: str, change: bytes) -> bool:
        k = self.keys
        keys = [
            k.webhook(sub_id),
            k.webhooks_of(tenant),
            k.webhooks,
            k.deliveries(sub_id),
            k.webhook_lease(sub_id),
            k.webhook_changes(tenant),
        ]
        return bool(await WEBHOOK_DELETE(self.redis, keys, [sub_id, change]))

    async def replay(self, tenant: str, sub_id: str, after: str, change: bytes) -> bool:
        if await self.get(tenant, sub_id) is None:
            return False
        keys = [self.keys.webhook(sub_id), self.keys.webhook_changes(tenant)]
        return bool(await WEBHOOK_REPLAY(self.redis, keys, [after, change]))

    async def changes(self, tenant: str, after: str | None, limit: int) -> tuple[list[bytes], str | None]:
        start = f"({after}" if after else "-"
        entries = await self.redis.xrange(self.keys.webhook_changes(tenant), start, "+", count=limit + 1)
        page = entries[:limit]
        return [f[b"d"] for _, f in page], (page[-1][0].decode() if len(entries) > limit else None)

    async def advance(self, sub_id: str, epoch: int, partition: int, position: str) -> bool:
        args = [epoch, f"c{partition}", position]
        return bool(await WEBHOOK_ADVANCE(self.redis, [self.keys.webhook(sub_id)], args))

    async def record(self, sub_id: str, delivery: bytes, keep: int) -> None:
        await WEBHOOK_RECORD(self.redis, [self.keys.webhook(sub_id), self.keys.deliveries(sub_id)], [delivery, keep])

    async def deliveries(self, sub_id: str, limit: int) -> list[bytes]:
        return list(await self.redis.lrange(self.keys.deliveries(sub_id), 0, limit - 1))

    async def lease(self, sub_id: str, holder: str, ttl_ms: int) -> bool:
        return bool(await WEBHOOK_LEASE(self.redis, [self.keys.webhook_lease(sub_id)], [holder, ttl_ms]))

    async def release(self, sub_id: str, holder: str) -> None:
        await WEBHOOK_RELEASE(self.redis, [self.keys.webhook_lease(sub_id)], [holder])

    async def outbox(self, after: dict[int, str], count: int) -> dict[int, list[OutboxEntry]]:
        """One pipeline (on a cluster, each node its share, in parallel)."""
        if not after:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for p, position in after.items():
            pipe.xrange(self.keys.outbox(p), f"({position}", "+", count=count)
        read = await pipe.execute()
        return {p: [_entry(p, eid, fields) for eid, fields in entries] for p, entries in zip(after, read)}


def _entry(partition: int, entry_id: bytes, f: dict[bytes, Any]) -> OutboxEntry:
    return OutboxEntry(
        partition=partition,
        position=entry_id.decode(),
        tenant=f[b"t"].decode(),
        session_id=f[b"s"].decode(),
        version=int(f[b"v"]),
        event_type=f[b"e"].decode(),
        event_id=f[b"i"].decode(),
    )
