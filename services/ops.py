"""`parley rebuild | export | import | purge`: the history operations, with progress on stderr."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import IO

import msgspec
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from shared import bootstrap
from shared.app.rebuild import Scope
from shared.app.retention import RetentionSweeper
from shared.config import Settings, check_tenant
from shared.domain.wire import TenantLimits

__all__ = ["COMMANDS", "add_parsers"]

console = Console(stderr=True)
OPS_TIMEOUT_S = 120.0
"""Operations run scripts that may take seconds (an import appends a whole log in one): their deadline is long."""


class CountColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.completed:,.0f}/{task.total or 0:,.0f}")


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:,.0f} events/s", style="cyan")


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        CountColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


FIELDS = tuple(f.name for f in msgspec.structs.fields(TenantLimits))


@asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[bootstrap.Parley]:
    """The deployment, wired as the API and the worker wire it, with a long command deadline."""
    url = bootstrap.dev_store_url(settings)
    if url is None:
        sys.exit("REDIS_URL is not set and no `parley dev` store was found in " + settings.data_dir)
    parley = await bootstrap.start(
        msgspec.structs.replace(settings, redis_url=url), timeout_s=OPS_TIMEOUT_S, wait_for_store=False
    )
    try:
        yield parley
    finally:
        await parley.close()


async def rebuild(settings: Settings, args: argparse.Namespace) -> None:
    scope = Scope(session_id=args.session, tenant=args.tenant)
    async with connected(settings) as parley:
        with progress() as bar:
            task = bar.add_task(f"rebuild {scope.name}", total=0)
            rebuilder = parley.rebuilder(lambda n: bar.advance(task, n))
            if args.fresh:
                await rebuilder.forget(scope)
            targets, _ = await rebuilder.remaining(scope)
            if await rebuilder.resuming(scope):
                console.print(f"resuming a killed rebuild of {scope.name}: {len(targets)} sessions left")
            bar.update(task, total=await rebuilder.total_events(targets))
            report = await rebuilder.run(scope, targets)
            bar.update(task, total=report.events, completed=report.events)
    console.print(f"rebuilt {report.sessions} sessions, {report.events} events")


async def export(settings: Settings, args: argparse.Namespace) -> None:
    async with connected(settings) as parley:
        head, _ = await parley.history.head(args.session)
        out: IO[bytes] = open(args.output, "wb") if args.output else sys.stdout.buffer
        try:
            with progress() as bar:
                task = bar.add_task(f"export {args.session}", total=head)
                async for line in parley.history.export(args.session):
                    out.write(line)
                    bar.advance(task, 0 if line.startswith(b'{"format"') else 1)
        finally:
            if args.output:
                out.close()
            else:
                out.flush()


async def import_(settings: Settings, args: argparse.Namespace) -> None:
    source: IO[bytes] = open(args.file, "rb") if args.file and args.file != "-" else sys.stdin.buffer
    with source:
        lines = list(_lines(source))
    async with connected(settings) as parley:
        done = await parley.history.import_(args.tenant, lines)
        total = sum(n for _, n in done)
        with progress() as bar:
            task = bar.add_task("project", total=total)
            for sid, n in done:  # projected here: an import is readable when the command returns
                await parley.projection.catch_up([sid])
                bar.advance(task, n)
    for sid, n in done:
        print(f"{sid}\t{n} events", file=sys.stderr)


async def purge(settings: Settings, args: argparse.Namespace) -> None:
    async with connected(settings) as parley:
        if args.session:
            targets = [args.session]
        else:
            targets = await parley.history.sessions_of_user(args.tenant, args.user_id)
        heads = {sid: (await parley.history.head(sid))[0] for sid in targets}
        with progress() as bar:
            task = bar.add_task(f"purge {len(targets)} sessions", total=sum(heads.values()))
            # a session its forks read waits for them (copy-on-write): forks first, in passes
            kept = await parley.history.purge_all(args.tenant, targets, lambda sid: bar.advance(task, heads[sid]))
        started = await parley.history.rewrite_persistence()
    for sid in targets:
        if sid not in kept:
            print(sid)
    console.print(
        f"purged {len(targets) - len(kept)} sessions"
        + (f"; Redis is rewriting its files ({', '.join(started)})" if started else "")
    )
    if kept:
        sys.exit(f"parley purge: {len(kept)} not purged, forks of other users read them: {', '.join(kept)}")


async def tenants(settings: Settings, args: argparse.Namespace) -> None:
    """`parley tenants set-limits | show`: a tenant's limits (its own over the deployment's defaults) and usage."""
    tenant = check_tenant(args.tenant)
    async with connected(settings) as parley:
        if args.tenants_command == "set-limits":
            values = {f: v for f in FIELDS if (v := getattr(args, f)) is not None}
            if not values and not args.reset:
                sys.exit("parley tenants set-limits: name at least one limit (or --reset one)")
            await parley.tenancy.set_limits(tenant, values, args.reset or ())
        usage = await parley.tenancy.usage(tenant, args.days if args.tenants_command == "show" else 1)
        report = {
            "tenant": tenant,
            "limits": msgspec.structs.asdict(usage.limits),
            "own": await parley.tenancy.overrides(tenant),
            "usage": [msgspec.structs.asdict(d) for d in usage.days],
        }
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(report), indent=2).decode() + "\n")


async def retention(settings: Settings, args: argparse.Namespace) -> None:
    """`parley retention run [--dry-run]`: sweep every idle session once (passes until the walk wraps around),
    one JSON line per expired session (`done`: deleted or purged) and per session whose hidden messages' copies
    were freed (`messages`), then a summary line."""
    tenant = check_tenant(args.tenant) if args.tenant else None
    now = datetime.fromisoformat(args.now).timestamp() if args.now else None
    async with connected(settings) as parley:
        sweeper = RetentionSweeper(
            parley.sessions,
            parley.views,
            settings.partitions,
            settings.retention_batch,
            (lambda: now) if now else time.time,
        )
        scanned = expired = removed = trimmed = 0
        while True:
            done = await sweeper.sweep(dry_run=args.dry_run, tenant=tenant)
            scanned += done.scanned
            for item in done.expired:
                expired += 1
                removed += item.done
                sys.stdout.write(msgspec.json.encode(item).decode() + "\n")
            for t in done.trimmed:
                trimmed += t.messages
                sys.stdout.write(msgspec.json.encode(t).decode() + "\n")
            if done.wrapped:
                break
    summary = {
        "scanned": scanned,
        "expired": expired,
        "removed": removed,
        "trimmed_messages": trimmed,
        "dry_run": args.dry_run,
    }
    sys.stdout.write(msgspec.json.encode(summary).decode() + "\n")


def _lines(source: IO[bytes]) -> Iterator[bytes]:
    for line in source:
        yield line.rstrip(b"\n")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("rebuild", help="rebuild read models from the log while the service runs (resumes if killed)")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--session")
    g.add_argument("--tenant")
    g.add_argument("--all", action="store_true")
    r.add_argument("--fresh", action="store_true", help="start over instead of resuming a killed run of this scope")
    e = sub.add_parser("export", help="write a session's log as NDJSON")
    e.add_argument("--session", required=True)
    e.add_argument("-o", "--output")
    i = sub.add_parser("import", help="load exported sessions into this deployment as the tenant's, then project them")
    i.add_argument("--tenant", required=True)
    i.add_argument("file", nargs="?", help="an export file (default: stdin)")
    p = sub.add_parser("purge", help="erase sessions (a user's, or one) and everything derived from them")
    p.add_argument("--tenant", required=True)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user-id")
    who.add_argument("--session")

    t = sub.add_parser("tenants", help="a tenant's limits and usage")
    tsub = t.add_subparsers(dest="tenants_command", required=True)
    sl = tsub.add_parser("set-limits", help="set a tenant's own limits (0: unlimited); the rest stay the defaults")
    sl.add_argument("--tenant", required=True)
    sl.add_argument("--rps", type=float, help="requests per second, across every API process")
    sl.add_argument("--burst", type=int, help="requests at once after a quiet spell")
    sl.add_argument("--concurrent-chats", dest="concurrent_chats", type=int, help="chats queued or running at once")
    sl.add_argument(
        "--chat-tokens-per-day", dest="chat_tokens_per_day", type=int, help="prompt + completion tokens per UTC day"
    )
    sl.add_argument("--streams", type=int, help="open event streams (and waiting synchronous chats)")
    sl.add_argument(
        "--retention-idle-days",
        dest="retention_idle_days",
        type=int,
        help="sessions without a retention of their own go this many days after their last change (0: kept)",
    )
    sl.add_argument(
        "--retention-action",
        dest="retention_action",
        choices=["delete", "purge"],
        help="what retention does to them: delete (the log stays) or purge (erased)",
    )
    sl.add_argument(
        "--retention-keep-messages",
        dest="retention_keep_messages",
        type=int,
        help="sessions without a retention of their own list only their newest this many messages (0: all)",
    )
    sl.add_argument("--reset", nargs="+", choices=FIELDS, help="these limits go back to the deployment's defaults")
    sh = tsub.add_parser("show", help="a tenant's limits (effective and its own) and its usage per day")
    sh.add_argument("--tenant", required=True)
    sh.add_argument("--days", type=int, default=7)

    rt = sub.add_parser("retention", help="delete or purge the sessions their retention says have been idle too long")
    rtsub = rt.add_subparsers(dest="retention_command", required=True)
    run = rtsub.add_parser("run", help="one sweep over every idle session now (workers also sweep on their own)")
    run.add_argument("--dry-run", action="store_true", help="list what would go; change nothing")
    run.add_argument("--tenant", help="only this tenant's sessions")
    run.add_argument("--now", help="sweep as if it were this time (ISO 8601, e.g. 2027-01-31T00:00:00+00:00)")


COMMANDS = {
    "rebuild": rebuild,
    "export": export,
    "import": import_,
    "purge": purge,
    "tenants": tenants,
    "retention": retention,
}
