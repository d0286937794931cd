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
from datetime import UTC, datetime
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from shared.adapters.codec import decode_event, decode_state
from shared.domain.projection import ReadModelUpdate, project
from shared.domain.state import SessionState
from shared.adapters.redis.history import RedisHistory
from shared.adapters.redis.store import RedisStore
from services.worker.projector import Projector

BATCH = 64
"""Sessions built together: one pipeline of XRANGE and one of APPLY serve them all."""
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

    async def resuming(self, scope: Scope) -> bool:
        """A run of this scope was killed: its progress record is still there."""
        return bool(await self.store.redis.exists(self.store.keys.rebuild(scope.name)))

    async def forget(self, scope: Scope) -> None:
        """Start this scope over (`parley rebuild --fresh`): no resuming, partial generations rebuilt from scratch."""
        await self.store.redis.delete(self.store.keys.rebuild(scope.name))

    async def run(self, scope: Scope, targets: Sequence[tuple[str, str]] | None = None) -> Report:
        with _no_cycle_collection():
            return await self._run(scope, targets)

    async def _run(self, scope: Scope, targets: Sequence[tuple[str, str]] | None) -> Report:
        report = Report()
        progress = self.store.keys.rebuild(scope.name)
        # Only a run that resumes its own killed run continues the partial generations that run left; any other
        # run starts them over, so a generation is never part built by an older projection code.
        resume = await self.resuming(scope)
        await self.store.redis.hsetnx(progress, "started", datetime.now(UTC).isoformat())
        if targets is None:
            targets, report.resumed_after = await self.remaining(scope)
        for i in range(0, len(targets), BATCH):
            batch = targets[i : i + BATCH]
            report.events += await self.rebuild(batch, resume)
            report.sessions += len(batch)
            await self.store.redis.hset(progress, "cursor", _mark(batch[-1]))
        await self.store.redis.delete(progress)
        return report

    async def rebuild(self, batch: Sequence[tuple[str, str]], resume: bool = False) -> int:
        """Rebuild these sessions' read models; answers the events folded. `resume`: continue what a killed run
        left in their new generations rather than start them over."""
        todo = [sid for _, sid in batch]
        gens = {sid: g + 1 for sid, g in zip(todo, await self.history.generations(todo))}
        if not resume:
            for sid in todo:
                await self.history.drop(sid, gens[sid])
        tenants = dict((sid, t) for t, sid in batch)
        folded = 0
        while todo:
            folded += await self._build(todo, gens)
            await self.live.catch_up(todo)
            switched = await self.history.switch([(tenants[sid], sid, gens[sid]) for sid in todo])
            todo = [sid for sid, r in zip(todo, switched) if r == 0]
            if todo:
                await asyncio.sleep(0.001)
        return folded

    async def _build(self, session_ids: list[str], gens: dict[str, int]) -> int:
        """Fold each session's log into its new generation up to the head it had when read.

        The log is read with plain pipelined XRANGE from where the new generation stands (a killed run left it
        somewhere), and the next read is in flight while this one is folded and written, so Redis and Python
        work at the same time."""
        k, redis = self.store.keys, self.store.redis
        pipe = redis.pipeline(transaction=False)
        for sid in session_ids:
            pipe.hmget(k.view(sid, gens[sid]), "st")
            pipe.hget(k.head(sid), "t")
        replies = await pipe.execute()
        states: dict[str, SessionState] = {}
        tenants: dict[str, str] = {}
        for sid, (raw,), tenant in zip(session_ids, replies[::2], replies[1::2]):
            if tenant is not None:  # else purged meanwhile
                states[sid] = decode_state(raw) if raw is not None else SessionState(id=sid)
                tenants[sid] = tenant.decode()
        folded = 0
        stopped: set[str] = set()  # sessions whose write failed: another rebuild wrote their generation
        reading = asyncio.ensure_future(self._read({sid: s.version for sid, s in states.items()}))
        writing: asyncio.Future[list[tuple[ReadModelUpdate, bool]]] | None = None
        while True:
            logs = await reading
            after = {
                sid: _version(entries[-1][0]) for sid, entries in logs.items() if len(entries) == READ_BATCH and sid not in stopped
            }
            if after:
                reading = asyncio.ensure_future(self._read(after))
            updates: list[tuple[str, ReadModelUpdate]] = []
            for sid, entries in logs.items():
                if entries and sid not in stopped:
                    first = _version(entries[0][0])  # a log's versions are contiguous
                    update = project(states[sid], [decode_event(first + i, f) for i, (_, f) in enumerate(entries)])
                    states[sid] = update.state  # the next round folds on; a failed write stops the session
                    updates.append((tenants[sid], update))
            if writing is not None:
                folded += self._written(await writing, stopped)
            writing = asyncio.ensure_future(self._write(updates, gens)) if updates else None
            if not after:
                if writing is not None:
                    folded += self._written(await writing, stopped)
                return folded

    async def _write(self, updates: list[tuple[str, ReadModelUpdate]], gens: dict[str, int]) -> list[tuple[ReadModelUpdate, bool]]:
        """One round's updates, in flight while the next round is folded (rounds are written in order)."""
        by_gen: dict[int, list[tuple[str, ReadModelUpdate]]] = {}
        for tenant, u in updates:
            by_gen.setdefault(gens[u.session_id], []).append((tenant, u))
        out: list[tuple[ReadModelUpdate, bool]] = []
        for gen, batch in by_gen.items():
            out += zip((u for _, u in batch), await self.store.apply(batch, gen=gen))
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

    async def _read(self, after: dict[str, int]) -> dict[str, list[tuple[bytes, dict[bytes, bytes]]]]:
        """Each session's next entries after the version given (`after` is the caller's to keep: not mutated)."""
        targets = list(after.items())
        pipe = self.store.redis.pipeline(transaction=False)
        for sid, version in targets:
            pipe.xrange(self.store.keys.log(sid), f"{version + 1}-0", "+", count=READ_BATCH)
        return {sid: entries for (sid, _), entries in zip(targets, await pipe.execute())}


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


def _version(entry_id: bytes) -> int:
    return int(entry_id.split(b"-", 1)[0])


