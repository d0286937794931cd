"""Row P4 (OpenAI path): what `POST /sessions/{id}/chat/completions` adds over `POST /sessions/{id}/chat`.

Both synchronous, against the zero-latency model, in the same run, interleaved request by request so drift hits
both alike. Two OpenAI-client shapes: one that sends only the new turn, and one that resends the whole growing
conversation every call (the drop-in case: its messages are compared with the stored ones).

python -m tests.bench.openai_bench [--quick] [--reps N] [--calls N] [--per-session N]

Starts its own processes through the harness (`tests.bench.harness.Bench`); prints one JSON line per repetition
and the medians. `p4_openai(bench)` measures on a harness already started, for the harness's own P4 row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import httpx

from tests.bench.harness import KEY, Bench

CALLS_PER_SESSION = 4


async def interleaved(
    api_url: str, key: str, chat_ids: list[str], oa_new_ids: list[str], oa_full_ids: list[str], n: int
) -> dict[str, Any]:
    """n rounds of: one /chat, one /chat/completions with the new turn only, one with the whole conversation."""
    headers = {"Authorization": f"Bearer {key}"}
    chat, oa_new, oa_full, errors = [], [], [], 0
    history: dict[str, list[dict[str, Any]]] = {sid: [] for sid in oa_full_ids}
    async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=30) as c:
        for i in range(n):
            turn = {"role": "user", "content": f"hi {i}"}
            sid = chat_ids[i % len(chat_ids)]
            t = time.perf_counter()
            r = await c.post(f"/sessions/{sid}/chat", json={"messages": [turn], "max_tokens": 50})
            chat.append(time.perf_counter() - t)
            errors += r.status_code != 200

            sid = oa_new_ids[i % len(oa_new_ids)]
            t = time.perf_counter()
            r = await c.post(
                f"/sessions/{sid}/chat/completions", json={"model": "zero", "messages": [turn], "max_tokens": 50}
            )
            oa_new.append(time.perf_counter() - t)
            errors += r.status_code != 200

            sid = oa_full_ids[i % len(oa_full_ids)]
            convo = history[sid] + [turn]
            t = time.perf_counter()
            r = await c.post(
                f"/sessions/{sid}/chat/completions", json={"model": "zero", "messages": convo, "max_tokens": 50}
            )
            oa_full.append(time.perf_counter() - t)
            if r.status_code == 200:
                history[sid] = convo + [r.json()["choices"][0]["message"]]
            else:
                errors += 1
    ms = 1000.0
    return {
        "chat_sync_p50_ms": statistics.median(chat) * ms,
        "completions_new_turn_p50_ms": statistics.median(oa_new) * ms,
        "completions_full_history_p50_ms": statistics.median(oa_full) * ms,
        "errors": errors,
    }


def p4_openai(bench: Bench, reps: int, calls: int, per_session: int = CALLS_PER_SESSION) -> dict[str, Any]:
    sessions = max(1, calls // per_session)
    runs = []
    for _ in range(reps):
        ids = bench.sessions(sessions * 3)
        run = asyncio.run(
            interleaved(bench.api.url, KEY, ids[:sessions], ids[sessions : 2 * sessions], ids[2 * sessions :], calls)
        )
        print(json.dumps(run), flush=True)
        runs.append(run)
    bench.errors += sum(r["errors"] for r in runs)

    def med(field: str) -> float:
        return statistics.median(r[field] for r in runs)

    chat = med("chat_sync_p50_ms")
    new, full = med("completions_new_turn_p50_ms"), med("completions_full_history_p50_ms")
    return {
        "chat_sync_p50_ms": chat,
        "completions_new_turn_p50_ms": new,
        "completions_full_history_p50_ms": full,
        "new_turn_added_ms": new - chat,
        "full_history_added_ms": full - chat,
        "new_turn_ratio": new / chat,
        "full_history_ratio": full / chat,
        "calls_per_session": per_session,
        "errors": sum(r["errors"] for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.openai_bench")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--calls", type=int)
    parser.add_argument(
        "--per-session",
        type=int,
        default=CALLS_PER_SESSION,
        help="calls per session (the full-history conversation grows to 2x this)",
    )
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.quick else 5)
    calls = args.calls or (20 if args.quick else 200)
    bench = Bench(argparse.Namespace(quick=args.quick, reps=reps, seconds=1.0, connections=1))
    bench.start()
    try:
        row = p4_openai(bench, reps, calls, args.per_session)
    finally:
        bench.stop()
    print("P4-openai: " + json.dumps(row), flush=True)
    return 1 if row["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
