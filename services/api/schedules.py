"""Schedule endpoints: a session's cron schedules (`shared.app.schedules`)."""

from __future__ import annotations

from litestar import Controller, Request, Response, delete, get, patch, post
from litestar.di import Provide

from services.api.auth import provide_tenant
from services.api.body import StrictBody
from services.api.context import api
from services.api.params import (
    IdempotencyKey,
    errors,
    etag,
    idempotency,
    json_response,
    parse_schedule_id,
    parse_session_id,
)
from shared.domain.wire import Schedule, ScheduleCreate, ScheduleList, SchedulePatch

__all__ = ["ScheduleController"]


class ScheduleController(Controller):
    path = "/sessions/{session_id:str}/schedules"
    tags = ["schedules"]
    dependencies = {"tenant": Provide(provide_tenant)}
    security = [{"bearer": []}, {"apiKey": []}]

    @post("/", status_code=201, responses=errors(404), dto=StrictBody[ScheduleCreate], return_dto=None)
    async def create_schedule(
        self,
        request: Request,
        tenant: str,
        session_id: str,
        data: ScheduleCreate,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Schedule]:
        """Run a chat with these messages and parameters at every tick of `cron` in `timezone`, from the next tick
        on. Each tick runs once however many workers run (a `ScheduleFired` event in the session's log records it),
        under the session's multitask policy and the tenant's chat limits: a tick they refuse is recorded as
        skipped. Answers the schedule with `Location` and the session's `ETag`."""
        sid = parse_session_id(session_id)
        idem = await idempotency(request, idempotency_key)
        schedule, version = await api(request).parley.schedules.create(tenant, sid, data, idem)
        headers = {"ETag": etag(version), "Location": f"/sessions/{sid}/schedules/{schedule.id}"}
        return json_response(schedule, 201, headers)

    @get("/", responses=errors(404))
    async def list_schedules(self, request: Request, tenant: str, session_id: str) -> Response[ScheduleList]:
        """The session's schedules, in creation order, each with its next tick."""
        schedules, version = await api(request).parley.schedules.list(tenant, parse_session_id(session_id))
        return json_response(schedules, headers={"ETag": etag(version)})

    @get("/{schedule_id:str}", responses=errors(404))
    async def get_schedule(
        self, request: Request, tenant: str, session_id: str, schedule_id: str
    ) -> Response[Schedule]:
        """One schedule: its spec, its next tick, its last tick and chat, how many ticks ran and were skipped."""
        sid = parse_session_id(session_id)
        schedule, version = await api(request).parley.schedules.get(tenant, sid, parse_schedule_id(schedule_id))
        return json_response(schedule, headers={"ETag": etag(version)})

    @patch("/{schedule_id:str}", responses=errors(404), dto=StrictBody[SchedulePatch], return_dto=None)
    async def update_schedule(
        self,
        request: Request,
        tenant: str,
        session_id: str,
        schedule_id: str,
        data: SchedulePatch,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Schedule]:
        """Pause (`paused: true`), resume, or change `cron` / `timezone`. A changed or resumed schedule ticks from
        now on: ticks it would have had while paused are not run."""
        sid = parse_session_id(session_id)
        idem = await idempotency(request, idempotency_key)
        schedules = api(request).parley.schedules
        schedule, version = await schedules.update(tenant, sid, parse_schedule_id(schedule_id), data, idem)
        return json_response(schedule, headers={"ETag": etag(version)})

    @delete("/{schedule_id:str}", status_code=204, responses=errors(404))
    async def delete_schedule(
        self, request: Request, tenant: str, session_id: str, schedule_id: str, idempotency_key: IdempotencyKey = None
    ) -> Response[None]:
        """Delete the schedule: no tick after this runs (chats it already requested go on)."""
        sid = parse_session_id(session_id)
        idem = await idempotency(request, idempotency_key)
        version = await api(request).parley.schedules.delete(tenant, sid, parse_schedule_id(schedule_id), idem)
        return Response(content=None, status_code=204, headers={"ETag": etag(version)})
