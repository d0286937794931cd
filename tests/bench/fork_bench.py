"""Row P11: copy-on-write forks. See docs/performance.md.

For a parent of 100 / 10,000 messages (1,000 with --quick): `POST /sessions/{id}/fork` over HTTP (p50 of 5, the
fork's read models built by the worker after), the bytes the fork's log takes in Redis against its parent's
(`MEMORY USAGE`), and what reading the inherited history costs: `GET …/events?after=1&limit=50` (inherited
events, filled in from the parent's log as they are read) and `GET …/messages?limit=50` on the fork, each against
the same request on the parent in the same run (closed loop, alternated repetition by repetition).

Run by the harness: python -m tests.bench --rows P11 [--quick] [--reps N] [--seconds S]
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from shared.adapters.redis.keys import Keys

__all__ = ["run"]


def run(bench: Any) -> None:
    from tests.bench.harness import PARTITIONS, load, med

    a = bench.args
    keys = Keys(PARTITIONS)
    sizes = [100, 1_000] if a.quick else [100, 10_000]
    out: dict[str, Any] = {}
    for n in sizes:
        parent = bench.preload(n)
        fork_ms, child = [], ""
        for _ in range(5):
            t = time.perf_counter()
            r = bench.http.post(f"/sessions/{parent}/fork", json={})
            fork_ms.append((time.perf_counter() - t) * 1000)
            bench.errors += r.status_code != 201
            child = r.json()["id"]
        deadline = time.monotonic() + 300
        while len(bench.http.get(f"/sessions/{child}/messages?limit=1&offset={n - 1}").json()["items"]) != 1:
            assert time.monotonic() < deadline, "the fork's read models were not built"
            time.sleep(0.05)
        out[f"fork_p50_ms_{n}"] = round(statistics.median(fork_ms), 1)
        out[f"parent_log_bytes_{n}"] = int(bench.redis.memory_usage(keys.log(parent), samples=0) or 0)
        out[f"fork_log_bytes_{n}"] = int(bench.redis.memory_usage(keys.log(child), samples=0) or 0)
        for what, path in (("events", "/events?after=1&limit=50"), ("messages", "/messages?limit=50")):
            mine, theirs = [], []
            for _ in range(a.reps):
                theirs.append(load(bench.api.url, [f"/sessions/{parent}{path}"], a.seconds, a.connections))
                mine.append(load(bench.api.url, [f"/sessions/{child}{path}"], a.seconds, a.connections))
            bench.check(mine + theirs)
            out[f"{what}50_rps_parent_{n}"] = med(theirs, "rps")
            out[f"{what}50_rps_fork_{n}"] = med(mine, "rps")
            out[f"{what}50_fork_ratio_{n}"] = round(med(mine, "rps") / med(theirs, "rps"), 2)
    bench.record("P11", **out, goal="a fork's log O(1) in its parent's length; inherited reads near the parent's")
