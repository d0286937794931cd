"""Every Prometheus metric Parley exports, in one place (the README's "Metrics and logs" lists them).

Labels are bounded: route *templates* (never raw paths, so no ids and no `?token=`), status codes, tenants (the
deployment's own, never keys), partitions, and small fixed sets. A model name is not a label: a request may
name any model.

Processes: an API process serves `GET /metrics`; `parley api --workers N` runs N processes that write their
values to `PROMETHEUS_MULTIPROC_DIR` (prometheus-client's multiprocess mode), so whichever of them answers a
scrape reports the sum of all. A `parley worker` serves its own on `PARLEY_METRICS_PORT` (`services.worker.probes`).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # prometheus-client opens its files there as metrics are defined
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
disable_created_metrics()  # type: ignore[no-untyped-call]  # the `_created` series double the output and say nothing a dashboard uses

__all__ = [
    "CHAT_JOBS",
    "CHAT_QUEUE_DEPTH",
    "CHAT_QUEUE_WAIT",
    "CHAT_RUN",
    "CONTENT_TYPE",
    "FEED_PENDING",
    "HTTP_REQUESTS",
    "INFLIGHT_LIMIT",
    "MODEL_CALL",
    "MODEL_TOKENS",
    "PROJECTION_LAG_ENTRIES",
    "PROJECTION_LAG_SECONDS",
    "REDIS_ERRORS",
    "REJECTED",
    "RETENTION_REMOVED",
    "RETENTION_SCANNED",
    "RETENTION_TRIMMED",
    "SCHEDULE_TICKS",
    "WEBHOOK_DELIVERIES",
    "WEBHOOK_LAG_SECONDS",
    "exposition",
    "multiprocess",
    "observe_request",
    "redis_error",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
_SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# -- the API ---------------------------------------------------------------------------------------------------------
HTTP_REQUESTS = Histogram(
    "parley_http_request_duration_seconds",
    "HTTP requests by method, route template and status: latency, and with _count the request rate. Streams count "
    "their whole life.",
    ["method", "route", "status"],
    buckets=_FAST,
)
REJECTED = Counter(
    "parley_http_rejected_total",
    "Requests refused to protect the service: reason=rate_limited (429: a tenant's rate, concurrent chats, streams "
    "or daily tokens) by tenant, reason=overloaded (503: the process is at PARLEY_MAX_INFLIGHT; tenant unknown, empty).",
    ["reason", "tenant"],
)
REDIS_ERRORS = Counter(
    "parley_redis_errors_total",
    "Store errors seen (connection, timeout, loading, failover), by exception type, whether retried or answered 503.",
    ["error"],
)

# -- the worker ------------------------------------------------------------------------------------------------------
PROJECTION_LAG_ENTRIES = Gauge(
    "parley_projection_lag_entries",
    "Feed entries (one per acknowledged write) not yet projected, per partition: undelivered plus pending.",
    ["partition"],
    multiprocess_mode="max",
)
PROJECTION_LAG_SECONDS = Gauge(
    "parley_projection_lag_seconds",
    "Age of the oldest write not yet projected, per partition (0: caught up).",
    ["partition"],
    multiprocess_mode="max",
)
FEED_PENDING = Gauge(
    "parley_feed_pending",
    "Feed entries a projector has read but not acknowledged, per partition.",
    ["partition"],
    multiprocess_mode="max",
)
RETENTION_SCANNED = Counter(
    "parley_retention_scanned_total", "Idle sessions the retention sweeper looked at (each pass is bounded)."
)
RETENTION_REMOVED = Counter(
    "parley_retention_removed_total", "Sessions the retention sweeper deleted or purged, by action.", ["action"]
)
RETENTION_TRIMMED = Counter(
    "parley_retention_trimmed_total",
    "Read-model copies of messages a keep_messages retention hides that the sweeper freed (the log keeps them).",
)
SCHEDULE_TICKS = Counter(
    "parley_schedule_ticks_total",
    "Schedule ticks taken by this process's scheduler: run (a chat requested) or skipped (missed, or refused by "
    "the multitask policy or the tenant's limits).",
    ["outcome"],
)
WEBHOOK_DELIVERIES = Counter(
    "parley_webhook_deliveries_total",
    "Webhook delivery attempts by outcome: succeeded (2xx), retrying (failed, tried again after a backoff), failed "
    "(the last attempt failed; the subscription goes on), skipped (the event was purged).",
    ["outcome"],
)
WEBHOOK_LAG_SECONDS = Gauge(
    "parley_webhook_lag_seconds",
    "Age of the oldest outbox entry a subscription this worker delivers has not delivered yet (the largest over "
    "its subscriptions; 0: caught up).",
    multiprocess_mode="max",
)
INFLIGHT_LIMIT = Gauge(
    "parley_inflight_limit",
    "Requests the API processes admit at once now (the adaptive limit, summed over live processes): it falls "
    "below PARLEY_MAX_INFLIGHT when requests queue.",
    multiprocess_mode="livesum",
)
CHAT_QUEUE_DEPTH = Gauge(
    "parley_chat_queue_depth",
    "Chat jobs waiting in the queue (what the chat workers' autoscaler follows).",
    multiprocess_mode="max",
)
CHAT_JOBS = Counter(
    "parley_chat_jobs_total",
    "Chat job attempts by how they ended: succeeded, failed, cancelled, ended (already over), waiting (behind "
    "another chat), retried (an unexpected error; it runs again), interrupted (the worker stopped).",
    ["status"],
)
CHAT_QUEUE_WAIT = Histogram(
    "parley_chat_queue_wait_seconds", "From enqueueing a chat job to its first attempt starting.", buckets=_SLOW
)
CHAT_RUN = Histogram(
    "parley_chat_run_seconds", "One attempt of a chat job, by how it ended.", ["status"], buckets=_SLOW
)
MODEL_CALL = Histogram(
    "parley_model_call_seconds",
    "Model calls (a whole streamed answer, or a summary), by outcome: ok or the error code.",
    ["outcome"],
    buckets=_SLOW,
)
MODEL_TOKENS = Counter("parley_model_tokens_total", "Tokens of chat answers, kind=prompt or completion.", ["kind"])


_request_children: dict[tuple[str, str, int], object] = {}


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    """Record one HTTP request (the labelled child is cached: this runs on every request)."""
    key = (method, route, status)
    child = _request_children.get(key)
    if child is None:
        child = _request_children[key] = HTTP_REQUESTS.labels(method, route, str(status))
    child.observe(seconds)  # type: ignore[attr-defined]


def redis_error(exc: BaseException) -> None:
    REDIS_ERRORS.labels(type(exc).__name__).inc()


def multiprocess() -> bool:
    """Values go to `PROMETHEUS_MULTIPROC_DIR`, shared by the processes of one `parley api --workers N`."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def exposition() -> bytes:
    """The text format of everything this process (or, in multiprocess mode, every process of its group) counted."""
    if multiprocess():
        from prometheus_client import multiprocess as mp

        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)
