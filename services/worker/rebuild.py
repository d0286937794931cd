"""`parley rebuild`: fold the log into a fresh generation of read models while the service runs.

Per session: build generation g+1 from the log with the same `project` the projector
uses (resuming from whatever g+1 already holds), bring the live generation up to the
head as the projector would, then switch the head to g+1 in one script that also
checks both are at the head, and drop generation g. An append that lands meanwhile
fails the switch; the loop builds the new events in and tries again. A killed run
leaves at most one partial g+1 per session and a cursor in `Keys.rebuild(scope)`;
running it again resumes after the cursor and from the partial generation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from shared.domain.projection import project
from shared.redis.history import RedisHistory
from shared.redis.store import RedisStore
from services.worker.projector import Projector

BATCH = 64
"""Sessions built together: one pipeline of LOAD and one of APPLY serve them all."""


@dataclass(frozen=True)
class Scope:
    session_id: str | None = None
    tenant: str | None = None

    @property
    def name(self) -> str:
        if self.session_id:
            return f"session:{self.session_id}"
        return f"tenant:{self.tenant}" if self.tenant else "all"


@dataclass
class Report:
    sessions: int = 0
    events: int = 0
    resumed_after: str | None = None


class Rebuilder:
    def __init__(
        self,
        store: RedisStore,
        history: RedisHistory,
        live: Projector,
        on_events: Callable[[int], None] = lambda n: None,
    ) -> None:
        """`live` catches the live generation up (with its chat hooks) before each switch; `on_events` reports
        progress."""
        self.store = store
        self.history = history
        self.live = live
        self.on_events = on_events

    async def targets(self, scope: Scope) -> list[tuple[str, str]]:
        """(tenant, session id) in a stable order: tenants by name, then sessions by id."""
        if scope.session_id:
            _, tenant, _ = await self.history.head(scope.session_id)
            return [(tenant, scope.session_id)] if tenant else []
        tenants = [scope.tenant] if scope.tenant else await self.history.tenants()
        return [(t, sid) for t in tenants for sid in await self.history.session_ids(t)]

    async def total_events(self, targets: Sequence[tuple[str, str]]) -> int:
        pipe = self.store.redis.pipeline(transaction=False)
        for _, sid in targets:
            pipe.hget(self.store.keys.head(sid), "v")
        return sum(int(v or 0) for v in await pipe.execute())

    async def remaining(self, scope: Scope) -> tuple[list[tuple[str, str]], str | None]:
        """The targets a previous, killed run of this scope did not finish, and where it stopped."""
        targets = await self.targets(scope)
        cursor = await self.store.redis.hget(self.store.keys.rebuild(scope.name), "cursor")
        if cursor is None:
            return targets, None
        done = cursor.decode()
        return [t for t in targets if _mark(t) > done], done

    async def run(self, scope: Scope, targets: Sequence[tuple[str, str]] | None = None) -> Report:
        report = Report()
        if targets is None:
            targets, report.resumed_after = await self.remaining(scope)
        progress = self.store.keys.rebuild(scope.name)
        for i in range(0, len(targets), BATCH):
            batch = targets[i : i + BATCH]
            report.events += await self.rebuild(batch)
            report.sessions += len(batch)
            await self.store.redis.hset(progress, "cursor", _mark(batch[-1]))
        await self.store.redis.delete(progress)
        return report

    async def rebuild(self, batch: Sequence[tuple[str, str]]) -> int:
        """Rebuild these sessions' read models; answers the events folded."""
        gens: dict[str, int] = {}
        for tenant, sid in batch:
            _, _, g = await self.history.head(sid)
            gens[sid] = g + 1
        tenants = dict((sid, t) for t, sid in batch)
        todo = [sid for _, sid in batch]
        folded = 0
        while todo:
            folded += await self._build(todo, gens)
            await self.live.catch_up(todo)
            left = []
            for sid in todo:
                if await self.history.switch(tenants[sid], sid, gens[sid]) == 0:
                    left.append(sid)
            todo = left
            if todo:
                await asyncio.sleep(0.001)
        return folded

    async def _build(self, session_ids: list[str], gens: dict[str, int]) -> int:
        """Fold each session's log into its new generation up to the head (each may have its own generation)."""
        folded = 0
        by_gen: dict[int, list[str]] = {}
        for sid in session_ids:
            by_gen.setdefault(gens[sid], []).append(sid)
        for gen, sids in by_gen.items():
            todo = sids
            while todo:
                pending = await self.store.pending(todo, gen=gen)
                updates = [(p.tenant, project(p.state, p.events)) for p in pending if p is not None and p.events]
                results = await self.store.apply(updates, gen=gen)
                todo = []
                for (_, u), p, ok in zip(updates, [p for p in pending if p is not None and p.events], results):
                    if ok:
                        folded += u.event_count
                        self.on_events(u.event_count)
                    if not ok or u.to_version < p.head:
                        todo.append(u.session_id)
        return folded


def _mark(target: tuple[str, str]) -> str:
    return f"{target[0]}\x00{target[1]}"


