"""The projector's feed in memory (the `Feed` port): each partition's stream of "this session changed", read
through one consumer group.

As with Redis streams and `XREADGROUP`: `read` hands each new entry to exactly one consumer and keeps it pending
until acknowledged; `claim_stale` gives a consumer the entries another one has held unacknowledged for
`min_idle_ms` (it died); `trim` drops only what no consumer still needs; `backlog` names every session of entries
not trimmed yet. A blocking `read` waits until an append feeds any partition.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.adapters.memory.store import EntryId, FeedGroup, Memory, entry_text, parse_entry_id
from shared.app.ports import FeedEntry

__all__ = ["GROUP", "MemoryFeed"]

GROUP = "projector"


class MemoryFeed:
    def __init__(self, memory: Memory, consumer: str) -> None:
        self.memory = memory
        self.consumer = consumer

    async def ensure_groups(self) -> None:
        for group in self.memory.feeds.values():
            group.created = True

    def _groups(self) -> dict[int, FeedGroup]:
        feeds = self.memory.feeds
        if not all(g.created for g in feeds.values()):
            raise RuntimeError(f"NOGROUP: the consumer group {GROUP!r} does not exist yet (ensure_groups)")
        return feeds

    async def read(self, count: int, block_ms: int | None) -> list[FeedEntry]:
        out = self._deliver(count)
        if not out and block_ms:
            await self.memory.wait("feed", block_ms / 1000)
            out = self._deliver(count)
        return out

    def _deliver(self, count: int) -> list[FeedEntry]:
        now = self.memory.clock()
        out: list[FeedEntry] = []
        for p, group in self._groups().items():
            for eid, sid in group.stream.after(group.last_delivered, count):
                group.pending[eid] = (self.consumer, now, 1)
                group.last_delivered = eid
                out.append(_entry(p, eid, sid))
        return out

    async def claim_stale(self, min_idle_ms: int, count: int) -> list[FeedEntry]:
        now = self.memory.clock()
        out: list[FeedEntry] = []
        for p, group in self._groups().items():
            claimed = 0
            for eid in sorted(group.pending):
                if claimed == count:
                    break
                _, since, deliveries = group.pending[eid]
                if (now - since) * 1000 < min_idle_ms:
                    continue
                sid = group.stream.get(eid)
                if sid is None:  # trimmed meanwhile: nothing to hand out
                    del group.pending[eid]
                    continue
                group.pending[eid] = (self.consumer, now, deliveries + 1)
                out.append(_entry(p, eid, sid))
                claimed += 1
        return out

    async def ack(self, entries: Sequence[FeedEntry]) -> None:
        for e in entries:
            eid = parse_entry_id(e.entry_id)
            if eid is not None:
                self.memory.feeds[e.partition].pending.pop(eid, None)

    async def trim(self) -> None:
        for group in self.memory.feeds.values():
            if not group.created:
                continue
            floor: EntryId = (group.last_delivered[0], group.last_delivered[1] + 1)
            if group.pending:
                floor = min(group.pending)
            group.stream.trim_below(floor)

    async def backlog(self, partition: int, count: int = 2_000) -> list[str]:
        entries = self.memory.feeds[partition].stream.entries[:count]
        return list(dict.fromkeys(sid for _, sid in entries))

    async def heartbeat(self) -> None:
        self.memory.projectors[self.consumer] = self.memory.clock() * 1000

    async def alive(self, within_ms: int) -> bool:
        beats = self.memory.projectors.values()
        return bool(beats) and max(beats) >= self.memory.clock() * 1000 - within_ms

    async def forget_consumer(self) -> None:
        """Leave the group: like `XGROUP DELCONSUMER`, the entries it still held are dropped, not handed over."""
        for group in self.memory.feeds.values():
            for eid in [eid for eid, (owner, _, _) in group.pending.items() if owner == self.consumer]:
                del group.pending[eid]
        self.memory.projectors.pop(self.consumer, None)


def _entry(partition: int, eid: EntryId, session_id: str) -> FeedEntry:
    return FeedEntry((partition, entry_text(eid).encode(), session_id))
