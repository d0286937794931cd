"""The litestar application: wiring only. Controllers live beside it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator

from litestar import Litestar, MediaType, Response, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar._openapi.plugin import OpenAPIPlugin
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from redis.asyncio import Redis

from shared.config import Settings
from shared.domain.commands import Limits
from shared.domain import events, openai_wire, wire
from shared.domain.wire import ErrorBody, Health, Readiness
from shared.adapters.redis.api_keys import RedisApiKeys
from shared.adapters.redis.connect import Deadlines, check_partitions, connect, connect_blocking
from shared.adapters.redis.notify import Notifier
from shared.supervise import TRANSIENT, Supervisor, until_available
from shared.adapters.redis.chats import ChatQueue, ChatStore
from shared.adapters.redis.feed import RedisFeed, projector_alive
from shared.adapters.redis.history import RedisHistory
from shared.adapters.redis.keys import Keys
from shared.adapters.redis.limits import RedisLimits, tenant_defaults
from shared.adapters.redis.store import RedisStore
from shared.app.service import SessionService
from services.api.auth import Authenticator
from services.api.errors import EXCEPTION_HANDLERS, error_response
from services.api.chats import ChatController
from services.api.openai_api import OpenAIController
from services.api.history import EventController, audit
from services.api.sessions import SessionController
from services.api import chats, openapi, sse, strict
from services.api.guard import EXPOSED_HEADERS
from services.api.sse import StreamSlots
from services.api.usage import usage
from services.worker.main import chat_hooks, run_worker as worker_main
from services.worker.projector import Projector

log = logging.getLogger("parley.api")


@get("/health", tags=["operations"])
async def health() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@get("/ready", tags=["operations"], responses={503: ResponseSpec(data_container=ErrorBody, description="Not ready")})
async def ready(state: State) -> Response[Readiness]:
    """Readiness: Redis answered within the last second, a projector sent a heartbeat in the last few seconds,
    and every part of this process runs. Answered from what the health part last saw: it never waits on Redis."""
    seen: HealthCheck = state.health
    parts = state.supervisor.ready
    body = Readiness(status="ready" if seen.redis and seen.projector and parts else "not_ready", redis=seen.redis, projector=seen.projector)
    if body.status != "ready":
        details = {"redis": seen.redis, "projector": seen.projector, "parts": state.supervisor.status()}
        return error_response(503, "not_ready", "Redis, the projector or a part of this process is not available", details, {"Retry-After": "1"})  # type: ignore[return-value]
    return Response(body, media_type=MediaType.JSON)


class HealthCheck:
    """A part of the API process: pings Redis and reads the projectors' heartbeats every `interval_s`, so `/ready`
    answers at once (and 503 within about half a second of Redis pausing)."""

    def __init__(self, client: Redis, keys: Keys, interval_s: float = 0.25, timeout_s: float = 0.5) -> None:
        self.client = client
        self.keys = keys
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._redis = self._projector = False
        self._at = 0.0

    @property
    def redis(self) -> bool:
        return self._redis and time.monotonic() - self._at < 4 * self.interval_s + self.timeout_s

    @property
    def projector(self) -> bool:
        return self._projector and self.redis

    async def run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.timeout_s):
                    self._projector = await projector_alive(self.client, self.keys, within_ms=3_000)
                self._redis = True
            except TRANSIENT:
                self._redis = self._projector = False
                raise
            finally:
                self._at = time.monotonic()
            await asyncio.sleep(self.interval_s)


async def stream_secret(redis: Redis, settings: Settings) -> bytes:
    """The HMAC key of stream tokens: the configured one, else one made at first start and kept in Redis, so that
    every API process accepts the tokens any of them gave out."""
    if settings.stream_token_secret:
        return settings.stream_token_secret.encode()
    await redis.hsetnx(Keys.config, "stream_token_secret", secrets.token_hex(32))
    return bytes(await redis.hget(Keys.config, "stream_token_secret"))


def create_app(settings: Settings, redis: Redis | None = None, run_worker: bool = False) -> Litestar:
    """`redis`: a client to use instead of connecting to `REDIS_URL` (fakeredis in `parley dev`); it then also
    serves blocking reads, by polling. `run_worker` runs the worker (projector and chat jobs) in this process too
    (`parley dev`)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        fake = redis is not None and _is_fake(redis)
        client = redis or connect(_require_url(settings), Deadlines.of(settings))
        blocking = redis or connect_blocking(_require_url(settings), Deadlines.of(settings))
        keys = Keys(settings.partitions)
        supervisor: Supervisor = app.state.supervisor
        await until_available(lambda: check_partitions(client, settings.partitions), "the store")
        store = RedisStore(client, keys, settings.idempotency_ttl_s, settings.chat_retention_s)
        app.state.redis = client
        app.state.layout = keys
        app.state.store = store
        app.state.auth = Authenticator(settings.static_keys(), RedisApiKeys(client), settings.key_cache_ttl_s)
        app.state.settings = settings
        app.state.chats = ChatStore(client, keys, settings.chat_retention_s)
        app.state.queue = ChatQueue(client)
        app.state.history = RedisHistory(client, keys)
        app.state.notifier = Notifier(blocking, keys, supervisor, poll_s=0.01 if fake else None)
        app.state.stream_secret = await stream_secret(client, settings)
        app.state.limits = limits = RedisLimits(client, keys, tenant_defaults(settings))
        app.state.streams = StreamSlots(settings.max_streams, limits)
        supervisor.run("stream-slots", app.state.streams.renew)
        app.state.service = SessionService(
            store,
            store,
            settings.partitions,
            Limits(max_content_chars=settings.max_content_chars),
            settings.read_timeout_s,
            settings.state_cache_size,
            projection=Projector(store, RedisFeed(client, keys, "assist"), **chat_hooks(client, keys, settings)),
            read_assist_s=settings.read_assist_s,
        )
        check = app.state.health = HealthCheck(client, keys)
        supervisor.run("health", check.run)
        stop = asyncio.Event()
        worker = None
        if run_worker:
            worker = asyncio.create_task(worker_main(client, blocking, settings, stop, supervisor, fake=fake))
        try:
            yield
        finally:
            stop.set()
            if worker is not None:
                await worker
            await supervisor.stop_all()
            if redis is None:
                await client.aclose()
                await blocking.aclose()

    app = Litestar(
        route_handlers=[SessionController, ChatController, OpenAIController, EventController, audit, usage, health, ready],
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        before_request=strict.before_request,
        cors_config=CORSConfig(
            allow_origins=settings.cors(), allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=["Authorization", "X-Auth-Key", "Content-Type", "Idempotency-Key", "If-Match", "Last-Event-ID", "Prefer", "X-Request-ID"],
            expose_headers=EXPOSED_HEADERS, max_age=600,
        ) if settings.cors() else None,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="Parley",
            version="0.1.0",
            description="Sessions, messages and tools for LLM agents, event-sourced on Redis.",
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(type="http", scheme="bearer", description="Authorization: Bearer <api key>"),
                    "apiKey": SecurityScheme(type="apiKey", name="X-Auth-Key", security_scheme_in="header"),
                }
            ),
            render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
            path="/schema",
        ),
        logging_config=None,
    )
    app.state.supervisor = Supervisor(logging.getLogger("parley.api"))
    openapi.finish(
        app.plugins.get(OpenAPIPlugin).provide_openapi_schema(),
        openapi.structs_of(wire, events, openai_wire, chats, sse),
    )
    return app


def _is_fake(redis: Redis) -> bool:
    return type(redis).__module__.startswith("fakeredis")


def _require_url(settings: Settings) -> str:
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set")
    return settings.redis_url
