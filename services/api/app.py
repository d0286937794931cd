"""The litestar application: wiring only. Controllers live beside it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from litestar import Litestar, MediaType, Response, get
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from redis.asyncio import Redis

from shared.config import Settings
from shared.domain.commands import Limits
from shared.domain.model import ErrorBody, Health, Readiness
from shared.redis.api_keys import RedisApiKeys
from shared.redis.connect import check_partitions, connect
from shared.redis.chats import ChatQueue, ChatStore
from shared.redis.feed import projector_alive
from shared.redis.history import RedisHistory
from shared.redis.keys import Keys
from shared.redis.store import RedisStore
from shared.service import SessionService
from services.api.auth import Authenticator
from services.api.errors import EXCEPTION_HANDLERS, error_response
from services.api.chats import ChatController
from services.api.openai_api import OpenAIController
from services.api.history import EventController, audit
from services.api.sessions import SessionController
from services.worker.main import run_worker as worker_main

log = logging.getLogger("parley.api")


@get("/health", tags=["operations"])
async def health() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@get("/ready", tags=["operations"], responses={503: ResponseSpec(data_container=ErrorBody, description="Not ready")})
async def ready(state: State) -> Response[Readiness]:
    """Readiness: Redis answers and a projector has sent a heartbeat in the last 10 s."""
    redis: Redis = state.redis
    try:
        redis_ok = bool(await redis.ping())
        projector_ok = await projector_alive(redis, state.layout)
    except Exception as e:  # noqa: BLE001 - any failure here means "not ready"
        log.warning("readiness check failed: %r", e)
        redis_ok, projector_ok = False, False
    body = Readiness(status="ready" if redis_ok and projector_ok else "not_ready", redis=redis_ok, projector=projector_ok)
    if body.status != "ready":
        return error_response(503, "not_ready", "Redis or the projector is not available", {"redis": redis_ok, "projector": projector_ok})  # type: ignore[return-value]
    return Response(body, media_type=MediaType.JSON)


def create_app(settings: Settings, redis: Redis | None = None, run_worker: bool = False) -> Litestar:
    """`run_worker` runs the worker (projector and chat jobs) in this process too (`parley dev`, in-process tests)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        client = redis or connect(_require_url(settings))
        keys = Keys(settings.partitions)
        await check_partitions(client, settings.partitions)
        store = RedisStore(client, keys, settings.idempotency_ttl_s, settings.chat_retention_s)
        await store.load_scripts()
        app.state.redis = client
        app.state.layout = keys
        app.state.store = store
        app.state.auth = Authenticator(settings.static_keys(), RedisApiKeys(client), settings.key_cache_ttl_s)
        app.state.settings = settings
        app.state.chats = ChatStore(client, keys, settings.chat_retention_s)
        app.state.queue = ChatQueue(client)
        app.state.history = RedisHistory(client, keys)
        app.state.service = SessionService(
            store,
            store,
            settings.partitions,
            Limits(max_content_chars=settings.max_content_chars),
            settings.read_timeout_s,
            settings.state_cache_size,
        )
        stop = asyncio.Event()
        task = None
        if run_worker:
            task = asyncio.create_task(worker_main(client, settings, stop, fake=_is_fake(client)))
        try:
            yield
        finally:
            stop.set()
            if task is not None:
                await task
            if redis is None:
                await client.aclose()

    return Litestar(
        route_handlers=[SessionController, ChatController, OpenAIController, EventController, audit, health, ready],
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
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


def _is_fake(redis: Redis) -> bool:
    return type(redis).__module__.startswith("fakeredis")


def _require_url(settings: Settings) -> str:
    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set")
    return settings.redis_url
