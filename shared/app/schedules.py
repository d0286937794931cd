"""Cron schedules: a session's chats at every tick of a cron expression, each tick run once however many workers
look (`shared.domain.schedules` says when; the log says what was taken).

`Schedules` creates, reads, changes and deletes a session's schedules (events in its log; reads fold the log, so
they are always current) and fires a session's due ticks. `Scheduler` walks the partitions' schedule index (which
the projector keeps: each session's next tick) and fires what is due. Two schedulers racing for one tick both
decide on the log: the first append records `ScheduleFired`, the other's decision then meets `TickTaken` and
does nothing. A tick runs as a chat request (`Chats.request`), under the tenant's limits and the session's
multitask policy; one they refuse is recorded as skipped, not retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import msgspec

from shared.app.chats import Chats
from shared.app.ports import ReadModels
from shared.app.service import Idempotency, SessionService
from shared.domain import schedules
from shared.domain.commands import CreateSchedule, DeleteSchedule, SkipTicks, Tick, UpdateSchedule
from shared.domain.errors import (
    ChatInProgress,
    DomainError,
    Invalid,
    NotFound,
    QuotaExceeded,
    RateLimited,
    TickTaken,
)
from shared.domain.events import Event
from shared.domain.ids import uuid7
from shared.domain.state import ScheduleState, SessionState
from shared.domain.wire import ChatRequest, ChatTemplate, Schedule, ScheduleCreate, ScheduleList, SchedulePatch

__all__ = ["Fired", "Scheduler", "Schedules", "resource"]

log = logging.getLogger("parley.schedules")

_TEMPLATE_FIELDS = ChatTemplate.__struct_fields__
_SPEC_FIELDS = ScheduleCreate.__struct_fields__


def resource(session_id: str, s: ScheduleState) -> Schedule:
    """The schedule as the API shows it: its spec, its counters and its next tick."""
    spec = s.spec
    return Schedule(
        **{f: getattr(spec, f) for f in _SPEC_FIELDS},
        id=s.id,
        session_id=session_id,
        created_at=s.created_at,
        updated_at=s.updated_at,
        next_run_at=None if spec.paused else schedules.next_tick(spec.cron, spec.timezone, s.since),
        last_tick_at=s.last_tick,
        last_job_id=s.last_job_id,
        runs=s.runs,
        skipped=s.skipped,
    )


class Fired(msgspec.Struct, kw_only=True):
    """What firing ticks did: chats requested, ticks skipped (missed or refused)."""

    runs: int = 0
    skipped: int = 0

    def __iadd__(self, other: Fired) -> Fired:
        self.runs += other.runs
        self.skipped += other.skipped
        return self


class Schedules:
    def __init__(self, service: SessionService, chats: Chats, grace_s: float) -> None:
        self.service = service
        self.chats = chats
        self.grace = timedelta(seconds=grace_s)

    # -- the API's side ---------------------------------------------------------------------------
    async def create(
        self, tenant: str, sid: str, body: ScheduleCreate, idem: Idempotency | None = None
    ) -> tuple[Schedule, int]:
        """(the new schedule, the session's version)."""
        command = CreateSchedule(schedule_id=uuid7(), body=body)
        return await self.service.execute(
            tenant, sid, command, _shown(sid, command.schedule_id), idem, tuple[Schedule, int]
        )

    async def update(
        self, tenant: str, sid: str, schedule_id: str, patch: SchedulePatch, idem: Idempotency | None = None
    ) -> tuple[Schedule, int]:
        command = UpdateSchedule(schedule_id=schedule_id, patch=patch)
        return await self.service.execute(tenant, sid, command, _shown(sid, schedule_id), idem, tuple[Schedule, int])

    async def delete(self, tenant: str, sid: str, schedule_id: str, idem: Idempotency | None = None) -> int:
        """The session's version after the deletion."""
        return await self.service.execute(
            tenant, sid, DeleteSchedule(schedule_id=schedule_id), lambda state, _: state.version, idem, int
        )

    async def list(self, tenant: str, sid: str) -> tuple[ScheduleList, int]:
        state = await self._state(tenant, sid)
        return ScheduleList([resource(sid, s) for s in state.schedules]), state.version

    async def get(self, tenant: str, sid: str, schedule_id: str) -> tuple[Schedule, int]:
        state = await self._state(tenant, sid)
        found = state.schedule(schedule_id)
        if found is None:
            raise NotFound(f"schedule {schedule_id} not found")
        return resource(sid, found), state.version

    async def _state(self, tenant: str, sid: str) -> SessionState:
        """The live session as of its last event, so a schedule reads as it is whatever the projector reached."""
        state = await self.service.current(tenant, sid)
        if not state.exists:
            raise NotFound(f"session {sid} not found")
        return state

    # -- the scheduler's side ---------------------------------------------------------------------
    async def fire(self, tenant: str, sid: str, now: datetime, max_ticks: int = 100) -> Fired:
        """Take every tick of the session's schedules due at `now`, oldest first (at most `max_ticks`): run it as a
        chat, or record it as skipped. `NotFound` if the session is gone."""
        done = Fired()
        for _ in range(max_ticks):
            state = await self._state(tenant, sid)
            due = [
                (s, d)
                for s in state.schedules
                if not s.spec.paused
                and (d := schedules.due(s.spec.cron, s.spec.timezone, s.since, now, self.grace)) is not None
            ]
            if not due:
                break
            s, d = min(due, key=lambda sd: sd[1].tick)
            done += await self._take(tenant, sid, s, Tick(schedule_id=s.id, at=d.tick), d.missed_from)
        return done

    async def _take(self, tenant: str, sid: str, s: ScheduleState, tick: Tick, missed_from: datetime | None) -> Fired:
        if missed_from is not None:
            return await self._skip(tenant, sid, SkipTicks(tick=tick, reason="missed", missed_from=missed_from))
        request = ChatRequest(**{f: getattr(s.spec, f) for f in _TEMPLATE_FIELDS})
        try:
            await self.chats.request(tenant, sid, request, tick=tick)
        except TickTaken:
            return Fired()
        except (ChatInProgress, RateLimited, QuotaExceeded, Invalid) as e:  # refused: the tick is not retried
            return await self._skip(tenant, sid, SkipTicks(tick=tick, reason=e.code))
        return Fired(runs=1)

    async def _skip(self, tenant: str, sid: str, command: SkipTicks) -> Fired:
        try:
            await self.service.execute(tenant, sid, command, lambda s, e: None)
        except TickTaken:
            return Fired()
        return Fired(skipped=1)


class Scheduler:
    """One pass over every partition's schedule index, firing what is due (`Schedules.fire`); bounded by `batch`
    sessions per partition, the rest waiting for the next pass."""

    def __init__(
        self,
        schedules: Schedules,
        views: ReadModels,
        partitions: int,
        batch: int = 100,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.schedules = schedules
        self.views = views
        self.partitions = partitions
        self.batch = batch
        self.clock = clock

    async def run_due(self) -> Fired:
        now = datetime.fromtimestamp(self.clock(), UTC)
        until_ms = int(now.timestamp() * 1000)
        done = Fired()
        for p in range(self.partitions):
            for entry in await self.views.due(p, until_ms, self.batch):
                try:
                    done += await self.schedules.fire(entry.tenant, entry.session_id, now)
                except NotFound:  # purged (or deleted before its projection): the index outlived it
                    await self.views.forget_due(p, entry.tenant, entry.session_id)
                except DomainError as e:  # refused now (too busy, most often): logged, its ticks stay due
                    log.warning("schedules of session %s: %s; the next pass takes them", entry.session_id, e.message)
        return done


def _shown(sid: str, schedule_id: str) -> Callable[[SessionState, list[Event]], tuple[Schedule, int]]:
    def shown(state: SessionState, _: list[Event]) -> tuple[Schedule, int]:
        found = state.schedule(schedule_id)
        assert found is not None
        return resource(sid, found), state.version

    return shown
