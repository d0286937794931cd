"""Retention on a real redis-server over real HTTP: a session's own policy and its tenant's, `expires_at` in what
the API shows, `parley retention run` (dry run, then for real, at a chosen time), and a worker that sweeps on its own
(a session imported with old timestamps goes within seconds, counted in the worker's `/metrics`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from shared.adapters.redis.server import RedisServer, free_port
from shared.domain.ids import uuid7
from tests.support import API_KEYS, ROOT, ParleyProcess, auth, wait_ready

pytestmark = pytest.mark.slow

ACME = auth("acme")


class Stack:
    def __init__(self, root: Path) -> None:
        self.redis = RedisServer(root / "redis").start()
        self.api = ParleyProcess("api", self.redis.url, root)
        self.metrics_port = free_port()
        env = {"PARLEY_RETENTION_SWEEP_S": "0.3", "PARLEY_METRICS_PORT": str(self.metrics_port)}
        self.worker = ParleyProcess("worker", self.redis.url, root, env)

    def parley(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        env = {"REDIS_URL": self.redis.url, "PARLEY_API_KEYS": API_KEYS, "PARLEY_LOG_LEVEL": "WARNING"}
        done = subprocess.run(
            [sys.executable, "-m", "services.cli", *args],
            env={**self.api.env, **env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            input=stdin.decode() if stdin is not None else None,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("retention"))
    try:
        s.api.start()
        s.worker.start()
        wait_ready(s.api.url)
        yield s
    finally:
        s.worker.stop()
        s.api.stop()
        s.redis.stop()


@pytest.fixture
def c(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api.url, headers=ACME, timeout=30) as client:
        yield client


def test_a_session_shows_its_retention_and_when_it_expires(c: httpx.Client):
    r = c.post("/sessions", json={"retention": {"idle_days": 3, "action": "purge"}})
    assert r.status_code == 201, r.text
    created = r.json()
    expires = datetime.fromisoformat(created["updated_at"]) + timedelta(days=3)
    assert datetime.fromisoformat(created["expires_at"]) == expires
    shown = c.get(f"/sessions/{created['id']}").json()
    assert shown["retention"] == {"idle_days": 3, "action": "purge"} and shown["expires_at"] == created["expires_at"]
    patched = c.patch(f"/sessions/{created['id']}", json={"retention": None}).json()
    assert patched["retention"] is None and patched["expires_at"] is None  # acme keeps sessions by default
    listed = {s["id"]: s for s in c.get("/sessions", params={"limit": 100}).json()["items"]}
    assert listed[created["id"]]["expires_at"] is None


@pytest.mark.parametrize(
    "retention",
    [{"idle_days": 0}, {"idle_days": 36_501}, {"idle_days": 2, "action": "shred"}, {"action": "delete"}, 7],
)
def test_a_bad_retention_is_a_422_and_writes_nothing(c: httpx.Client, retention: object):
    before = len(c.get("/sessions", params={"limit": 1000}).json()["items"])
    r = c.post("/sessions", json={"retention": retention})
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation_failed", r.text
    assert len(c.get("/sessions", params={"limit": 1000}).json()["items"]) == before
    sid = c.post("/sessions", json={}).json()["id"]
    r = c.patch(f"/sessions/{sid}", json={"retention": retention})
    assert r.status_code == 422 and c.get(f"/sessions/{sid}").json()["version"] == 1


def test_parley_retention_run_lists_then_removes_what_expired(stack: Stack, c: httpx.Client):
    goes = c.post("/sessions", json={"retention": {"idle_days": 2}}).json()["id"]
    erased = c.post("/sessions", json={"retention": {"idle_days": 2, "action": "purge"}}).json()["id"]
    stays = c.post("/sessions", json={"retention": {"idle_days": 10}}).json()["id"]
    c.get(f"/sessions/{stays}")  # read-your-writes: projected, so in the idle index
    later = (datetime.now(UTC) + timedelta(days=3)).isoformat()

    dry = [json.loads(line) for line in stack.parley("retention", "run", "--dry-run", "--now", later).stdout.split()]
    expired = {(e["session_id"], e["action"], e["done"]) for e in dry[:-1]}
    assert {(goes, "delete", False), (erased, "purge", False)} <= expired and stays not in str(dry)
    assert dry[-1]["dry_run"] is True and dry[-1]["removed"] == 0
    assert c.get(f"/sessions/{goes}").status_code == 200

    run = [json.loads(line) for line in stack.parley("retention", "run", "--now", later).stdout.split()]
    assert {(goes, "delete", True), (erased, "purge", True)} <= {
        (e["session_id"], e["action"], e["done"]) for e in run[:-1]
    }
    assert c.get(f"/sessions/{goes}").status_code == 404 and c.get(f"/sessions/{erased}").status_code == 404
    assert [e["type"] for e in c.get(f"/sessions/{goes}/events").json()["items"]][-1] == "SessionDeleted"
    audit = c.get("/audit", params={"limit": 1000}).json()["items"]
    assert erased in json.dumps(audit)  # purged: a tombstone, nothing else
    assert c.get(f"/sessions/{stays}").status_code == 200


def test_a_worker_sweeps_on_its_own_by_the_tenants_policy(stack: Stack, c: httpx.Client):
    """A session imported with the timestamps of a year ago, under a tenant policy of 30 days: the worker's sweeper
    (every 0.3 s here) deletes it, and counts it."""
    model = c.post("/sessions", json={"metadata": {"from": "a year ago"}}).json()["id"]
    lines = stack.parley("export", "--session", model).stdout.encode().splitlines()
    header, events = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    old_id = str(uuid7())
    header["session_id"] = old_id
    year_ago = (datetime.now(UTC) - timedelta(days=365)).isoformat().replace("+00:00", "Z")
    for e in events:
        e["occurred_at"] = year_ago
    export = b"".join(json.dumps(x).encode() + b"\n" for x in [header, *events])
    stack.parley("import", "--tenant", "globex", stdin=export)
    globex = auth("globex")
    assert c.get(f"/sessions/{old_id}", headers=globex).json()["expires_at"] is None  # globex keeps them: for now

    stack.parley("tenants", "set-limits", "--tenant", "globex", "--retention-idle-days", "30")
    deadline = time.monotonic() + 20
    while c.get(f"/sessions/{old_id}", headers=globex).status_code != 404:
        assert time.monotonic() < deadline, "the sweeper did not delete it"
        time.sleep(0.1)
    metrics = httpx.get(f"http://127.0.0.1:{stack.metrics_port}/metrics").text
    removed = [ln for ln in metrics.splitlines() if ln.startswith('parley_retention_removed_total{action="delete"}')]
    assert removed and float(removed[0].split()[-1]) >= 1
    assert c.get(f"/sessions/{model}").status_code == 200  # acme's, changed just now: not idle
