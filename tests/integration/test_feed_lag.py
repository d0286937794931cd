"""The projection lag the metrics report (`RedisFeed.lag`), on both backends: every acknowledged write not yet
projected is counted once, pending or not, and the oldest one's time is the feed entry's own."""

from __future__ import annotations

from shared.adapters.redis.feed import RedisFeed
from tests.integration.test_projector import KEYS, projector, wire, write


async def oldest_entry_ms(redis, partition: int) -> int:
    [(entry_id, _)] = await redis.xrange(KEYS.feed(partition), count=1)
    return int(entry_id.split(b"-")[0])


async def test_lag_counts_unprojected_writes_before_any_projector_exists(redis):
    _, service = wire(redis)
    await write(service, 3, 2)  # 3 creations + 6 messages: 9 writes, 9 feed entries
    lag = await RedisFeed(redis, KEYS, "probe").lag()
    assert [row.partition for row in lag] == list(range(KEYS.partitions))
    assert sum(row.entries for row in lag) == 9
    assert all(row.pending == 0 for row in lag)
    for row in lag:
        assert row.oldest_ms == (await oldest_entry_ms(redis, row.partition) if row.entries else None)


async def test_lag_counts_pending_entries_and_clears_once_projected(redis):
    _, service = wire(redis)
    p = projector(redis, "c1", block=False)
    await p.feed.ensure_groups()
    await write(service, 4, 3)  # 16 writes
    read = await p.feed.read(2, None)  # up to 2 per partition, not acknowledged yet
    assert read
    lag = await p.feed.lag()
    assert sum(row.entries for row in lag) == 16
    assert sum(row.pending for row in lag) == len(read)
    for row in lag:
        assert row.oldest_ms == (await oldest_entry_ms(redis, row.partition) if row.entries else None)
    await p.projection.handle(read)
    while entries := await p.feed.read(50, None):
        await p.projection.handle(entries)
    lag = await p.feed.lag()
    assert [(row.entries, row.pending, row.oldest_ms) for row in lag] == [(0, 0, None)] * KEYS.partitions
