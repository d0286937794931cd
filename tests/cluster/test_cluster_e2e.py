"""Parley on a real 3-master Redis Cluster, over real HTTP: a `parley api` and a `parley worker` process with
`REDIS_URL=redis+cluster://…` and the chat queue on a standalone Redis (`PARLEY_QUEUE_URL`), a chat against the
OpenAI-protocol test server, the keys spread over every master, webhooks delivered from every partition's outbox,
and two API processes with three workers across a worker's kill -9."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as sync_redis

from shared.adapters.redis.server import RedisClusterServers, RedisServer
from tests.chat.conftest import model_env
from tests.model_server import MODEL_NAME, ModelServer
from tests.receiver import receiving
from tests.support import ROOT, ParleyProcess, auth, wait_ready

ACME = auth("acme")
TEST_BOUND_S = 120


@dataclass
class ClusterStack:
    cluster: RedisClusterServers
    queue: RedisServer
    model: ModelServer
    api: ParleyProcess
    worker: ParleyProcess
    env: dict[str, str]
    root: Path

    def masters(self) -> list[sync_redis.Redis]:
        return [sync_redis.Redis(port=p) for p in self.cluster.ports]


@pytest.fixture(autouse=True)
def bounded() -> Iterator[None]:
    """Each test of this module fails after TEST_BOUND_S instead of hanging the suite."""

    def expire(*_: Any) -> None:
        raise TimeoutError(f"test ran longer than {TEST_BOUND_S}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_BOUND_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterStack]:
    root = tmp_path_factory.mktemp("cluster-e2e")
    cluster = RedisClusterServers(root / "cluster").start()
    queue = RedisServer(root / "queue").start()
    model = ModelServer().start()
    env = {  # and the default partitions on a cluster: 64
        **model_env(model),
        "PARLEY_QUEUE_URL": queue.url,
        "PARLEY_WEBHOOKS_ALLOW_PRIVATE": "1",  # the webhook test's receiver is on loopback
        "PARLEY_WEBHOOK_POLL_S": "0.05",
    }
    procs: list[ParleyProcess] = []
    try:
        api = ParleyProcess("api", cluster.url, root, env)
        procs.append(api.start())
        worker = ParleyProcess("worker", cluster.url, root, env)
        procs.append(worker.start())
        wait_ready(api.url)
        yield ClusterStack(cluster, queue, model, api, worker, env, root)
    finally:
        for p in reversed(procs):
            p.stop()
        model.stop()
        queue.stop()
        cluster.stop()


@pytest.fixture
def c(stack: ClusterStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api.url, timeout=30) as client:
        yield client


def test_a_cluster_without_a_queue_redis_is_refused_with_a_clear_error(stack: ClusterStack):
    env = {k: v for k, v in stack.env.items() if k != "PARLEY_QUEUE_URL"}
    with pytest.raises(RuntimeError) as refused:
        ParleyProcess("api", stack.cluster.url, stack.root, {**env, "PARLEY_QUEUE_URL": ""}).start(timeout=30)
    assert "PARLEY_QUEUE_URL" in str(refused.value) and "exited" in str(refused.value)


def test_webhooks_deliver_every_partitions_events_in_order_per_session(stack: ClusterStack, c: httpx.Client):
    with receiving() as receiver:
        body = {"url": receiver.url + "/cluster", "event_types": ["SessionCreated", "SessionDeleted"]}
        resp = c.post("/webhooks", json=body, headers=ACME)
        assert resp.status_code == 201, resp.text
        hook = resp.json()
        ids = [c.post("/sessions", json={}, headers=ACME).json()["id"] for _ in range(20)]
        for sid in ids:
            assert c.delete(f"/sessions/{sid}", headers=ACME).status_code == 202
        deadline = time.monotonic() + 60
        while len(receiver.taken("/cluster")) < 2 * len(ids):
            assert time.monotonic() < deadline, f"{len(receiver.taken('/cluster'))} of {2 * len(ids)} deliveries"
            time.sleep(0.05)
        got = receiver.taken("/cluster")
        assert all(r.verified(hook["secret"]) for r in got)
        for sid in ids:
            assert [r.payload["type"] for r in got if r.payload["session_id"] == sid] == [
                "SessionCreated",
                "SessionDeleted",
            ]
        assert c.delete(f"/webhooks/{hook['id']}", headers=ACME).status_code == 204


def test_sessions_and_messages_read_back_in_order_and_spread_over_every_master(stack: ClusterStack, c: httpx.Client):
    ids = []
    for i in range(30):
        r = c.post("/sessions", json={"situation": f"s{i}"}, headers=ACME)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    for n in range(4):
        for sid in ids:
            r = c.post(f"/sessions/{sid}/messages", json={"role": "user", "content": f"{sid} #{n}"}, headers=ACME)
            assert r.status_code == 201, r.text
    for sid in ids:  # read-your-writes: every acknowledged write, in order
        r = c.get(f"/sessions/{sid}/messages", headers=ACME)
        assert r.status_code == 200, r.text
        assert [m["content"] for m in r.json()["items"]] == [f"{sid} #{n}" for n in range(4)]
        events = c.get(f"/sessions/{sid}/events", headers=ACME).json()["items"]
        assert [e["version"] for e in events] == [1, 2, 3, 4, 5]
    listed: list[str] = []
    page: dict[str, Any] = {"limit": 100}
    r = c.get("/sessions", params=page, headers=ACME)
    assert r.status_code == 200, r.text
    listed = [s["id"] for s in r.json()["items"]]
    assert set(ids) <= set(listed)

    heads = [sum(1 for _ in node.scan_iter(match="parley:{p*}:head:*", count=1000)) for node in stack.masters()]
    assert all(h > 0 for h in heads), f"session heads per master: {heads}"
    assert sum(heads) >= len(ids)
    assert not any(node.keys("*{arq}*") for node in stack.masters()), "the chat queue must not be on the cluster"


def test_a_chat_runs_on_the_cluster_with_its_queue_on_its_own_redis_and_a_purge_erases_it(
    stack: ClusterStack, c: httpx.Client
):
    stack.model.reset()
    sid = c.post("/sessions", json={"situation": "You are terse."}, headers=ACME).json()["id"]
    r = c.post(f"/sessions/{sid}/chat", json={"messages": [{"role": "user", "content": "hello cluster"}]}, headers=ACME)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODEL_NAME
    assert body["choices"][0]["message"]["content"] == "echo: hello cluster"
    stored = c.get(f"/sessions/{sid}/messages", headers=ACME).json()["items"]
    assert [(m["role"], m["content"]) for m in stored] == [
        ("user", "hello cluster"),
        ("assistant", "echo: hello cluster"),
    ]
    job = c.get(f"/sessions/{sid}/chats/{body['id']}", headers=ACME).json()
    assert job["status"] == "succeeded" and job["attempts"] == 1
    assert stack.model.requests(), "the worker called the model server"
    # the job went through the queue's own Redis (arq enqueues in a MULTI: the job key, ZADD to the queue), none of
    # it on the cluster
    stats = sync_redis.Redis(port=stack.queue.port).info("commandstats")
    assert stats["cmdstat_zadd"]["calls"] >= 1 and stats["cmdstat_multi"]["calls"] >= 1, stats
    assert not any(node.keys("*{arq}*") for node in stack.masters())

    r = c.delete(f"/sessions/{sid}", params={"purge": "true"}, headers=ACME)
    assert r.status_code == 202 and r.json()["purged"] is True, r.text
    left = [k for node in stack.masters() for k in node.keys(f"*{sid}*") + node.keys(f"*{body['id']}*")]
    assert left == [], f"keys left after the purge: {left}"
    assert c.get(f"/sessions/{sid}", headers=ACME).status_code == 404


def test_parley_keys_and_purges_persistence_rewrite_work_on_the_cluster(stack: ClusterStack, c: httpx.Client):
    env = {**stack.api.env}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    created = run("keys", "create", "--tenant", "initech")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().split()[-1]
    assert key.startswith("pk_")
    headers = {"Authorization": f"Bearer {key}"}
    assert c.post("/sessions", json={}, headers=headers).status_code == 201
    assert run("keys", "revoke", key).returncode == 0
    limited = run("tenants", "set-limits", "--tenant", "initech", "--rps", "5", "--reset", "burst")
    assert limited.returncode == 0 and '"rps": 5' in limited.stdout.replace(".0", ""), limited.stdout + limited.stderr

    for node in stack.masters():
        node.config_set("save", "3600 1")
    try:
        sid = c.post("/sessions", json={}, headers=ACME).json()["id"]
        purged = run("purge", "--tenant", "acme", "--session", sid)
        assert purged.returncode == 0, purged.stderr
        for node in stack.masters():  # every primary was asked for a BGSAVE
            assert node.info("persistence")["rdb_last_bgsave_status"] == "ok"
            assert node.info("commandstats").get("cmdstat_bgsave", {}).get("calls", 0) >= 1, node
    finally:
        for node in stack.masters():
            node.config_set("save", "")


async def test_two_apis_and_workers_keep_every_write_and_never_answer_503_across_a_worker_kill(stack: ClusterStack):
    """Writes through two API processes while three workers share the partitions; one worker is killed -9 mid-load.
    Every write is read back at once through the *other* API process (read-your-writes across processes): none
    answers 503 across the take-over, and afterwards every acknowledged write is there once, in order."""
    procs = [
        ParleyProcess("api", stack.cluster.url, stack.root, stack.env),
        ParleyProcess("worker", stack.cluster.url, stack.root, stack.env),
        ParleyProcess("worker", stack.cluster.url, stack.root, stack.env),
    ]
    try:
        for p in procs:
            p.start(timeout=30)
        apis = [stack.api.url, procs[0].url]
        victim = procs[1]
        async with httpx.AsyncClient(timeout=30, headers=ACME, limits=httpx.Limits(max_connections=32)) as c:
            sids = [(await c.post(f"{apis[i % 2]}/sessions", json={})).json()["id"] for i in range(16)]
            acked: dict[str, list[str]] = {sid: [] for sid in sids}
            reads: Counter[int] = Counter()
            stop = asyncio.Event()

            async def writer(w: int) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    sid = sids[(w + n * 8) % len(sids)]
                    write, read = apis[n % 2], apis[(n + 1) % 2]
                    r = await c.post(f"{write}/sessions/{sid}/messages", json={"role": "user", "content": f"{w}-{n}"})
                    assert r.status_code == 201, r.text
                    acked[sid].append(r.json()["id"])
                    got = await c.get(f"{read}/sessions/{sid}/messages", params={"offset": r.json()["seq"] - 1})
                    reads[got.status_code] += 1
                    if got.status_code == 200:
                        assert got.json()["items"][0]["id"] == r.json()["id"]

            async def killer() -> None:
                await asyncio.sleep(1.5)
                assert victim.proc is not None
                victim.proc.send_signal(signal.SIGKILL)
                await asyncio.sleep(4.0)  # well past the take-over
                stop.set()

            await asyncio.gather(*(writer(w) for w in range(8)), killer())
            assert set(reads) == {200} and reads[200] > 100, reads
            for sid in sids:
                items = (await c.get(f"{apis[0]}/sessions/{sid}/messages", params={"limit": 1000})).json()["items"]
                assert [m["id"] for m in items] == acked[sid]
    finally:
        for p in reversed(procs):
            p.stop()
