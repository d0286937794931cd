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
import contextlib
import gc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from shared.app.ports import LogAdmin, ReadModels
from shared.app.projection import Projection
from shared.domain.events import Event
from shared.domain.projection import ReadModelUpdate, project

BATCH = 64
"""Sessions built together: one read of their logs and one write of their read models serve them all."""
READ_BATCH = 2_000
"""Events read per session per round trip."""


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
        views: ReadModels,
        admin: LogAdmin,
        live: Projection,
        on_events: Callable[[int], None] = lambda n: None,
    ) -> None:
        """`live` catches the live generation up (with its chat hooks) before each switch; `on_events` reports
        progress."""
        self.views = views
        self.admin = admin
        self.live = live
        self.on_events = on_events

    async def targets(self, scope: Scope) -> list[tuple[str, str]]:
        """(tenant, session id) in a stable order: tenants by name, then sessions by id."""
        if scope.session_id:
            _, tenant, _ = await self.admin.head(scope.session_id)
            return [(tenant, scope.session_id)] if tenant else []
        tenants = [scope.tenant] if scope.tenant else await self.admin.tenants()
        return [(t, sid) for t in tenants for sid in await self.admin.session_ids(t)]

    async def total_events(self, targets: Sequence[tuple[str, str]]) -> int:
        return sum(await self.admin.heads([sid for _, sid in targets]))

    async def remaining(self, scope: Scope) -> tuple[list[tuple[str, str]], str | None]:
        """The targets a previous, killed run of this scope did not finish, and where it stopped."""
        targets = await self.targets(scope)
        done = await self.admin.progress(scope.name)
        if not done:
            return targets, None
        return [t for t in targets if _mark(t) > done], done

    async def resuming(self, scope: Scope) -> bool:
        """A run of this scope was killed: its progress record is still there."""
        return await self.admin.progress(scope.name) is not None

    async def forget(self, scope: Scope) -> None:
        """Start this scope over (`parley rebuild --fresh`): no resuming, partial generations rebuilt from scratch."""
        await self.admin.set_progress(scope.name, None)

    async def run(self, scope: Scope, targets: Sequence[tuple[str, str]] | None = None) -> Report:
        with _no_cycle_collection():
            return await self._run(scope, targets)

    async def _run(self, scope: Scope, targets: Sequence[tuple[str, str]] | None) -> Report:
        report = Report()
        # Only a run that resumes its own killed run continues the partial generations that run left; any other
        # run starts them over, so a generation is never part built by an older projection code.
        resume = await self.resuming(scope)
        await self.admin.set_progress(scope.name, "")
        if targets is None:
            targets, report.resumed_after = await self.remaining(scope)
        for i in range(0, len(targets), BATCH):
            batch = targets[i : i + BATCH]
            report.events += await self.rebuild(batch, resume)
            report.sessions += len(batch)
            await self.admin.set_progress(scope.name, _mark(batch[-1]))
        await self.admin.set_progress(scope.name, None)
        return report

    async def rebuild(self, batch: Sequence[tuple[str, str]], resume: bool = False) -> int:
        """Rebuild these sessions' read models; answers the events folded. `resume`: continue what a killed run
        left in their new generations rather than start them over."""
        todo = [sid for _, sid in batch]
        gens = {sid: g + 1 for sid, g in zip(todo, await self.admin.generations(todo))}
        if not resume:
            for sid in todo:
                await self.admin.drop(sid, gens[sid])
        tenants = dict((sid, t) for t, sid in batch)
        folded = 0
        while todo:
            folded += await self._build(todo, gens)
            await self.live.catch_up(todo)
            switched = await self.admin.switch([(tenants[sid], sid, gens[sid]) for sid in todo])
            todo = [sid for sid, r in zip(todo, switched) if r == 0]
            if todo:
                await asyncio.sleep(0.001)
        return folded

    async def _build(self, session_ids: list[str], gens: dict[str, int]) -> int:
        """Fold each session's log into its new generation up to the head it had when read.

        The log is read from where the new generation stands (a killed run left it somewhere), and the next read
        is in flight while this one is folded and written, so the store and Python work at the same time."""
        found = await self.admin.generation_states({sid: gens[sid] for sid in session_ids})
        states = {sid: state for sid, (_, state) in found.items()}
        tenants = {sid: tenant for sid, (tenant, _) in found.items()}
        folded = 0
        stopped: set[str] = set()  # sessions whose write failed: another rebuild wrote their generation
        reading = asyncio.ensure_future(self.admin.read_logs({sid: s.version for sid, s in states.items()}, READ_BATCH))
        writing: asyncio.Future[list[tuple[ReadModelUpdate, bool]]] | None = None
        while True:
            logs: dict[str, list[Event]] = await reading
            after = {
                sid: events[-1].version
                for sid, events in logs.items()
                if len(events) == READ_BATCH and sid not in stopped
            }
            if after:
                reading = asyncio.ensure_future(self.admin.read_logs(after, READ_BATCH))
            updates: list[tuple[str, ReadModelUpdate]] = []
            for sid, events in logs.items():
                if events and sid not in stopped:
                    update = project(states[sid], events)
                    states[sid] = update.state  # the next round folds on; a failed write stops the session
                    updates.append((tenants[sid], update))
            if writing is not None:
                folded += self._written(await writing, stopped)
            writing = asyncio.ensure_future(self._write(updates, gens)) if updates else None
            if not after:
                if writing is not None:
                    folded += self._written(await writing, stopped)
                return folded

    async def _write(
        self, updates: list[tuple[str, ReadModelUpdate]], gens: dict[str, int]
    ) -> list[tuple[ReadModelUpdate, bool]]:
        """One round's updates, in flight while the next round is folded (rounds are written in order)."""
        by_gen: dict[int, list[tuple[str, ReadModelUpdate]]] = {}
        for tenant, u in updates:
            by_gen.setdefault(gens[u.session_id], []).append((tenant, u))
        out: list[tuple[ReadModelUpdate, bool]] = []
        for gen, batch in by_gen.items():
            out += zip((u for _, u in batch), await self.views.apply(batch, gen=gen))
        return out

    def _written(self, results: list[tuple[ReadModelUpdate, bool]], stopped: set[str]) -> int:
        folded = 0
        for u, ok in results:
            if ok:
                folded += u.event_count
                self.on_events(u.event_count)
            else:  # its later rounds would fail too; the switch fails and the next pass starts it over
                stopped.add(u.session_id)
        return folded


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """A rebuild allocates millions of short-lived, acyclic objects; the cycle collector's passes over them cost
    5-15% and find nothing, so it pauses for the run (reference counting still frees everything)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _mark(target: tuple[str, str]) -> str:
    return f"{target[0]}\x00{target[1]}"
