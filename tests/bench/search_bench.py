"""Row P10: finding sessions (`GET /sessions` with filters, `GET /sessions/count`) at 10k / 100k / 1M sessions of
one tenant, over HTTP against `parley api`. See docs/performance.md.

The sessions are written synthetically, straight into Redis with pipelined commands (appending and projecting a
million sessions through the API would take hours on this machine): for each session its head and view hashes
(`v`, `t`, the session JSON, the `ix` of its search entries) and its search index entries, exactly what APPLY
writes for a new session (`shared.domain.search.entries`), and no log. 100 agents (1 % of the sessions each),
1,000 users (0.1 % each, each user's sessions all of one agent). Each size adds sessions to the previous one, so
the 1M figures are on the same index grown 100×; the figure to read is the same-run ratio 1M vs 10k.

Run by the harness: python -m tests.bench --rows P10 [--quick] [--reps N] [--seconds S]
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from shared.adapters.redis.keys import Keys
from shared.adapters.redis.store import pack
from shared.domain.ids import partition_of, uuid7
from shared.domain.search import Position, encode_cursor, entries, query_of
from shared.domain.state import SessionState
from shared.domain.wire import Session

__all__ = ["run"]

PIPELINE = 2_000
"""Sessions written per pipeline."""


def _populate(bench: Any, keys: Keys, start: int, stop: int, base: datetime) -> list[tuple[str, int]]:
    """Sessions `start`..`stop - 1`; answers (id, updated ms) of each."""
    from tests.bench.harness import TENANT

    out = []
    pipe = bench.redis.pipeline(transaction=False)
    for i in range(start, stop):
        sid = uuid7()
        created = base + timedelta(seconds=i)
        session = Session(
            id=sid,
            agent_id=f"agent-{i % 100}",
            user_id=f"user-{i % 1000}",
            situation=None,
            token_budget=None,
            context_overflow=None,
            tools=[],
            metadata={"tier": i % 3},
            version=1,
            created_at=created,
            updated_at=created + timedelta(milliseconds=i % 977),
        )
        members = entries(SessionState(id=sid, version=1, session=session))
        p = partition_of(sid, keys.partitions)
        pipe.hset(keys.head(sid), mapping={"v": 1, "t": TENANT})
        pipe.hset(keys.view(sid), mapping={"v": 1, "t": TENANT, "j": msgspec.json.encode(session), "ix": pack(members)})
        pipe.zadd(keys.search(p, TENANT), dict.fromkeys(members, 0))
        out.append((sid, int(session.updated_at.timestamp() * 1000)))
        if (i + 1) % PIPELINE == 0:
            pipe.execute()
            pipe = bench.redis.pipeline(transaction=False)
    pipe.execute()
    return out


def run(bench: Any) -> None:
    from tests.bench.harness import PARTITIONS, TENANT, load, med

    a = bench.args
    keys = Keys(PARTITIONS)
    sizes = [1_000, 10_000] if a.quick else [10_000, 100_000, 1_000_000]
    base = datetime(2026, 1, 1, tzinfo=UTC)
    made: list[tuple[str, int]] = []
    out: dict[str, Any] = {}
    for n in sizes:
        t = time.perf_counter()
        made += _populate(bench, keys, len(made), n, base)
        out[f"populate_s_{n}"] = round(time.perf_counter() - t, 1)
        index_bytes = sum(
            int(bench.redis.memory_usage(keys.search(p, TENANT), samples=0) or 0) for p in range(PARTITIONS)
        )
        out[f"index_bytes_per_session_{n}"] = round(index_bytes / n)
        # a cursor in the middle of agent-7's sessions by last change: a deep page
        deep = sorted((ms, sid) for i, (sid, ms) in enumerate(made) if i % 100 == 7)[len(made) // 200]
        query = query_of(agent_id="agent-7", sort="-updated_at")
        cursor = encode_cursor(query, Position(deep[0], deep[1]))
        paths = {
            # the same-run baseline: one session read by id (one Lua call on two keys), among the same keys
            "get_one": [f"/sessions/{sid}" for sid, _ in made[:: max(1, len(made) // 200)]],
            "all": ["/sessions?limit=50"],
            "agent": ["/sessions?agent_id=agent-7&limit=50"],
            "agent_user": ["/sessions?agent_id=agent-7&user_id=user-7&limit=50"],
            "agent_deep": [f"/sessions?agent_id=agent-7&sort=-updated_at&limit=50&after={cursor}"],
            "fields": ["/sessions?agent_id=agent-7&limit=50&fields=id,updated_at"],
            "count_agent": ["/sessions/count?agent_id=agent-7"],
            "count_agent_tier": ["/sessions/count?agent_id=agent-7&metadata.tier=1"],
        }
        for name, p in paths.items():
            r = bench.http.get(p[0])
            assert r.status_code == 200, r.text
            runs = [load(bench.api.url, p, a.seconds, a.connections) for _ in range(a.reps)]
            bench.check(runs)
            out[f"{name}_rps_{n}"] = med(runs, "rps")
            out[f"{name}_p50_ms_{n}"] = med(runs, "p50_ms")
        out[f"count_agent_tier_{n}"] = bench.http.get(paths["count_agent_tier"][0]).json()
    big, small = sizes[-1], sizes[0]
    for name in ("get_one", "all", "agent", "agent_user", "agent_deep", "fields", "count_agent", "count_agent_tier"):
        out[f"{name}_cost_ratio_{big}_vs_{small}"] = out[f"{name}_rps_{small}"] / out[f"{name}_rps_{big}"]
    for name in ("all", "agent", "agent_user", "agent_deep", "fields", "count_agent"):
        # what the dataset's size does to a page beyond what it does to any read (Redis's memory, the machine)
        base = out[f"get_one_cost_ratio_{big}_vs_{small}"]
        out[f"{name}_cost_ratio_over_get_one"] = out[f"{name}_cost_ratio_{big}_vs_{small}"] / base
    bench.record("P10", **out, goal="list pages: cost ratio (rps at 10k / rps at 1M) <= 1.2; counts of one filter too")
