"""What operators see, on real processes: `parley api --workers 2` (metrics merged across both), a worker serving
its own metrics, JSON logs with request ids, and no key, stream token or message content in logs or metrics."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.adapters.redis.server import RedisServer, free_port
from tests.e2e.helpers import ACME, GLOBEX, JSON, add_message, create
from tests.support import ROOT, TENANTS, ParleyProcess, wait_for, wait_ready

pytestmark = pytest.mark.slow

MARKER = "secret-content-" + uuid.uuid4().hex
"""Message content no log line may hold."""


class Stack:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.metrics_dir = root / "metrics"
        self.server = RedisServer(root / "redis").start()
        env = {"PARLEY_LOG_FORMAT": "json", "PARLEY_LOG_LEVEL": "INFO"}
        self.worker_metrics = free_port()
        self.api = ParleyProcess(
            "api", self.server.url, root, {**env, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}, ["--workers", "2"]
        )
        self.worker = ParleyProcess(
            "worker", self.server.url, root, {**env, "PARLEY_METRICS_PORT": str(self.worker_metrics)}
        )
        self.guarded = ParleyProcess("api", self.server.url, root, {"PARLEY_METRICS_TOKEN": "scrape-me"})

    def stop(self) -> None:
        for p in (self.guarded, self.worker, self.api):
            p.stop()
        self.server.stop()

    def logs(self) -> str:
        return self.api.log_path.read_text() + self.worker.log_path.read_text()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("observability"))
    try:
        s.api.start()
        s.worker.start()
        s.guarded.start()
        wait_ready(s.api.url)
        yield s
    finally:
        s.stop()


def samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """{labels: value} of one metric in the Prometheus text format."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[frozenset(s.labels.items())] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text, name).get(frozenset(labels.items()), 0.0)


def test_request_ids_are_echoed_when_sane_and_made_otherwise(stack: Stack):
    with httpx.Client(base_url=stack.api.url) as c:
        assert c.get("/health", headers={"X-Request-ID": "req-42.a:b"}).headers["x-request-id"] == "req-42.a:b"
        made = [
            c.get("/health", headers=h).headers["x-request-id"]
            for h in ({}, {"X-Request-ID": "x" * 200}, {"X-Request-ID": "a b"})
        ]
        assert all(len(r) == 32 and int(r, 16) >= 0 for r in made) and len(set(made)) == 3
        assert c.get("/sessions", headers={**ACME, "X-Request-ID": "listing-1"}).headers["x-request-id"] == "listing-1"
        assert c.get("/nowhere", headers={"X-Request-ID": "lost-1"}).headers["x-request-id"] == "lost-1"  # 404 too


def test_both_api_processes_report_every_request_on_every_scrape(stack: Stack):
    """Multiprocess mode: whichever process answers the scrape reports the sum over both."""
    route = "/sessions/{session_id}/messages"
    with httpx.Client(base_url=stack.api.url) as c:
        sid = create(c)["id"]
        sent = 0
        # The kernel picks the process per connection; send on fresh connections until both have served some
        # (bounded: two processes on one socket share the connections within a few tries).
        for _ in range(200):
            with httpx.Client(base_url=stack.api.url) as fresh:
                add_message(fresh, sid, {"role": "user", "content": "hi"})
            sent += 1
            files = [f for f in stack.metrics_dir.glob("histogram_*.db")]
            if sent >= 20 and len(files) >= 2:
                break
        assert len(list(stack.metrics_dir.glob("histogram_*.db"))) >= 2, "one process served every connection"
        for _ in range(6):
            with httpx.Client(base_url=stack.api.url) as fresh:
                text = fresh.get("/metrics").text
            assert (
                value(text, "parley_http_request_duration_seconds_count", method="POST", route=route, status="201")
                == sent
            )


def children(pid: int) -> set[int]:
    return {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def test_a_killed_api_process_is_replaced_and_its_counts_are_kept(stack: Stack):
    """kill -9 of one of the two processes: the parent starts another on the same socket, and the requests the
    dead one served still count (counters and histograms are totals; only its gauges are dropped)."""
    import os
    import signal

    assert stack.api.proc is not None
    before = children(stack.api.proc.pid)
    assert len(before) == 2
    with httpx.Client(base_url=stack.api.url) as c:
        counted = value(
            c.get("/metrics").text,
            "parley_http_request_duration_seconds_count",
            method="GET",
            route="/health",
            status="200",
        )
    victim = min(before)
    os.kill(victim, signal.SIGKILL)

    async def replaced() -> set[int] | None:
        now = children(stack.api.proc.pid)  # type: ignore[union-attr]
        return now if len(now) == 2 and victim not in now else None

    asyncio.run(wait_for(replaced, 20, "the parent to start another API process"))
    wait_ready(stack.api.url)
    for _ in range(6):
        with httpx.Client(base_url=stack.api.url) as fresh:
            text = fresh.get("/metrics").text
        # wait_ready's own /health probes are not counted: it asks /ready
        assert (
            value(text, "parley_http_request_duration_seconds_count", method="GET", route="/health", status="200")
            == counted
        )


def test_rate_limit_rejections_are_counted_by_tenant(stack: Stack):
    env = {**stack.api.env, "PARLEY_LOG_LEVEL": "WARNING"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "tenants",
            "set-limits",
            "--tenant",
            "globex",
            "--rps",
            "1",
            "--burst",
            "1",
        ],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )
    with httpx.Client(base_url=stack.api.url) as c:
        before = value(c.get("/metrics").text, "parley_http_rejected_total", reason="rate_limited", tenant="globex")
        statuses = [c.get("/sessions", headers=GLOBEX).status_code for _ in range(30)]
        refused = statuses.count(429)
        assert refused > 0 and set(statuses) <= {200, 429}
        after = value(c.get("/metrics").text, "parley_http_rejected_total", reason="rate_limited", tenant="globex")
    assert after - before == refused
    subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "tenants",
            "set-limits",
            "--tenant",
            "globex",
            "--reset",
            "rps",
            "burst",
        ],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )


