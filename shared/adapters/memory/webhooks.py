"""Webhook subscriptions in memory (the `Webhooks` port), with the Redis scripts' promises: a cursor moves only in
its epoch, deleted subscriptions keep no deliveries, one lease holder at a time until its TTL lapses."""

from __future__ import annotations

from datetime import datetime

import msgspec

from shared.adapters.memory.store import Memory, Stream, entry_text, parse_entry_id
from shared.app.ports import Cursor
from shared.domain.webhooks import MAX_SEQ, OutboxEntry, Subscription

__all__ = ["MemoryWebhooks"]

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Subscription).decode


class MemoryWebhooks:
    def __init__(self, memory: Memory) -> None:
        self.memory = memory

    async def create(self, sub: Subscription, change: bytes) -> None:
        self._changed(sub.tenant, change)
        now_ms = int(self.memory.clock() * 1000)
        self.memory.webhooks[sub.id] = {
            "sub": _encode(sub),
            "start": f"{now_ms - 1}-{MAX_SEQ}",
            "cursors": {},
            "epoch": 0,
        }

    async def get(self, tenant: str, sub_id: str) -> Subscription | None:
        record = self.memory.webhooks.get(sub_id)
        sub = _decode(record["sub"]) if record else None
        return sub if sub is not None and sub.tenant == tenant else None

    async def of(self, tenant: str) -> list[Subscription]:
        subs = [_decode(r["sub"]) for r in self.memory.webhooks.values()]
        return sorted((s for s in subs if s.tenant == tenant), key=lambda s: s.id)

    async def ids(self) -> list[str]:
        return sorted(self.memory.webhooks)

    async def load(self, sub_id: str) -> tuple[Subscription, Cursor] | None:
        record = self.memory.webhooks.get(sub_id)
        if record is None:
            return None
        cursor = Cursor(epoch=record["epoch"], start=record["start"], partitions=dict(record["cursors"]))
        return _decode(record["sub"]), cursor

    async def update(self, sub: Subscription, change: bytes, was: datetime) -> bool | None:
        record = self.memory.webhooks.get(sub.id)
        if record is None:
            return False
        if _decode(record["sub"]).updated_at != was:
            return None
        record["sub"] = _encode(sub)
        self._changed(sub.tenant, change)
        return True

    async def delete(self, tenant: str, sub_id: str, change: bytes) -> bool:
        if await self.get(tenant, sub_id) is None:
            return False
        self._changed(tenant, change)
        del self.memory.webhooks[sub_id]
        self.memory.deliveries.pop(sub_id, None)
        self.memory.webhook_leases.pop(sub_id)
        return True

    async def replay(self, tenant: str, sub_id: str, after: str, change: bytes) -> bool:
        if await self.get(tenant, sub_id) is None:
            return False
        record = self.memory.webhooks[sub_id]
        record.update(start=after, cursors={}, epoch=record["epoch"] + 1)
        self._changed(tenant, change)
        return True

    async def changes(self, tenant: str, after: str | None, limit: int) -> tuple[list[bytes], str | None]:
        stream = self.memory.webhook_changes.get(tenant)
        start = (parse_entry_id(after) or (0, 0)) if after else (0, 0)
        entries = stream.after(start, limit + 1) if stream else []
        page = entries[:limit]
        return [d for _, d in page], (entry_text(page[-1][0]) if len(entries) > limit else None)

    def _changed(self, tenant: str, change: bytes) -> None:
        self.memory.webhook_changes.setdefault(tenant, Stream()).add(change, self.memory.clock())

    async def advance(self, sub_id: str, epoch: int, partition: int, position: str) -> bool:
        record = self.memory.webhooks.get(sub_id)
        if record is None or record["epoch"] != epoch:
            return False
        record["cursors"][partition] = position
        return True

    async def record(self, sub_id: str, delivery: bytes, keep: int) -> None:
        if sub_id in self.memory.webhooks:
            listed = self.memory.deliveries.setdefault(sub_id, [])
            listed.insert(0, delivery)
            del listed[keep:]

    async def deliveries(self, sub_id: str, limit: int) -> list[bytes]:
        return self.memory.deliveries.get(sub_id, [])[:limit]

    async def lease(self, sub_id: str, holder: str, ttl_ms: int) -> bool:
        leases = self.memory.webhook_leases
        current = leases.get(sub_id)
        if current is not None and current != holder:
            return False
        leases.pop(sub_id)
        leases.set(sub_id, holder)
        leases.expire(sub_id, ttl_ms / 1000)
        return True

    async def release(self, sub_id: str, holder: str) -> None:
        if self.memory.webhook_leases.get(sub_id) == holder:
            self.memory.webhook_leases.pop(sub_id)

    async def outbox(self, after: dict[int, str], count: int) -> dict[int, list[OutboxEntry]]:
        return {p: self._read(p, position, count) for p, position in after.items()}

    def _read(self, partition: int, after: str, count: int) -> list[OutboxEntry]:
        start = parse_entry_id(after) or (0, 0)
        return [
            OutboxEntry(
                partition=partition,
                position=entry_text(eid),
                tenant=tenant,
                session_id=sid,
                version=version,
                event_type=kind,
                event_id=event_id,
            )
            for eid, (tenant, sid, version, kind, event_id) in self.memory.outbox[partition].after(start, count)
        ]
