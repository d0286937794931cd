"""The litestar application: wiring only. Controllers live beside it."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from litestar import Litestar, MediaType, Request, Response, get
from litestar._openapi.plugin import OpenAPIPlugin
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from services.api import openapi, strict
from services.api.auth import Authenticator
from services.api.chats import ChatController
from services.api.context import Api
from services.api.errors import EXCEPTION_HANDLERS, error_response
from services.api.guard import EXPOSED_HEADERS
from services.api.history import EventController, audit
from services.api.openai_api import OpenAIController
from services.api.schedules import ScheduleController
from services.api.sessions import SessionController
from services.api.sse import StreamSlots
from services.api.usage import usage
from services.api.webhooks import WebhookController, webhook_changes
from services.worker.main import run_worker
from shared import bootstrap
from shared.config import Settings
from shared.domain import events, openai_wire, webhooks, wire
from shared.domain.wire import ErrorBody, Health, Readiness
from shared.observability import metrics
from shared.supervise import TRANSIENT, Supervisor

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("parley.api")


@get("/health", tags=["operations"])
async def health() -> Health:
    """Liveness: the process answers."""
    return Health(status="ok")


@get("/ready", tags=["operations"], responses={503: ResponseSpec(data_container=ErrorBody, description="Not ready")})
async def ready(state: State) -> Response[Readiness]:
    """Readiness: Redis answered within the last second, a projector sent a heartbeat in the last few seconds,
    and every part of this process runs. Answered from what the health part last saw: it never waits on Redis."""
    seen: HealthCheck = state.api.health
    parts = state.supervisor.ready
    body = Readiness(
        status="ready" if seen.redis and seen.projector and parts else "not_ready",
        redis=seen.redis,
        projector=seen.projector,
    )
    if body.status != "ready":
        details = {"redis": seen.redis, "projector": seen.projector, "parts": state.supervisor.status()}
        return error_response(
            503,
            "not_ready",
            "Redis, the projector or a part of this process is not available",
            details,
            {"Retry-After": "1"},
        )  # type: ignore[return-value]
    return Response(body, media_type=MediaType.JSON)


def metrics_route(token: str) -> Any:
    """`GET /metrics` (Prometheus text format). Open like `/health` unless `PARLEY_METRICS_TOKEN` is set; it holds
    no keys, tokens, ids or content (labels are route templates, statuses, tenants' names, partitions)."""
    expected = f"Bearer {token}".encode() if token else None

    @get("/metrics", tags=["operations"], include_in_schema=False)
    async def metrics_handler(request: Request) -> Response[bytes]:
        if expected is not None and not hmac.compare_digest(
            request.headers.get("authorization", "").encode(), expected
        ):
            return error_response(
                401,
                "unauthorized",
                "GET /metrics needs PARLEY_METRICS_TOKEN as a bearer token",
                None,
                {"WWW-Authenticate": "Bearer"},
            )  # type: ignore[return-value]
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE)

    return metrics_handler


class HealthCheck:
    """A part of the API process: pings the store and reads the projectors' heartbeats every `interval_s`, so
    `/ready` answers at once (and 503 within about half a second of Redis pausing)."""

    def __init__(self, parley: bootstrap.Parley, interval_s: float = 0.25, timeout_s: float = 0.5) -> None:
        self.parley = parley
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
                    self._projector = await self.parley.feed.alive(3_000)
                self._redis = True
            except TRANSIENT:
                self._redis = self._projector = False
                raise
            finally:
                self._at = time.monotonic()
            await asyncio.sleep(self.interval_s)


def create_app(settings: Settings, redis: Redis | None = None, run_worker_too: bool = False) -> Litestar:
    """`redis`: a client to use instead of connecting to `REDIS_URL` (fakeredis in `parley dev`); it then also
    serves blocking reads, by polling. `run_worker_too`: run the worker (projector and chat jobs) in this process
    too (`parley dev`)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        supervisor: Supervisor = app.state.supervisor
        parley = await bootstrap.start(settings, redis, supervisor, serves_api=True)
        check = HealthCheck(parley)
        app.state.api = Api(
            parley=parley,
            auth=Authenticator(settings.static_keys(), parley.api_keys, settings.key_cache_ttl_s),
            streams=StreamSlots(settings.max_streams, parley.limits),
            health=check,
        )
        supervisor.run("health", check.run)
        supervisor.run("stream-slots", app.state.api.streams.renew)
        supervisor.run("rate-leases", parley.admissions.run)
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(parley, stop)) if run_worker_too else None
        try:
            yield
        finally:
            stop.set()
            if worker is not None:
                await worker
            with contextlib.suppress(Exception):  # the store may be gone: those requests then stay counted
                async with asyncio.timeout(1):
                    await parley.admissions.settle(everything=True)
            await parley.close()

    app = Litestar(
        route_handlers=[
            SessionController,
            ScheduleController,
            ChatController,
            OpenAIController,
            EventController,
            audit,
            usage,
            WebhookController,
            webhook_changes,
            health,
            ready,
            metrics_route(settings.metrics_token),
        ],
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        before_request=strict.before_request,
        cors_config=CORSConfig(
            allow_origins=settings.cors(),
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=[
                "Authorization",
                "X-Auth-Key",
                "Content-Type",
                "Idempotency-Key",
                "If-Match",
                "Last-Event-ID",
                "Prefer",
                "X-Request-ID",
            ],
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        )
        if settings.cors()
        else None,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="Parley",
            version="0.1.0",
            description="Sessions, messages and tools for LLM agents, event-sourced on Redis.",
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(
                        type="http", scheme="bearer", description="Authorization: Bearer <api key>"
                    ),
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
        openapi.structs_of(wire, events, openai_wire, webhooks),
    )
    return app
