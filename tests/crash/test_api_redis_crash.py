"""Crash test: kill -9 an API process and then redis-server itself while writes are in flight.

After Redis restarts from its AOF (appendfsync always), every write that got a 2xx
is in the log exactly once and in the read models; writes that failed may or may
not be there, but nothing is duplicated. The worker that saw Redis die is kept and
must reconnect by itself; so must the API process that survived.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest
from redis.asyncio import Redis

from shared.domain.events import SessionCreated
from tests.crash.test_projector_crash import (
    as_json,
    assert_running,
    audit_all,
    audit_over_http,
    keys_of,
    log_tail,
    run_all,
    wait_caught_up,
    wait_for,
    worker_registered,
)
from tests.support import auth

pytestmark = pytest.mark.slow

WRITERS = 8
MESSAGES_PER_SESSION = 30
BURST = 24
HARD_DEADLINE_S = 45.0
"""Nothing in this test waits past this many seconds from its start (idempotent retries included)."""


@dataclass
class Ledger:
    """What the clients were told. `acked` entries are promises the service must keep."""

    creates: dict[str, dict] = field(default_factory=dict)
    """session id → the 201 body of its create"""
    create_writer: dict[str, int] = field(default_factory=dict)
    messages: dict[str, dict[str, dict]] = field(default_factory=dict)
    """session id → message id → the 201 body"""
    acks: int = 0
    acks_by_url: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    """why non-2xx or no answer, counted (503, ConnectError, ...)"""
    server_errors: list[str] = field(default_factory=list)
    """5xx other than 503: tolerated for the data contract, reported"""
    unexpected: list[str] = field(default_factory=list)
    """4xx: no request of this test is invalid, so each is a bug"""
    unresolved: list[str] = field(default_factory=list)
    """idempotent requests that never got a 2xx before the deadline"""


async def test_api_and_redis_killed_mid_writes_keep_every_acknowledged_write(fresh_redis, spawn):
    started = time.monotonic()
    hard_deadline = started + HARD_DEADLINE_S
    server = fresh_redis()
    api_a, api_b, worker = await asyncio.gather(
        asyncio.to_thread(spawn, "api", server.url),
        asyncio.to_thread(spawn, "api", server.url),
        asyncio.to_thread(spawn, "worker", server.url),
    )
    pre = Redis.from_url(server.url)
    try:
        keys = await keys_of(pre)
        await wait_for(lambda: worker_registered(pre, keys, worker), 15, "the worker to register")
    finally:
        await pre.aclose()

    apis = [api_a.url, api_b.url]
    """Where the writers send requests; the dead API A stays in it (clients keep trying) until C replaces it."""
    ledger = Ledger()
    stop = asyncio.Event()
    phase = {"redis_restarted": False}
    acks_after_restart: Counter = Counter()
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0), limits=httpx.Limits(max_connections=64)) as client:

        async def send(
            w: int, n: int, tenant: str, path: str, body: dict, key: str | None, first: str | None = None
        ) -> dict | None:
            """POST once (no key) or until a 2xx (with an Idempotency-Key); the 2xx body, or None."""
            attempt = 0
            while True:
                url = first if first and attempt == 0 else apis[(w + n + attempt) % len(apis)]
                headers = auth(tenant) | ({"Idempotency-Key": key} if key else {})
                try:
                    res = await client.post(url + path, json=body, headers=headers)
                except httpx.TransportError as e:
                    res, why = None, type(e).__name__
                else:
                    why = str(res.status_code)
                if res is not None and 200 <= res.status_code < 300:
                    ledger.acks += 1
                    ledger.acks_by_url[url] += 1
                    if phase["redis_restarted"]:
                        acks_after_restart[url] += 1
                    return res.json()
                if res is not None and 400 <= res.status_code < 500:
                    ledger.unexpected.append(f"POST {path} via {url}: {res.status_code} {res.text[:300]}")
                    return None
                if res is not None and res.status_code != 503:
                    ledger.server_errors.append(f"POST {path} via {url}: {res.status_code} {res.text[:300]}")
                ledger.failures[why] += 1
                if key is None:
                    return None
                if time.monotonic() >= hard_deadline - 10:
                    ledger.unresolved.append(f"POST {path} key {key}: last {why}")
                    return None
                attempt += 1
                await asyncio.sleep(0.05)

        async def writer(w: int) -> None:
            """Writer w: even writers send Idempotency-Keys and retry until acknowledged; odd ones never retry."""
            tenant = "globex" if w % 4 == 3 else "acme"
            idempotent = w % 2 == 0
            current: str | None = None
            in_current = 0
            n = 0
            while not stop.is_set() and time.monotonic() < hard_deadline - 10:
                n += 1
                key = f"w{w}-{n}" if idempotent else None
                if current is None or in_current >= MESSAGES_PER_SESSION:
                    body = {"situation": f"w{w}-c{n}", "metadata": {"w": w, "n": n}}
                    got = await send(w, n, tenant, "/sessions", body, key)
                    if got is not None:
                        current, in_current = got["id"], 0
                        ledger.creates[current] = got
                        ledger.create_writer[current] = w
                        ledger.messages[current] = {}
                else:
                    body = {"role": "user", "content": f"w{w}-n{n}"}
                    got = await send(w, n, tenant, f"/sessions/{current}/messages", body, key)
                    if got is not None:
                        in_current += 1
                        ledger.messages[current][got["id"]] = got
                await asyncio.sleep(0.01 if got is not None else 0.03)

        events: dict[str, int] = {}

        def no_unexpected() -> None:
            assert ledger.unexpected == [], (
                f"{len(ledger.unexpected)} unexpected 4xx answers, e.g. {ledger.unexpected[:5]}"
            )

        async def acks_reach(n: int, what: str) -> None:
            async def check() -> bool:
                no_unexpected()
                return ledger.acks >= n

            await wait_for(check, 30, what)

        bursts: list[asyncio.Task] = []

        async def burst(name: str, url: str) -> None:
            """Fire BURST idempotent messages at `url` at once (into idempotent writers' sessions) and return once
            the first is acknowledged: the rest are in flight, some appended but not yet answered, when we kill.
            Each is retried with its key until acknowledged, so each must end up in the log exactly once."""
            targets = [sid for sid, w in ledger.create_writer.items() if w % 2 == 0]
            first_ack = asyncio.Event()

            async def one(i: int) -> None:
                sid = targets[i % len(targets)]
                tenant = "globex" if ledger.create_writer[sid] % 4 == 3 else "acme"
                key = f"{name}-{i}"
                got = await send(
                    0, i, tenant, f"/sessions/{sid}/messages", {"role": "user", "content": key}, key, first=url
                )
                if got is not None:
                    ledger.messages[sid][got["id"]] = got
                first_ack.set()

            bursts.extend(asyncio.create_task(one(i)) for i in range(BURST))
            await asyncio.wait_for(first_ack.wait(), 15)

        async def crash() -> None:
            await acks_reach(300, "300 acknowledged writes")
            await burst("burst-a", api_a.url)
            api_a.kill()
            events["api_killed_at_ack"] = ledger.acks
            await acks_reach(ledger.acks + 150, "150 more writes acknowledged through API B")
            await burst("burst-b", api_b.url)
            server.kill()
            events["redis_killed_at_ack"] = ledger.acks
            await asyncio.sleep(0.5)  # writers keep trying: A refuses connections, B cannot reach Redis
            await asyncio.to_thread(server.start)  # same port, same data dir, same AOF
            phase["redis_restarted"] = True
            events["redis_restarted_at_ack"] = ledger.acks
            api_c = await asyncio.to_thread(spawn, "api", server.url)
            apis[apis.index(api_a.url)] = api_c.url
            events["api_c_port"] = api_c.port or 0

            async def both_serve() -> bool:
                no_unexpected()
                return acks_after_restart[api_b.url] >= 50 and acks_after_restart[api_c.url] >= 50

            async def total_after() -> bool:
                no_unexpected()
                return sum(acks_after_restart.values()) >= 200

            await wait_for(total_after, 30, "200 writes acknowledged after Redis restarted")
            try:
                await wait_for(both_serve, 10, "both the new API C and the surviving API B to acknowledge writes")
            finally:
                stop.set()
            await asyncio.gather(*bursts)

        try:
            await run_all(*(writer(w) for w in range(WRITERS)), crash())
        finally:
            for t in bursts:
                t.cancel()
            await asyncio.gather(*bursts, return_exceptions=True)
        api_c_url = apis[0] if apis[0] != api_b.url else apis[1]
        print(f"crash points {events}; {ledger.acks} acks {dict(ledger.acks_by_url)}; failures {dict(ledger.failures)}")
        if ledger.server_errors:
            print(f"{len(ledger.server_errors)} non-503 5xx answers, e.g. {ledger.server_errors[:3]}")
        assert ledger.unexpected == [], f"{len(ledger.unexpected)} unexpected 4xx answers, e.g. {ledger.unexpected[:5]}"
        assert ledger.unresolved == [], f"idempotent writes never acknowledged: {ledger.unresolved[:5]}"
        assert "redis_killed_at_ack" in events

        # The worker that saw Redis die must reconnect by itself; start another only if it exited, to still audit.
        worker_survived = worker.proc is not None and worker.proc.poll() is None
        workers = [worker]
        if not worker_survived:
            print(f"the worker exited after Redis died:\n{log_tail(worker)}")
            workers = [await asyncio.to_thread(spawn, "worker", server.url)]

        r = Redis.from_url(server.url)
        try:
            await wait_caught_up(r, keys, workers)
            audits = await audit_all(r, keys)  # every session in Redis: read models == fold of its log

            # Every acknowledged create is in the log and readable.
            for sid, created in ledger.creates.items():
                assert sid in audits, f"acknowledged create {sid} ({created['situation']}) is not in Redis"
                first = audits[sid].events[0]
                assert isinstance(first, SessionCreated) and first.data.situation == created["situation"]
                assert as_json(first.occurred_at) == created["created_at"], (
                    f"session {sid}: created_at differs from the 201"
                )
                got = await client.get(f"{api_c_url}/sessions/{sid}", headers=auth(audits[sid].tenant))
                assert got.status_code == 200, f"acknowledged create {sid}: GET {got.status_code} {got.text}"
                assert {k: got.json()[k] for k in ("id", "situation", "metadata", "created_at")} == {
                    k: created[k] for k in ("id", "situation", "metadata", "created_at")
                }

            # Every acknowledged message is in its session's log exactly once, as acknowledged.
            for sid, acked in ledger.messages.items():
                a = audits[sid]
                in_log = {m.data.id: as_json(m.data) for m in a.messages}
                for mid, body in acked.items():
                    assert mid in in_log, (
                        f"acknowledged message {mid} (seq {body['seq']}, {body['content']!r}) lost from {sid}"
                    )
                    assert in_log[mid] == body, f"message {mid} in {sid}: logged {in_log[mid]} != acknowledged {body}"

            # Nothing duplicated: every request carried unique content, so no content may appear twice.
            situations = Counter(
                a.events[0].data.situation for a in audits.values() if isinstance(a.events[0], SessionCreated)
            )
            assert [s for s, c in situations.items() if c > 1] == [], "a create was written twice"
            for a in audits.values():
                contents = Counter(m.data.content for m in a.messages if isinstance(m.data.content, str))
                doubled = [c for c, k in contents.items() if k > 1]
                assert doubled == [], f"session {a.sid}: messages written twice: {doubled[:5]}"

            # Idempotent writers retried every failure until acknowledged: their logs hold exactly what was acknowledged.
            for sid, w in ledger.create_writer.items():
                if w % 2 == 0:
                    logged = {m.data.id for m in audits[sid].messages}
                    assert logged == set(ledger.messages[sid]), (
                        f"session {sid} of idempotent writer {w}: log != acknowledged"
                    )

            # Over HTTP, every session answers exactly its folded state (so each acknowledged message is visible).
            await audit_over_http(client, api_c_url, audits)
            for sid, acked in ledger.messages.items():
                if acked:
                    got = await client.get(
                        f"{api_b.url}/sessions/{sid}/messages", params={"limit": 1000}, headers=auth(audits[sid].tenant)
                    )
                    assert got.status_code == 200, (
                        f"surviving API B: GET messages of {sid}: {got.status_code} {got.text}"
                    )
                    visible = {m["id"] for m in got.json()["items"]}
                    assert set(acked) <= visible, f"surviving API B does not show acknowledged messages of {sid}"

            assert worker_survived, f"the worker did not survive Redis restarting:\n{log_tail(worker)}"
            assert_running(worker)
            assert_running(api_b)
        finally:
            await r.aclose()
