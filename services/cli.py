"""`parley`: run the service (dev, api, worker), manage API keys, and work on history (rebuild, export, import, purge)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from shared.config import Settings, check_tenant
from shared.domain.errors import DomainError
from shared.observability import logs

log = logging.getLogger("parley")

DEV_KEY = "demo:demo-key"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="parley", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        (
            "dev",
            "API + projector in one process on an embedded store (REDIS_URL, else a private redis-server, else fakeredis)",
        ),
        ("api", "the HTTP API against REDIS_URL (run as many as you like)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8000)
        if name == "api":
            p.add_argument(
                "--workers", type=int, default=None, help="API processes on one socket (default: PARLEY_API_WORKERS, 1)"
            )
            p.add_argument(
                "--fd", type=int, default=None, help=argparse.SUPPRESS
            )  # a child of --workers: serve this socket
    w = sub.add_parser("worker", help="the projector and the chat worker against REDIS_URL (run as many as you like)")
    w.add_argument(
        "--role", choices=("all", "projector", "chat"), default="all", help="run only the projector, or only chat jobs"
    )
    keys = sub.add_parser("keys", help="manage API keys stored in Redis")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="create a key for a tenant and print it")
    kc.add_argument("--tenant", required=True)
    kr = ksub.add_parser("revoke", help="revoke a key (the key itself or its id)")
    kr.add_argument("key")
    ksub.add_parser("list", help="list key ids and tenants")
    from services import ops

    ops.add_parsers(sub)
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    logs.configure(settings.log_level, settings.log_format)
    if args.command in ("dev", "api", "worker"):
        from shared.observability import tracing

        tracing.configure(settings.otel, f"parley-{args.command}")
    match args.command:
        case "dev":
            _run(_dev(settings, args.host, args.port))
        case "api":
            _require_redis(settings)
            workers = args.workers if args.workers is not None else settings.api_workers
            if workers < 1:
                sys.exit("--workers must be at least 1")
            if workers > 1 and args.fd is None:
                from services.api.processes import serve_many

                sys.exit(serve_many(args.host, args.port, workers))
            sock = socket.socket(fileno=args.fd) if args.fd is not None else None
            _run(_serve(settings, args.host, args.port, run_worker=False, sock=sock))
        case "worker":
            _require_redis(settings)
            _run(_worker(settings, args.role))
        case "keys":
            _require_redis(settings)
            _run(_keys(settings, args))
        case command if command in ops.COMMANDS:
            try:
                _run(ops.COMMANDS[command](settings, args))
            except DomainError as e:
                sys.exit(f"parley {command}: {e.message}")
            except ValueError as e:
                sys.exit(f"parley {command}: {e}")


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where installed (uvicorn's `loop=` only applies to loops uvicorn creates itself)."""
    factory = None
    if _has("uvloop"):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            runner.run(main)
        except KeyboardInterrupt:  # the runner has cancelled `main`, so every `finally` ran: leave without a trace
            sys.exit(0 if _terminated else 130)


_terminated = False
"""SIGTERM arrived (in `parley dev`, which turns it into an interrupt): a requested stop, so exit 0."""


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    global _terminated
    _terminated = True
    signal.raise_signal(signal.SIGINT)


def _require_redis(settings: Settings) -> None:
    if not settings.redis_url:
        sys.exit("REDIS_URL is not set (parley dev runs without it)")


async def _dev(settings: Settings, host: str, port: int) -> None:
    from shared.bootstrap import embedded_store

    if not settings.api_keys:
        settings = Settings.from_env(api_keys=DEV_KEY)
        log.warning("PARLEY_API_KEYS is unset: accepting tenant 'demo' with key 'demo-key'")
    # SIGTERM stops it as Ctrl-C does: the server shuts down gracefully, then the runner cancels this coroutine, so
    # `embedded_store` stops its redis-server on the way out.
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    with embedded_store(settings) as (settings, redis):
        await _serve(settings, host, port, run_worker=True, redis=redis)


async def _serve(
    settings: Settings, host: str, port: int, run_worker: bool, redis: Any = None, sock: socket.socket | None = None
) -> None:
    """`sock`: a listening socket to serve (a child of `parley api --workers`) instead of binding host:port."""
    import uvicorn

    from services.api.app import create_app
    from services.api.guard import Gate, Guard
    from services.api.observe import Observed
    from services.api.server import guarded_protocol

    app = create_app(settings, redis=redis, run_worker_too=run_worker)
    gate = Gate(settings.max_inflight, min_limit=settings.min_inflight)
    config = uvicorn.Config(
        Observed(Guard(app, gate, settings.cors())),
        host=host,
        port=port,
        loop="none",
        http=guarded_protocol(settings.header_timeout_s, settings.body_timeout_s, gate),
        access_log=False,
        timeout_keep_alive=int(settings.keep_alive_s),
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's own lines go through Parley's handler (text or JSON)
        lifespan="on",
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
    )

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            api = getattr(app.state, "api", None)
            if api is not None:  # open streams end now; uvicorn waits for every connection to finish
                api.streams.end_all()
            await super().shutdown(sockets)

    server = Server(config)
    if sock is None:
        log.info("Parley on http://%s:%d (OpenAPI at /schema)", host, port)
    await _until_failure(
        server.serve(sockets=[sock] if sock else None),
        app.state.supervisor,
        lambda: setattr(server, "should_exit", True),
    )


async def _worker(settings: Settings, role: str) -> None:
    from services.worker.main import run_worker
    from services.worker.probes import ProbeServer
    from shared import bootstrap
    from shared.supervise import Supervisor

    supervisor = Supervisor(logging.getLogger("parley.worker"))
    started = False
    probes = ProbeServer(lambda: supervisor.status() if started else None)
    if settings.metrics_port:
        await probes.start(settings.metrics_port)
    parley = await bootstrap.start(settings, supervisor=supervisor)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker running (%s; model: %s)", role, settings.model_base_url or "offline")
    started = True
    try:
        await _until_failure(
            run_worker(parley, stop, role, sample_metrics=settings.metrics_port > 0), supervisor, stop.set
        )  # type: ignore[arg-type]
    finally:
        await parley.close()
        await probes.close()


async def _until_failure(main: Coroutine[Any, Any, None], supervisor: Any, shut_down: Callable[[], None]) -> None:
    """Run `main` (the server, the worker); if a supervised part fails for good, shut it down gracefully and exit
    with status 70 so the process's own supervisor restarts it (`shared.supervise`)."""
    task = asyncio.ensure_future(main)
    failed = asyncio.ensure_future(supervisor.failed())
    await asyncio.wait([task, failed], return_when=asyncio.FIRST_COMPLETED)
    if failed.done():
        failed.exception()  # logged by the supervisor already
        shut_down()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        sys.exit(70)
    failed.cancel()
    await task


async def _keys(settings: Settings, args: argparse.Namespace) -> None:
    from shared import bootstrap
    from shared.domain.ids import key_id

    parley = await bootstrap.start(settings, wait_for_store=False)
    try:
        match args.keys_command:
            case "create":
                key = await parley.api_keys.create(check_tenant(args.tenant))
                print(key)
                print(f"id {key_id(key)} for tenant {args.tenant}", file=sys.stderr)
            case "revoke":
                if not await parley.api_keys.revoke(args.key):
                    sys.exit("no such key")
                print("revoked", file=sys.stderr)
            case "list":
                for kid, tenant in await parley.api_keys.list():
                    print(f"{kid}\t{tenant}")
    finally:
        await parley.close()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
