"""Settings: every knob is an environment variable, read once into one typed object."""

from __future__ import annotations

import os
import re
from typing import Any, Literal

import msgspec
from msgspec import Struct

_PREFIX = "PARLEY_"
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
CLUSTER_PARTITIONS = 64
"""Partitions of a new deployment on a Redis Cluster: 16 would leave a 3-master cluster's masters 5, 5 and 6."""


class Settings(Struct, kw_only=True, frozen=True):
    redis_url: str | None = None
    """`REDIS_URL`. Unset: `parley dev` runs an embedded store; `api`/`worker` refuse to start.
    `redis+cluster://host:port[,host:port…]`: a Redis Cluster (then set `PARLEY_QUEUE_URL`)."""
    redis_cluster: bool = False
    """`REDIS_URL` is a Redis Cluster whatever its scheme (`redis://` or `rediss://` to one or more of its nodes)."""
    queue_url: str | None = None
    """The chat queue's Redis (arq): a standalone Redis. Unset: `REDIS_URL`, which must then not be a cluster."""
    api_keys: str = ""
    """Comma-separated `tenant:key` pairs accepted besides the keys stored in Redis."""
    partitions: int = 16
    """Fixed at first start (kept in Redis): sessions hash into this many partitions, each one Redis Cluster slot.
    Unset on a Redis Cluster: `CLUSTER_PARTITIONS` (64), so partitions spread evenly over the masters."""
    max_body_bytes: int = 1 << 20
    max_content_chars: int = 100_000
    read_timeout_s: float = 2.0
    """How long a GET waits for the projector to reach the session's last acknowledged write."""
    key_cache_ttl_s: float = 10.0
    """How long an API process trusts a looked-up key; a revoke takes effect within this time."""
    idempotency_ttl_s: int = 86_400
    state_cache_size: int = 10_000
    redis_timeout_s: float = 1.0
    """Deadline of every Redis command (blocking reads add their own block time): a paused or unreachable Redis
    answers 503 `store_unavailable` within about this long instead of hanging the request."""
    redis_connect_timeout_s: float = 1.0
    redis_pool_size: int = 256
    """Redis connections per process (per client); blocking reads use a small pool of their own."""
    redis_pool_wait_s: float = 0.25
    """How long a request waits for a free Redis connection before it is shed with 503 `overloaded`."""
    read_assist_s: float = 0.5
    """A read that has waited this long for the projector catches the session up itself (so a dead worker never
    makes a read answer 503); see docs/architecture.md, "A read"."""
    projector_batch: int = 256
    projector_claim_idle_ms: int = 2_000
    """A feed entry a consumer has held this long is taken over (its projector died)."""
    model_base_url: str | None = None
    """An OpenAI-compatible server (OpenAI, vLLM, Ollama, LiteLLM…). Unset: the built-in offline model."""
    model_api_key: str = ""
    model: str = "parley-offline"
    """The model a chat uses when the request names none."""
    model_max_retries: int = 3
    model_timeout_s: float = 60.0
    chat_wait_s: float = 120.0
    """How long a synchronous chat waits for its answer before answering 504 (the job goes on)."""
    chat_retention_s: int = 7 * 86_400
    """How long chat job records and their chunk streams are kept after the job ends."""
    chat_claim_s: float = 5.0
    """A chat job whose worker stopped heart-beating this long is run again by another worker."""
    worker_max_jobs: int = 100
    worker_poll_delay_s: float = 0.05
    """arq's queue poll; new jobs also wake an idle worker at once, so this only bounds missed wake-ups."""
    keep_alive_s: float = 75.0
    """How long an idle HTTP connection stays open. Longer than the usual load balancer / client pool idle timeout
    (60 s): a server that closes first races with a client reusing the connection, which then fails a request."""
    header_timeout_s: float = 10.0
    """A connection must send a request's headers within this long (from accepting it, or from the request's
    first byte); else 408 and the connection is closed (slow clients, slowloris)."""
    body_timeout_s: float = 30.0
    """A request's body must arrive within this long after its headers; else 408 and the connection is closed."""
    max_inflight: int = 64
    """The most requests one API process works on at once; beyond its limit a request is shed at once with 503
    `overloaded` and `Retry-After` (streams and waiting chats do not count once they wait). The limit adapts
    between `min_inflight` and this: it shrinks when requests start to queue (see `services.api.guard.Gate`)."""
    min_inflight: int = 8
    """The least the adaptive in-flight limit shrinks to under overload."""
    tenant_rps: float = 1_000.0
    """Default requests per second per tenant, across every API process (0: unlimited); `parley tenants
    set-limits` overrides it per tenant."""
    tenant_burst: int = 2_000
    """Default requests a tenant may send at once after a quiet spell."""
    rate_lease_max: int = 256
    """The most of a tenant's requests an API process takes from its rate at once and admits without asking Redis
    again (`shared.app.admission`); 1: ask Redis about every request. Large enough to cover a burst of requests
    that arrive together (64 connections' worth, with a quarter left when the next is asked for); a tenant's own
    rate bounds its leases far below this (50 ms of it: 50 requests at 1,000 per second)."""
    rate_lease_s: float = 0.05
    """A lease holds at most this many seconds of the tenant's rate (and an eighth of its burst)."""
    tenant_concurrent_chats: int = 100
    """Default chats (queued or running) per tenant at once (0: unlimited)."""
    tenant_chat_tokens_per_day: int = 0
    """Default prompt plus completion tokens per tenant and UTC day (0: unlimited)."""
    tenant_streams: int = 1_000
    """Default open event streams (and waiting synchronous chats) per tenant (0: unlimited)."""
    retention_idle_days: int = 0
    """Default retention of a tenant's sessions: they go this many days after their last change (0: kept for
    ever); a tenant's own (`parley tenants set-limits --retention-idle-days`) or a session's own wins."""
    retention_action: Literal["delete", "purge"] = "delete"
    """What the default retention does to an expired session: `delete` (the log stays) or `purge` (erased)."""
    retention_keep_messages: int = 0
    """Default number of newest messages a session's message list shows (0: all); a tenant's own
    (`parley tenants set-limits --retention-keep-messages`) or a session's own retention wins."""
    retention_sweep_s: float = 60.0
    """How often a worker sweeps for expired sessions (0: never; `parley retention run` still does)."""
    max_schedules: int = 16
    """Cron schedules per session."""
    schedule_min_interval_s: float = 60.0
    """The shortest interval between a schedule's ticks a tenant may ask for (cron's own is a minute; 6-field
    expressions with seconds are taken when this allows)."""
    schedule_poll_s: float = 0.5
    """How often a worker looks for due schedule ticks (0: never): a tick runs at most this late."""
    schedule_grace_s: float = 3_600.0
    """A tick found later than this (no worker ran) is recorded as missed instead of run late."""
    schedule_batch: int = 100
    """Sessions with due ticks a scheduler pass takes per partition (the rest wait for the next pass)."""
    retention_batch: int = 100
    """Idle sessions a sweep looks at per partition (a pass is bounded; the next goes on from there)."""
    outbox_maxlen: int = 10_000
    """Entries each partition's webhook outbox keeps (approximately: Redis trims whole nodes), about 125 bytes each
    (10,000 × 16 partitions ≈ 20 MB): a subscription further behind than this (a receiver down for long) misses
    what was trimmed, and a replay reaches back only this far."""
    webhooks_allow_private: bool = False
    """Let webhooks reach loopback, private, link-local and other non-public addresses (tests, a private network);
    off: such a URL is refused on subscribe (422) and at every delivery."""
    webhook_timeout_s: float = 10.0
    """Deadline of one delivery's POST (connecting, sending, the answer's status)."""
    webhook_max_attempts: int = 8
    """Attempts per delivery; after the last failed one it is marked `failed` and the subscription goes on."""
    webhook_retry_base_s: float = 1.0
    """The wait after a delivery's first failed attempt; it doubles with each attempt up to `webhook_retry_max_s`."""
    webhook_retry_max_s: float = 300.0
    webhook_poll_s: float = 0.5
    """How often a caught-up subscription looks at the outbox again (and how soon a new one is picked up); 0: this
    worker delivers no webhooks."""
    webhook_lease_s: float = 30.0
    """A worker holds a subscription's delivery lease this long unless it renews it (at least twice
    `webhook_timeout_s`): another worker takes over a dead one's subscriptions after it."""
    webhook_deliveries_kept: int = 100
    """Delivery attempts kept per subscription for `GET /webhooks/{id}/deliveries`."""
    cors_origins: str = ""
    """Comma-separated origins browsers may call the API from (`*`: any); empty: no CORS."""
    stream_token_ttl_s: int = 300
    """How long a stream token (`POST /sessions/{id}/stream-tokens`) lasts by default."""
    stream_token_secret: str = ""
    """The HMAC key of stream tokens; empty: one is made at first start and kept in Redis for every process."""
    shutdown_timeout_s: float = 15.0
    """On SIGTERM the API stops accepting, ends its open streams and lets running requests finish for this long
    (a waiting synchronous chat included), then cancels what is left."""
    max_streams: int = 10_000
    """Open event streams (and waiting synchronous chats) one API process holds; beyond it 429 `too_many_streams`."""
    sse_keepalive_s: float = 15.0
    """A quiet event stream (`GET /sessions/{id}/events` as SSE) sends a comment this often."""
    data_dir: str = ".parley"
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    """`json`: one JSON object per line (for a log pipeline); `text`: for people. Both carry the request id, and
    in the worker the session and job ids."""
    api_workers: int = 1
    """HTTP worker processes of `parley api` (the default of `--workers`); they share one listening socket, and
    their metrics are merged through prometheus-client's multiprocess mode."""
    metrics_token: str = ""
    """If set, `GET /metrics` wants `Authorization: Bearer <this>`; empty: it is open like `/health` (it holds
    no keys and no content; keep it off the public network or set this)."""
    metrics_port: int = 0
    """`parley worker` serves `/metrics`, `/health` and `/ready` on this port (0: none); the API serves its
    metrics at `/metrics` on its own port."""
    otel: bool = False
    """Send OpenTelemetry traces (needs the `otel` extra; the exporter is set by the standard `OTEL_*` variables)."""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ if env is None else env)
        raw: dict[str, Any] = {}
        if env.get("REDIS_URL"):
            raw["redis_url"] = env["REDIS_URL"]
        for name in cls.__struct_fields__:
            key = _PREFIX + name.upper()
            if key in env:
                raw[name] = env[key]
        raw.update({k: v for k, v in overrides.items() if v is not None})
        settings = msgspec.convert(raw, cls, strict=False)
        if "partitions" not in raw and settings.on_cluster():
            settings = msgspec.structs.replace(settings, partitions=CLUSTER_PARTITIONS)
        return settings

    def on_cluster(self) -> bool:
        """`REDIS_URL` is a Redis Cluster: `redis+cluster://…`, or PARLEY_REDIS_CLUSTER=1."""
        scheme = (self.redis_url or "").split("://", 1)[0].lower()
        return bool(self.redis_url) and (self.redis_cluster or scheme in CLUSTER_SCHEMES)

    def cors(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def static_keys(self) -> dict[str, str]:
        """`PARLEY_API_KEYS` as {key: tenant}."""
        keys: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in self.api_keys.split(","))):
            tenant, sep, key = pair.partition(":")
            if not sep or not tenant or not key:
                raise ValueError(f"PARLEY_API_KEYS entry {pair!r} is not tenant:key")
            keys[key] = check_tenant(tenant)
        return keys


TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")
"""A tenant's name: it is part of Redis key names and hash tags, so no braces, colons or spaces."""


def check_tenant(name: str) -> str:
    if not TENANT.fullmatch(name):
        raise ValueError(f"tenant {name!r} is not 1 to 64 of A-Z a-z 0-9 . _ -")
    return name