def test_the_worker_reports_chats_model_calls_and_projection_lag(stack: Stack):
    with httpx.Client(base_url=stack.api.url, timeout=30) as c:
        sid = create(c)["id"]
        resp = c.post(
            f"/sessions/{sid}/chat", headers={**ACME, **JSON}, json={"messages": [{"role": "user", "content": "hello"}]}
        )
        assert resp.status_code == 200, resp.text
        usage = resp.json()["usage"]

    async def scraped() -> str | None:
        text = httpx.get(f"http://127.0.0.1:{stack.worker_metrics}/metrics").text
        return text if value(text, "parley_chat_jobs_total", status="succeeded") >= 1 else None

    text = asyncio.run(wait_for(scraped, 20, "the worker's metrics to count the chat"))
    assert value(text, "parley_model_call_seconds_count", outcome="ok") >= 1
    assert value(text, "parley_chat_queue_wait_seconds_count") >= 1
    assert value(text, "parley_model_tokens_total", kind="completion") >= usage["completion_tokens"] > 0
    assert value(text, "parley_model_tokens_total", kind="prompt") >= usage["prompt_tokens"] > 0
    lag = samples(text, "parley_projection_lag_entries")
    assert {dict(k)["partition"] for k in lag} == {str(p) for p in range(16)}
    assert (
        "parley_chat_queue_depth" in text and "parley_feed_pending" in text and "parley_projection_lag_seconds" in text
    )


def test_metrics_can_be_kept_behind_a_token(stack: Stack):
    with httpx.Client(base_url=stack.guarded.url) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/metrics", headers=ACME).status_code == 401  # a tenant's key is not the scrape token
        ok = c.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/plain")
        assert "parley_http_request_duration_seconds" in ok.text


def test_logs_have_one_json_line_per_request_and_no_secrets(stack: Stack):
    """Keys, stream tokens and message contents appear in no log line and no metric."""
    with httpx.Client(base_url=stack.api.url, timeout=30) as c:
        sid = create(c)["id"]
        add_message(c, sid, {"role": "user", "content": MARKER})
        chat = c.post(
            f"/sessions/{sid}/chat",
            headers={**ACME, **JSON, "X-Request-ID": "chat-req-1"},
            json={"messages": [{"role": "user", "content": MARKER + " again"}]},
        )
        assert chat.status_code == 200, chat.text
        job = chat.json()["id"]
        token = c.post(f"/sessions/{sid}/stream-tokens", headers={**ACME, **JSON}, json={}).json()["token"]
        with c.stream(
            "GET", f"/sessions/{sid}/events", params={"token": token}, headers={"Accept": "text/event-stream"}
        ) as events:
            assert events.status_code == 200
            next(events.iter_lines())
        assert c.get(f"/sessions/{sid}", params={"token": token}).status_code == 401  # a token opens streams only
        metrics_text = c.get("/metrics").text

    async def chat_logged() -> list[dict] | None:
        lines = [json.loads(line) for line in stack.logs().splitlines() if line.startswith("{")]
        return lines if any(l.get("job_id") == job and l["msg"] == "chat attempt" for l in lines) else None

    lines = asyncio.run(wait_for(chat_logged, 20, "the worker's line about the chat"))
    text = stack.logs()
    assert all(line.startswith("{") for line in text.splitlines() if line.strip()), "a line that is not JSON"
    [access] = [l for l in lines if l["logger"] == "parley.access" and l.get("request_id") == "chat-req-1"]
    assert access["tenant"] == "acme" and access["status"] == 200 and access["route"] == "/sessions/{session_id}/chat"
    assert access["method"] == "POST" and access["path"] == f"/sessions/{sid}/chat" and access["duration_ms"] > 0
    [attempt] = [l for l in lines if l.get("job_id") == job and l["msg"] == "chat attempt"]
    assert attempt["session_id"] == sid and attempt["tenant"] == "acme" and attempt["status"] == "succeeded"
    for secret in (*TENANTS.values(), token, MARKER):
        assert secret not in text, "a secret in the logs"
        assert secret not in metrics_text, "a secret in the metrics"
    assert sid not in metrics_text  # routes are templates


def test_the_worker_port_answers_probes(stack: Stack):
    base = f"http://127.0.0.1:{stack.worker_metrics}"
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    ready = httpx.get(base + "/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready" and {"projector", "chat-worker", "metrics-sampler"} <= set(
        ready.json()["parts"]
    )
    assert httpx.get(base + "/nowhere").status_code == 404
