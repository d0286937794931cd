"""Retention on a real redis-server over real HTTP: a session's own policy and its tenant's, `expires_at` in what
the API shows, `parley retention run` (dry run, then for real, at a chosen time), and a worker that sweeps on its own
(a session imported with old timestamps goes within seconds, counted in the worker's `/metrics`); `keep_messages`
hiding a session's oldest messages from its list and the sweeper freeing their read-model copies."""

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
    assert shown["retention"] == {"idle_days": 3, "action": "purge", "keep_messages": None}
    assert shown["expires_at"] == created["expires_at"]
    patched = c.patch(f"/sessions/{created['id']}", json={"retention": None}).json()
    assert patched["retention"] is None and patched["expires_at"] is None  # acme keeps sessions by default
    listed = {s["id"]: s for s in c.get("/sessions", params={"limit": 100}).json()["items"]}
    assert listed[created["id"]]["expires_at"] is None


@pytest.mark.parametrize(
    "retention",
    [
        {"idle_days": 0},
        {"idle_days": 36_501},
        {"idle_days": 2, "action": "shred"},
        {"action": "delete"},
        {},
        {"keep_messages": 0},
        {"keep_messages": 10_000_001},
        {"keep_messages": "5"},
        7,
    ],
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


def _import_old(stack: Stack, c: httpx.Client, tenant: str, messages: int) -> str:
    """A copy of a new session with `messages` messages, imported for `tenant` with the timestamps of a year ago."""
    model = c.post("/sessions", json={}).json()["id"]
    for i in range(messages):
        c.post(f"/sessions/{model}/messages", json={"role": "user", "content": f"m{i}"})
    old_id = str(uuid7())
    lines = stack.parley("export", "--session", model).stdout.replace(model, old_id).encode().splitlines()
    header, events = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    year_ago = (datetime.now(UTC) - timedelta(days=365)).isoformat().replace("+00:00", "Z")
    for e in events:
        e["occurred_at"] = year_ago
    export = b"".join(json.dumps(x).encode() + b"\n" for x in [header, *events])
    stack.parley("import", "--tenant", tenant, stdin=export)
    return old_id


def test_keep_messages_lists_only_the_newest_and_the_log_keeps_them_all(stack: Stack, c: httpx.Client):
    sid = c.post("/sessions", json={"retention": {"keep_messages": 2}}).json()["id"]
    for i in range(5):
        c.post(f"/sessions/{sid}/messages", json={"role": "user", "content": f"m{i}"})
    shown = [m["content"] for m in c.get(f"/sessions/{sid}/messages").json()["items"]]
    assert shown == ["m3", "m4"]
    assert c.get(f"/sessions/{sid}").json()["retention"] == {"idle_days": None, "action": "delete", "keep_messages": 2}
    past = c.get(f"/sessions/{sid}/messages", params={"version": 6}).json()["items"]
    assert [m["content"] for m in past] == [f"m{i}" for i in range(5)]  # time travel: the log keeps every one
    hidden = past[0]
    assert c.get(f"/sessions/{sid}/messages/{hidden['id']}").json()["content"] == "m0"  # found by its id
    events = c.get(f"/sessions/{sid}/events").json()["items"]
    assert sum(e["type"] == "MessageAdded" for e in events) == 5

    later = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    dry = [json.loads(line) for line in stack.parley("retention", "run", "--dry-run", "--now", later).stdout.split()]
    assert {"tenant": "acme", "session_id": sid, "messages": 3, "done": False} in dry[:-1]
    run = [json.loads(line) for line in stack.parley("retention", "run", "--now", later).stdout.split()]
    assert {"tenant": "acme", "session_id": sid, "messages": 3, "done": True} in run[:-1]
    assert run[-1]["trimmed_messages"] >= 3 and run[-1]["dry_run"] is False
    assert [m["content"] for m in c.get(f"/sessions/{sid}/messages").json()["items"]] == ["m3", "m4"]
    past = c.get(f"/sessions/{sid}/messages", params={"version": 6}).json()["items"]
    assert [m["content"] for m in past] == [f"m{i}" for i in range(5)]  # freed copies: read from the log

    c.patch(f"/sessions/{sid}", json={"retention": None})  # back to its tenant's: acme keeps every message
    assert len(c.get(f"/sessions/{sid}/messages").json()["items"]) == 5


def test_a_tenants_keep_messages_applies_at_once_and_its_worker_frees_the_copies(stack: Stack, c: httpx.Client):
    thrifty = auth("globex")
    stack.parley("tenants", "set-limits", "--tenant", "globex", "--reset", "retention_idle_days")  # kept when idle
    old_id = _import_old(stack, c, "globex", 6)
    listed = c.get(f"/sessions/{old_id}/messages", headers=thrifty).json()["items"]
    assert len(listed) == 6
    stack.parley("tenants", "set-limits", "--tenant", "globex", "--retention-keep-messages", "4")
    deadline = time.monotonic() + 5  # other API processes see a tenant's change within a second
    while len(listed := c.get(f"/sessions/{old_id}/messages", headers=thrifty).json()["items"]) != 4:
        assert time.monotonic() < deadline, listed
        time.sleep(0.1)
    assert [m["content"] for m in listed] == ["m2", "m3", "m4", "m5"]
    assert len(c.get("/sessions/" + c.post("/sessions", json={}).json()["id"] + "/messages").json()["items"]) == 0

    def trimmed() -> float:
        text = httpx.get(f"http://127.0.0.1:{stack.metrics_port}/metrics").text
        return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("parley_retention_trimmed_total"))

    deadline = time.monotonic() + 20
    while trimmed() < 2:  # its last change was a year ago: the worker's sweeper (every 0.3 s) frees 2 copies
        assert time.monotonic() < deadline, "the sweeper freed nothing"
        time.sleep(0.1)
    stack.parley("tenants", "set-limits", "--tenant", "globex", "--reset", "retention_keep_messages")
