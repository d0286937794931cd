"""The projector's work queue: each partition's feed stream, read through one consumer group.

A feed entry only names a session that changed; the projector then catches that
session up from its log. So entries can be handled in any order, by any
consumer, any number of times: the read model's version check makes it exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ResponseError

from shared.adapters.redis.cluster import Client, ParleyCluster
from shared.adapters.redis.keys import Keys
from shared.app.ports import FeedEntry, PartitionLag

__all__ = ["GROUP", "RedisFeed", "projector_alive"]

GROUP = "projector"


class RedisFeed:
    def __init__(
        self,
        redis: Client,
        keys: Keys,
        consumer: str,
        blocking: Client | None = None,
        per_partition: bool | None = None,
    ) -> None:
        """`blocking`: the client for blocking reads (its deadline allows for the block); default `redis`.
        `per_partition`: one XREADGROUP per partition (a multi-stream read must stay in one slot); default: on a
        cluster."""
        self.redis = redis
        self.blocking = blocking or redis
        self.keys = keys
        self.consumer = consumer
        self._streams = {keys.feed(p): p for p in range(keys.partitions)}
        self.per_partition = isinstance(redis, ParleyCluster) if per_partition is None else per_partition
        self._reads: dict[str, asyncio.Task[Any]] = {}
        """Per partition: its XREADGROUP in flight (per-partition mode); kept across `read` calls until it answers."""

    async def ensure_groups(self) -> None:
        for stream in self._streams:
            try:
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def read(self, count: int, block_ms: int | None) -> list[FeedEntry]:
        """New entries from every partition: one XREADGROUP over all feeds on one Redis, one per partition on a
        cluster (see `_read_each`)."""
        if self.per_partition:
            return await self._read_each(count, block_ms)
        client = self.blocking if block_ms else self.redis
        reply = await client.xreadgroup(
            GROUP, self.consumer, {s: ">" for s in self._streams}, count=count, block=block_ms
        )
        return self._entries(reply or [])

    async def _read_each(self, count: int, block_ms: int | None) -> list[FeedEntry]:
        """Without a block: one pipeline of a non-blocking XREADGROUP per partition (a cluster pipeline sends each
        node its share in parallel). With one: each partition's feed has its own blocking XREADGROUP in flight (on
        the blocking client, one connection per partition), and this answers the entries of those that answered
        first. A read still in flight is kept for the next call rather than cancelled, so entries Redis hands out
        are never lost in a cancelled reply (they would wait in the pending list for `claim_stale`)."""
        out: list[FeedEntry] = []
        if not block_ms:
            await asyncio.sleep(0)
            out += self._answered()
            pipe = self.redis.pipeline(transaction=False)
            idle = [s for s in self._streams if s not in self._reads]
            for stream in idle:
                pipe.xreadgroup(GROUP, self.consumer, {stream: ">"}, count=count)
            for reply in await pipe.execute() if idle else []:
                out += self._entries(reply or [])
            return out
        for stream in self._streams:
            if stream not in self._reads:
                self._reads[stream] = asyncio.ensure_future(
                    self.blocking.xreadgroup(GROUP, self.consumer, {stream: ">"}, count=count, block=block_ms)
                )
        await asyncio.wait(self._reads.values(), return_when=asyncio.FIRST_COMPLETED)
        return self._answered()

    def _answered(self) -> list[FeedEntry]:
        """The entries of the blocking reads that answered (raises what one raised, after stopping the others)."""
        out: list[FeedEntry] = []
        failed: BaseException | None = None
        for stream, task in list(self._reads.items()):
            if task.done():
                del self._reads[stream]
                if task.cancelled():
                    continue
                if task.exception() is not None:
                    failed = failed or task.exception()
                else:
                    out.extend(self._entries(task.result() or []))
        if failed is not None:
            for (
                task
            ) in self._reads.values():  # the supervisor restarts the reader; what was handed out is claimed again
                task.cancel()
            self._reads = {}
            raise failed
        return out

    async def close(self) -> None:
        """Stop the reads in flight (per-partition mode). Entries they were handed are claimed after the idle time."""
        reads, self._reads = list(self._reads.values()), {}
        for task in reads:
            task.cancel()
        for task in reads:
            with contextlib.suppress(BaseException):
                await task

    async def claim_stale(self, min_idle_ms: int, count: int) -> list[FeedEntry]:
        """Take over entries that a dead consumer read but never acknowledged."""
        out: list[FeedEntry] = []
        for stream, p in self._streams.items():
            reply = await self.redis.xautoclaim(stream, GROUP, self.consumer, min_idle_ms, "0-0", count=count)
            out.extend(FeedEntry((p, eid, f[b"s"].decode())) for eid, f in reply[1] if f)
        return out

    async def backlog(self, partition: int, count: int = 2_000) -> list[str]:
        """The sessions the feed names in entries not yet trimmed (pending, undelivered, or acknowledged since the
        last trim): a superset of the partition's unprojected sessions, for a reader that catches them up."""
        entries = await self.redis.xrange(self.keys.feed(partition), count=count)
        return list(dict.fromkeys(f[b"s"].decode() for _, f in entries if f))

    async def ack(self, entries: Sequence[FeedEntry]) -> None:
        by_stream: dict[str, list[bytes]] = {}
        for e in entries:
            by_stream.setdefault(self.keys.feed(e.partition), []).append(e.entry_id)
        pipe = self.redis.pipeline(transaction=False)
        for stream, ids in by_stream.items():
            pipe.xack(stream, GROUP, *ids)
        await pipe.execute()

    async def trim(self) -> None:
        """Drop entries every consumer is done with: older than the oldest pending or undelivered one."""
        for stream in self._streams:
            groups = await self.redis.xinfo_groups(stream)
            group = next((g for g in groups if g["name"] == GROUP.encode()), None)
            if group is None:
                continue
            ms, seq = _id_key(group["last-delivered-id"])
            floor = f"{ms}-{seq + 1}"  # everything delivered so far, unless some is still pending
            summary = await self.redis.xpending(stream, GROUP)
            if summary and summary.get("pending"):
                floor = summary["min"].decode()
            await self.redis.xtrim(stream, minid=floor, approximate=False)

    async def lag(self) -> list[PartitionLag]:
        pipe = self.redis.pipeline(transaction=False)
        for stream in self._streams:
            pipe.xinfo_groups(stream)
            pipe.xpending(stream, GROUP)
        replies = await pipe.execute(raise_on_error=False)
        seen: list[tuple[int, str, int | None, int, bytes | None]] = []
        """(partition, last delivered id, undelivered count or None, pending count, oldest pending id)"""
        for p, groups, pending in zip(self._streams.values(), replies[0::2], replies[1::2]):
            if isinstance(groups, Exception):  # no feed stream yet: nothing to project
                seen.append((p, "0-0", 0, 0, None))
                continue
            group = next((g for g in groups if g["name"] == GROUP.encode()), None)
            delivered = group["last-delivered-id"].decode() if group else "0-0"
            count = int(pending["pending"]) if group and pending and not isinstance(pending, Exception) else 0
            seen.append((p, delivered, group.get("lag") if group else None, count, pending["min"] if count else None))
        pipe = self.redis.pipeline(transaction=False)
        for p, delivered, _, _, _ in seen:
            pipe.xrange(self.keys.feed(p), min=f"({delivered}", count=1)  # the oldest undelivered entry
            pipe.xlen(self.keys.feed(p))
        heads = await pipe.execute(raise_on_error=False)
        out = []
        for (p, _, undelivered, count, oldest), first, length in zip(seen, heads[0::2], heads[1::2]):
            first = first if isinstance(first, list) else []
            if undelivered is None:  # Redis cannot count them (entries were deleted): the stream's length bounds it
                undelivered = int(length) if first and isinstance(length, int) else 0
            ids = [i for i in (oldest, first[0][0] if first else None) if i is not None]
            oldest_ms = min(_id_key(i)[0] for i in ids) if ids else None
            out.append(PartitionLag(partition=p, entries=int(undelivered) + count, pending=count, oldest_ms=oldest_ms))
        return out

    async def heartbeat(self) -> None:
        await self.redis.zadd(self.keys.projectors, {self.consumer: int(time.time() * 1000)})

    async def alive(self, within_ms: int) -> bool:
        return await projector_alive(self.redis, self.keys, within_ms)

    async def forget_consumer(self) -> None:
        await self.close()
        for stream in self._streams:
            await self.redis.xgroup_delconsumer(stream, GROUP, self.consumer)
        await self.redis.zrem(self.keys.projectors, self.consumer)

    def _entries(self, reply: list) -> list[FeedEntry]:
        out = []
        for stream, items in reply:
            p = self._streams[stream.decode() if isinstance(stream, bytes) else stream]
            out.extend(FeedEntry((p, eid, f[b"s"].decode())) for eid, f in items if f)
        return out


async def projector_alive(redis: Client, keys: Keys, within_ms: int = 10_000) -> bool:
    newest = await redis.zrevrange(keys.projectors, 0, 0, withscores=True)
    return bool(newest) and newest[0][1] >= time.time() * 1000 - within_ms


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)
