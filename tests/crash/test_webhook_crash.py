"""A crash test of the webhook deliverer: kill -9 the worker while deliveries flow, start another, and check that
every outbox entry of the subscription's types reached the receiver (at least once), and that any event delivered
twice carried the same `webhook-id` both times (and a valid signature)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import redis as sync_redis

from shared.adapters.redis.keys import Keys
from shared.adapters.redis.server import RedisServer
from shared.domain.webhooks import delivery_id
from tests.receiver import receiving
from tests.support import ParleyProcess, auth, wait_ready

pytestmark = pytest.mark.slow

ACME = auth("acme")
SESSIONS = 40
TIMEOUT_S = 60.0
"""Only an upper bound for what must happen; a passing test never waits it out."""
ENV = {
    "PARLEY_WEBHOOKS_ALLOW_PRIVATE": "1",
    "PARLEY_WEBHOOK_POLL_S": "0.05",
    "PARLEY_WEBHOOK_RETRY_BASE_S": "0.05",
    "PARLEY_WEBHOOK_RETRY_MAX_S": "0.2",
    "PARLEY_WEBHOOK_TIMEOUT_S": "1",
    "PARLEY_WEBHOOK_LEASE_S": "2",
}


def until(check, what: str, timeout_s: float = TIMEOUT_S):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)
    return result


def test_kill_9_of_the_deliverer_loses_no_delivery_and_repeats_only_with_the_same_id(tmp_path: Path):
    server = RedisServer(tmp_path / "redis").start()
    procs: list[ParleyProcess] = []
    try:
        api = ParleyProcess("api", server.url, tmp_path, ENV).start()
        procs.append(api)
        first = ParleyProcess("worker", server.url, tmp_path, ENV).start()
        procs.append(first)
        wait_ready(api.url)
        with receiving() as receiver, httpx.Client(base_url=api.url, timeout=30) as c:
            receiver.delay_s = 0.05  # deliveries take a while: the kill lands among them
            resp = c.post(
                "/webhooks",
                json={"url": receiver.url + "/crash", "event_types": ["SessionCreated", "SessionDeleted"]},
                headers=ACME,
            )
            assert resp.status_code == 201, resp.text
            hook = resp.json()

            def write() -> None:
                with httpx.Client(base_url=api.url, timeout=30) as w:
                    for _ in range(SESSIONS):
                        sid = w.post("/sessions", json={}, headers=ACME).json()["id"]
                        assert w.delete(f"/sessions/{sid}", headers=ACME).status_code == 202

            writer = threading.Thread(target=write)
            writer.start()
            until(lambda: len(receiver.at("/crash")) >= 10, "deliveries to flow")
            first.kill()  # kill -9, mid-delivery
            second = ParleyProcess("worker", server.url, tmp_path, ENV).start()
            procs.append(second)
            writer.join(TIMEOUT_S)
            assert not writer.is_alive()

            # what the outbox holds for the subscription: every entry of its tenant and types
            r = sync_redis.Redis.from_url(server.url)
            keys = Keys(int(r.hget(Keys.config, "partitions")))
            wanted: set[str] = set()

            def outbox_complete() -> bool:
                wanted.clear()
                for p in range(keys.partitions):
                    for _, f in r.xrange(keys.outbox(p)):
                        if f[b"t"] == b"acme" and f[b"e"] in (b"SessionCreated", b"SessionDeleted"):
                            wanted.add(f[b"i"].decode())
                return len(wanted) == 2 * SESSIONS  # the projector (the new worker) caught up

            until(outbox_complete, "the outbox to hold every event")
            until(lambda: {x.event["id"] for x in receiver.taken("/crash")} >= wanted, "every event delivered")
            got = receiver.at("/crash")
            ids: dict[str, set[str]] = defaultdict(set)
            for x in got:
                assert x.verified(hook["secret"])
                ids[x.event["id"]].add(x.msg_id)
            assert set(ids) == wanted  # nothing else was sent
            for event_id, msg_ids in ids.items():
                assert msg_ids == {delivery_id(hook["id"], event_id)}, "a repeat with another id"
            r.close()
    finally:
        for p in reversed(procs):
            p.stop()
        server.stop()
